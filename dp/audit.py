"""Empirical privacy audits: lower bounds on epsilon from canaries, for tests that check a DP claim.

A DP guarantee caps how well *any* attacker can tell whether a canary was in the input. An audit plays
such an attacker and turns its success into a statistically valid lower bound ``eps_LB`` on the epsilon
of the code under test: if ``eps_LB`` exceeds the claimed epsilon, the claim is false (with the chosen
confidence). A correct implementation passes; a bug that weakens the noise is caught.

- :func:`epsilon_lower_bound` -- the classic audit (Jagielski et al. 2020, Nasr et al. 2021): many runs
  with and without the canary, a threshold on a score, Clopper-Pearson confidence intervals on the false
  positive and false negative rates, ``eps >= log((1 - FNR_hi - delta) / FPR_hi)``.
- :func:`gaussian_fit_epsilon` -- the Gaussian-fit estimate (Nasr et al. 2023): fit one Gaussian to the
  scores with and without the canary, read ``mu = |m1 - m0| / s`` as mu-Gaussian DP, and convert it to
  epsilon at ``delta``. An *estimate*, not a bound; close to the truth for Gaussian mechanisms.
- :func:`one_run_epsilon` -- the one-run bound (Steinke, Nasr, Jagielski 2023): ``m`` canaries, each
  included independently with probability 1/2, in a *single* training run; the attacker guesses ``r``
  of them and gets ``v`` right. Reference value: m=1000, r=100, v=75, delta=1e-4, 95% -> 0.673.

Helpers a user's pytest suite can call: :func:`audit_mechanism` (a mechanism run on two neighbouring
inputs), :func:`audit_dp_sgd` (a DP-SGD run with gradient canaries, one run), :func:`canary_audit`
(any run, e.g. DP-FedAvg rounds, given a function from canary-inclusion mask to canary scores), and
:func:`assert_below` to fail a test when the lower bound exceeds the claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from dp.accounting import gaussian_epsilon
from dp.mechanisms import NoiseSource
from dp.rng import SecureRandom
from dp.sgd import PerSampleMode

__all__ = [
    "AuditResult",
    "assert_below",
    "audit_dp_sgd",
    "audit_mechanism",
    "canary_audit",
    "clopper_pearson",
    "epsilon_lower_bound",
    "gaussian_fit_epsilon",
    "one_run_epsilon",
    "one_run_p_value",
]


# ---- binomial helpers (exact, in log space; no SciPy at run time) ------------------------------------


def _log_binom_pmf(k: NDArray[np.int64], n: int, p: float) -> NDArray[np.float64]:
    k = np.asarray(k, dtype=np.int64)
    out = np.full(k.shape, -np.inf)
    ok = (k >= 0) & (k <= n)
    kk = k[ok].astype(np.float64)
    lg = np.vectorize(math.lgamma)
    log_c = math.lgamma(n + 1) - lg(kk + 1) - lg(n - kk + 1)
    with np.errstate(divide="ignore"):
        lp = np.log(p) if p > 0 else -np.inf
        lq = np.log1p(-p) if p < 1 else -np.inf
    term_p = np.where(kk > 0, kk * lp, 0.0)
    term_q = np.where(n - kk > 0, (n - kk) * lq, 0.0)
    out[ok] = log_c + term_p + term_q
    return out


def _binom_sf(v: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= v]."""
    if v <= 0:
        return 1.0
    if v > n:
        return 0.0
    ks = np.arange(v, n + 1)
    return float(min(1.0, np.exp(_log_binom_pmf(ks, n, p)).sum()))


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k]."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    ks = np.arange(0, k + 1)
    return float(min(1.0, np.exp(_log_binom_pmf(ks, n, p)).sum()))


def clopper_pearson(k: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) confidence interval for a binomial proportion (k successes in n)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = alpha / 2

    def solve(f: Callable[[float], float]) -> float:  # f increasing in p; root of f(p) = 0
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if f(mid) < 0:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    lower = 0.0 if k == 0 else solve(lambda p: _binom_sf(k, n, p) - a)
    upper = 1.0 if k == n else solve(lambda p: a - _binom_cdf(k, n, p))
    return lower, upper


# ---- bounds and estimates ----------------------------------------------------------------------------


def epsilon_lower_bound(*, fp: int, fn: int, negatives: int, positives: int, delta: float,
                        confidence: float = 0.95) -> float:
    """Clopper-Pearson lower bound on epsilon from one threshold's false positives and false negatives.

    ``negatives``: runs without the canary (``fp`` of them flagged); ``positives``: runs with it (``fn``
    missed). For (eps, delta)-DP, ``FPR + e^eps FNR >= 1 - delta`` and symmetrically, so with the
    two-sided ``confidence`` intervals: ``eps >= max(log((1 - delta - FNR_hi) / FPR_hi),
    log((1 - delta - FPR_hi) / FNR_hi))``, or 0.
    """
    alpha = 1 - confidence
    _, fpr_hi = clopper_pearson(fp, negatives, alpha=alpha)
    _, fnr_hi = clopper_pearson(fn, positives, alpha=alpha)
    best = 0.0
    for num, den in ((1 - delta - fnr_hi, fpr_hi), (1 - delta - fpr_hi, fnr_hi)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def _best_threshold(s0: NDArray[np.float64], s1: NDArray[np.float64], delta: float) -> float:
    """The threshold maximising the empirical epsilon on a selection split."""
    cands = np.unique(np.concatenate([s0, s1]))
    best_t, best = float(cands[0]), -math.inf
    n0, n1 = s0.size, s1.size
    s0s, s1s = np.sort(s0), np.sort(s1)
    for t in cands:
        fp = n0 - np.searchsorted(s0s, t, side="left")
        fn = np.searchsorted(s1s, t, side="left")
        fpr, fnr = (fp + 0.5) / (n0 + 1), (fn + 0.5) / (n1 + 1)
        val = math.log(max(1e-12, 1 - delta - fnr) / fpr)
        if val > best:
            best, best_t = val, float(t)
    return best_t


def gaussian_fit_epsilon(scores_out: Sequence[float] | NDArray[Any], scores_in: Sequence[float] | NDArray[Any], *,
                         delta: float) -> float:
    """Gaussian-fit epsilon estimate (Nasr et al. 2023): ``mu = |mean_in - mean_out| / pooled std``."""
    s0, s1 = np.asarray(scores_out, dtype=np.float64), np.asarray(scores_in, dtype=np.float64)
    if s0.size < 2 or s1.size < 2:
        raise ValueError("the Gaussian fit needs at least two scores on each side")
    sd = math.sqrt(0.5 * (float(np.var(s0, ddof=1)) + float(np.var(s1, ddof=1))))
    if sd == 0:
        return math.inf
    mu = abs(float(np.mean(s1)) - float(np.mean(s0))) / sd
    return gaussian_epsilon(mu=mu, delta=delta)


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP (Steinke, Nasr, Jagielski 2023, Thm 3.3).

    ``m`` canaries, each included independently with probability 1/2; ``r`` guesses (abstentions
    excluded), ``v`` correct.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = _binom_sf(v, r, q)
    alpha, acc = 0.0, 0.0
    pmf = np.exp(_log_binom_pmf(np.arange(v - 1, -1, -1), r, q)) if v > 0 else np.zeros(0)
    for i in range(1, v + 1):
        acc += float(pmf[i - 1])  # P[v > Binomial(r, q) >= v - i]
        if acc > i * alpha:
            alpha = acc / i
    return min(1.0, beta + alpha * delta * 2 * m)


def one_run_epsilon(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The one-run lower bound on epsilon: the largest eps rejected at level ``1 - confidence``."""
    p = 1 - confidence
    if one_run_p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) > p:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < p:
        lo, hi = hi, hi + 1
        if hi > 100:
            return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


# ---- audits a test can call ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditResult:
    """An audit's outcome: the lower bound (valid with ``confidence``), an estimate, and raw counts."""

    epsilon_lower_bound: float
    epsilon_estimate: float
    delta: float
    confidence: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "epsilon_estimate": self.epsilon_estimate,
            "delta": self.delta,
            "confidence": self.confidence,
            "method": self.method,
            **self.details,
        }


def assert_below(result: AuditResult, claimed_epsilon: float) -> None:
    """Fail (``AssertionError``) when the audit proves the claimed epsilon false."""
    if result.epsilon_lower_bound > claimed_epsilon:
        raise AssertionError(
            f"privacy audit ({result.method}) shows epsilon >= {result.epsilon_lower_bound:.3f} with "
            f"{result.confidence:.0%} confidence at delta={result.delta:g}, above the claimed {claimed_epsilon:g}: "
            f"the noise is weaker than the accounting assumes"
        )


def audit_mechanism(
    mechanism: Callable[[NDArray[np.float64], NoiseSource], NDArray[np.float64]],
    *,
    without: NDArray[np.float64],
    with_canary: NDArray[np.float64],
    trials: int = 4000,
    delta: float = 1e-5,
    confidence: float = 0.95,
    score: Callable[[NDArray[np.float64]], float] | None = None,
    rng: NoiseSource | None = None,
) -> AuditResult:
    """Classic audit of ``mechanism(input, rng)`` on two neighbouring inputs, ``trials`` runs each.

    ``score`` maps an output to a number that is larger when the canary is present (default: the
    projection on ``with_canary - without``). Half the runs pick the threshold, the other half give the
    Clopper-Pearson bound (so the choice does not bias it); all runs feed the Gaussian-fit estimate.
    """
    rng = rng if rng is not None else SecureRandom()
    d0, d1 = np.asarray(without, dtype=np.float64), np.asarray(with_canary, dtype=np.float64)
    direction = (d1 - d0).ravel()
    if score is None:
        def score(out: NDArray[np.float64]) -> float:
            return float(np.dot(np.asarray(out, dtype=np.float64).ravel() - d0.ravel(), direction))

    s0 = np.array([score(mechanism(d0.copy(), rng)) for _ in range(trials)])
    s1 = np.array([score(mechanism(d1.copy(), rng)) for _ in range(trials)])
    half = trials // 2
    t = _best_threshold(s0[:half], s1[:half], delta)
    e0, e1 = s0[half:], s1[half:]
    fp, fn = int((e0 >= t).sum()), int((e1 < t).sum())
    lb = epsilon_lower_bound(fp=fp, fn=fn, negatives=e0.size, positives=e1.size, delta=delta, confidence=confidence)
    est = gaussian_fit_epsilon(s0, s1, delta=delta)
    return AuditResult(lb, est, delta, confidence, "clopper-pearson",
                       {"trials": trials, "threshold": t, "fp": fp, "fn": fn, "negatives": e0.size,
                        "positives": e1.size})


def canary_audit(
    run: Callable[[NDArray[np.bool_]], NDArray[np.float64]],
    *,
    canaries: int = 1000,
    guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
    rng: NoiseSource | None = None,
) -> AuditResult:
    """One-run audit of any training run with ``canaries`` canaries (Steinke, Nasr, Jagielski 2023).

    Each canary is included with probability 1/2 (from ``rng``); ``run(mask)`` trains once with the
    included canaries and returns one score per canary (larger = more likely included). The attacker
    guesses "in" for the ``guesses/2`` highest scores and "out" for the ``guesses/2`` lowest.
    """
    rng = rng if rng is not None else SecureRandom()
    mask = rng.uniform(canaries) < 0.5
    scores = np.asarray(run(mask.copy()), dtype=np.float64)
    if scores.shape != (canaries,):
        raise ValueError(f"run(mask) must return {canaries} scores, got shape {scores.shape}")
    k = guesses // 2
    order = np.argsort(scores, kind="stable")
    guess_out, guess_in = order[:k], order[canaries - k :]
    v = int(mask[guess_in].sum() + (~mask[guess_out]).sum())
    r = 2 * k
    lb = one_run_epsilon(m=canaries, r=r, v=v, delta=delta, confidence=confidence)
    both = mask.sum() > 1 and (~mask).sum() > 1
    est = gaussian_fit_epsilon(scores[~mask], scores[mask], delta=delta) if both else 0.0
    return AuditResult(lb, est, delta, confidence, "one-run",
                       {"canaries": canaries, "guesses": r, "correct": v, "included": int(mask.sum())})


def audit_dp_sgd(
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    steps: int = 20,
    canaries: int = 1000,
    guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
    mode: PerSampleMode = "auto",
    train: Callable[..., Any] | None = None,
    rng: NoiseSource | None = None,
) -> AuditResult:
    """One-run white-box audit of DP-SGD with gradient canaries.

    The model is a logistic regression over ``canaries`` input coordinates; canary ``k`` is the example
    ``100 * e_k`` (label 1), whose clipped gradient lands only on weight column ``k``. Full-batch DP-SGD
    (every included canary in every step) runs ``steps`` steps through ``train`` (default
    :func:`dp.sgd.dp_sgd`, the code under test), and canary ``k``'s score is how far weight ``k`` moved
    toward its label. Each canary then faces ``steps`` Gaussian steps, so a correct implementation
    yields a bound below the accountant's epsilon, and weakened noise a bound above it.
    """
    from dp.sgd import dp_sgd

    rng = rng if rng is not None else SecureRandom()
    train_fn = train if train is not None else dp_sgd

    def run(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        idx = np.flatnonzero(mask)
        model = torch.nn.Linear(canaries, 2, bias=False)
        torch.nn.init.zeros_(model.weight)
        x = torch.zeros(max(1, idx.size), canaries)
        if idx.size:
            x[torch.arange(idx.size), torch.from_numpy(idx)] = 100.0
        y = torch.ones(x.shape[0], dtype=torch.int64)
        train_fn(model, x[: idx.size] if idx.size else x[:0], y[: idx.size] if idx.size else y[:0],
                 noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, batch_size=canaries,
                 steps=steps, lr=1.0, mode=mode, rng=rng)
        w = model.weight.detach().numpy().astype(np.float64)
        return w[1] - w[0]

    res = canary_audit(run, canaries=canaries, guesses=guesses, delta=delta, confidence=confidence, rng=rng)
    return AuditResult(res.epsilon_lower_bound, res.epsilon_estimate, delta, confidence, "one-run dp-sgd",
                       {**res.details, "steps": steps, "noise_multiplier": noise_multiplier})
