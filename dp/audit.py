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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from numpy.typing import NDArray

from dp.accounting import gaussian_epsilon
from dp.errors import AuditFailedError, AuditInputError, CalibrationError, PrivacyParameterError, SignatureError
from dp.mechanisms import NoiseSource
from dp.rng import SecureRandom
from dp.sgd import PerSampleMode

__all__ = [
    "AuditResult",
    "Claim",
    "assert_below",
    "audit_dp_sgd",
    "audit_gaussian_mechanism",
    "audit_mechanism",
    "canary_audit",
    "clopper_pearson",
    "epsilon_for_mu",
    "epsilon_lower_bound",
    "gaussian_fit_epsilon",
    "gdp_audit",
    "gdp_mu_interval",
    "one_run_epsilon",
    "one_run_p_value",
]

_MORE_SCORES = "use more runs or canaries so that both sides (with and without the canary) hold >= 2 scores"


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
        raise AuditInputError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}; pass k successes out of n trials")
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
        raise AuditInputError(f"the Gaussian fit needs at least two scores on each side, got {s0.size} and "
                              f"{s1.size}; {_MORE_SCORES}")
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
        raise AuditInputError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}; pass m canaries, r guesses "
                              "(abstentions excluded) and v correct guesses")
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


# ---- Gaussian-DP fits with confidence intervals (Nasr et al. 2023; Andrew et al. 2024) ----------------


def gdp_mu_interval(scores_out: Sequence[float] | NDArray[Any], scores_in: Sequence[float] | NDArray[Any], *,
                    confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mu_hat, mu_lower, mu_upper)`` for ``mu = (mean_in - mean_out) / sigma``, one-sided ``confidence`` each.

    The model: canary-absent scores ~ N(m, s^2), canary-present ~ N(m + mu s, s^2) (a Gaussian mechanism
    seen through a linear score). Then ``t = (mean_in - mean_out) / (s_pooled sqrt(1/n0 + 1/n1))`` has a
    noncentral t distribution with ``n0 + n1 - 2`` degrees of freedom and noncentrality
    ``mu / sqrt(1/n0 + 1/n1)``; the bounds invert it exactly (SciPy, imported lazily). ``mu_lower`` is
    clamped at 0.
    """
    from scipy import optimize, stats

    s0, s1 = np.asarray(scores_out, dtype=np.float64).ravel(), np.asarray(scores_in, dtype=np.float64).ravel()
    if s0.size < 2 or s1.size < 2:
        raise AuditInputError(f"the Gaussian-DP fit needs at least two scores on each side, got {s0.size} and "
                              f"{s1.size}; {_MORE_SCORES}")
    if not 0.5 < confidence < 1:
        raise AuditInputError(f"confidence must be in (0.5, 1), got {confidence}; pass e.g. confidence=0.95")
    if not (np.isfinite(s0).all() and np.isfinite(s1).all()):
        raise AuditInputError("scores must be finite; a NaN or Inf score means the audited run diverged: make "
                              "it converge (e.g. a lower learning rate) and audit again")
    n0, n1 = s0.size, s1.size
    df = n0 + n1 - 2
    sd = math.sqrt(((n0 - 1) * float(np.var(s0, ddof=1)) + (n1 - 1) * float(np.var(s1, ddof=1))) / df)
    if sd == 0:
        return math.inf, math.inf, math.inf
    scale = math.sqrt(1 / n0 + 1 / n1)
    t_obs = (float(np.mean(s1)) - float(np.mean(s0))) / (sd * scale)
    alpha = 1 - confidence

    def nc_where_sf_is(level: float) -> float:  # sf(t_obs; nc) increases with nc
        def f(nc: float) -> float:
            return float(stats.nct.sf(t_obs, df, nc)) - level

        lo, hi = t_obs - 10.0, t_obs + 10.0
        while f(lo) > 0:
            lo -= 10.0 + abs(lo)
        while f(hi) < 0:
            hi += 10.0 + abs(hi)
        return float(optimize.brentq(f, lo, hi, xtol=1e-10))

    mu_lo = max(0.0, nc_where_sf_is(alpha) * scale)
    mu_hi = max(0.0, nc_where_sf_is(1 - alpha) * scale)
    return max(0.0, t_obs * scale), mu_lo, mu_hi


def epsilon_for_mu(mu: float, *, delta: float, releases: int = 1, sample_rate: float = 1.0) -> float:
    """Epsilon at ``delta`` of ``releases`` Gaussian releases, each ``mu``-GDP (noise multiplier ``1/mu``).

    Without sampling the composition is exactly ``sqrt(releases) mu``-GDP; with Poisson sampling at
    ``sample_rate`` the accountant (:func:`dp.accounting.compute_epsilon`, PLD) composes the steps.
    """
    if mu <= 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    if sample_rate >= 1:
        return gaussian_epsilon(mu=math.sqrt(releases) * mu, delta=delta)
    from dp.accounting import compute_epsilon

    return compute_epsilon(noise_multiplier=1.0 / mu, delta=delta, sample_rate=sample_rate, steps=releases)


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """What a DP claim says: ``(epsilon, delta)`` for ``releases`` Gaussian releases at ``sample_rate``.

    An audit measures the noise of one release and composes it the way the claim does, so a claim for
    14,062 Poisson-sampled DP-SGD steps is checked by auditing a few full-batch steps.
    """

    epsilon: float | None
    delta: float
    releases: int = 1
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise PrivacyParameterError(f"the claimed epsilon must be a positive finite number, got {self.epsilon}; "
                                        "pass the epsilon the code claims, or None to audit the noise only")
        if not 0 < self.delta < 1:
            raise PrivacyParameterError(f"the claimed delta must be in (0, 1), got {self.delta}; pass the delta "
                                        "the code claims, e.g. 1e-5")
        if self.releases < 1 or not 0 < self.sample_rate <= 1:
            raise PrivacyParameterError(f"a claim needs releases >= 1 and 0 < sample_rate <= 1, got releases="
                                        f"{self.releases}, sample_rate={self.sample_rate}; pass the number of "
                                        "releases (rounds or steps) and the sampling rate of each")

    def noise_multiplier(self) -> float:
        """The smallest noise multiplier whose releases stay within the claim (the accountant's calibration)."""
        from dp.accounting import calibrate_noise

        if self.epsilon is None:
            raise CalibrationError("this claim names no epsilon, so there is no noise multiplier to calibrate; "
                                   "pass Claim(epsilon=...)")
        return calibrate_noise(epsilon=self.epsilon, delta=self.delta, sample_rate=self.sample_rate,
                               steps=self.releases, rtol=1e-4)

    def epsilon_of(self, mu_per_release: float) -> float:
        return epsilon_for_mu(mu_per_release, delta=self.delta, releases=self.releases, sample_rate=self.sample_rate)


def gdp_audit(
    run: Callable[[NDArray[np.bool_]], NDArray[np.float64]],
    *,
    canaries: int,
    releases: int,
    claim: Claim,
    runs: int = 1,
    confidence: float = 0.95,
    rng: NoiseSource | None = None,
    method: str = "gdp-fit",
    noise_multiplier_claimed: float | None = None,
) -> AuditResult:
    """Many-canary Gaussian-DP audit (Andrew et al. 2024; Nasr et al. 2023), ``runs`` runs.

    Each run includes every canary independently with probability 1/2 (from ``rng``) and calls
    ``run(mask)``, which must return one score per canary, additive over the run's ``releases``
    observed releases (e.g. the final model's coordinate along the canary after ``releases`` steps, in
    units that do not depend on the noise). The scores of absent and present canaries give a
    ``confidence`` lower bound on the run's GDP ``mu`` (:func:`gdp_mu_interval`); a Gaussian release
    repeated ``releases`` times is ``mu / sqrt(releases)``-GDP each, and ``claim`` composes that per-release
    bound into ``epsilon_lower_bound`` at the claimed delta. On a correct Gaussian mechanism the bound
    exceeds the claim with probability at most ``1 - confidence``. ``noise_multiplier_claimed`` (if known)
    goes into the details beside the measured one, so a report can say how much weaker the noise is.
    """
    if canaries < 4 or runs < 1 or releases < 1:
        raise AuditInputError(f"need canaries >= 4, runs >= 1 and releases >= 1, got canaries={canaries}, "
                              f"runs={runs}, releases={releases}; raise the one that is too small")
    rng = rng if rng is not None else SecureRandom()
    out_scores: list[NDArray[np.float64]] = []
    in_scores: list[NDArray[np.float64]] = []
    for _ in range(runs):
        mask = rng.uniform(canaries) < 0.5
        mask[:2], mask[2:4] = True, False  # both sides always present
        scores = np.asarray(run(mask.copy()), dtype=np.float64)
        if scores.shape != (canaries,):
            raise AuditInputError(f"run(mask) must return {canaries} scores, got shape {scores.shape}; "
                                  "return one score per canary, as a 1-D array")
        out_scores.append(scores[~mask])
        in_scores.append(scores[mask])
    s0, s1 = np.concatenate(out_scores), np.concatenate(in_scores)
    mu_hat, mu_lo, mu_hi = gdp_mu_interval(s0, s1, confidence=confidence)
    per = math.sqrt(releases)
    lb, est = claim.epsilon_of(mu_lo / per), claim.epsilon_of(mu_hat / per)
    return AuditResult(lb, est, claim.delta, confidence, method, {
        "canaries": canaries, "runs": runs, "observations": int(s0.size + s1.size), "releases_per_run": releases,
        "mu_run": mu_hat, "mu_run_lower": mu_lo, "mu_run_upper": mu_hi,
        "noise_multiplier_measured": per / mu_hat if mu_hat > 0 else math.inf,
        "noise_multiplier_upper": per / mu_lo if mu_lo > 0 else math.inf,
        "noise_multiplier_lower": per / mu_hi if mu_hi > 0 else math.inf,
        "noise_multiplier_claimed": noise_multiplier_claimed,
        "claimed_epsilon": claim.epsilon, "claimed_releases": claim.releases,
        "claimed_sample_rate": claim.sample_rate,
    })


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
    """Fail (:class:`~dp.errors.AuditFailedError`, an ``AssertionError``) when the audit proves the claim false."""
    if result.epsilon_lower_bound > claimed_epsilon:
        raise AuditFailedError(
            f"privacy audit ({result.method}) shows epsilon >= {result.epsilon_lower_bound:.3f} with "
            f"{result.confidence * 100:.4g}% confidence at delta={result.delta:g}, "
            f"above the claimed {claimed_epsilon:g}: "
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


def audit_gaussian_mechanism(
    mechanism: Callable[..., Any],
    *,
    sensitivity: float,
    canaries: int = 1000,
    runs: int = 20,
    delta: float = 1e-5,
    confidence: float = 0.95,
    claim: Claim | None = None,
    rng: NoiseSource | None = None,
) -> AuditResult:
    """Gaussian-DP audit of a vector mechanism ``mechanism(value, rng=...)`` (e.g. ``GaussianMechanism``).

    Each of ``runs`` calls releases one vector of ``canaries`` coordinates; canary ``k`` adds
    ``sensitivity`` to coordinate ``k`` (included with probability 1/2), so with independent noise per
    coordinate every coordinate is one canary's release. ``claim`` (default: one release at ``delta``)
    composes the per-release bound.
    """
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise PrivacyParameterError(f"sensitivity must be a positive finite number, got {sensitivity}; pass the "
                                    "L2 sensitivity of one release (e.g. the clip norm)")
    rng = rng if rng is not None else SecureRandom()
    src = rng

    def run(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        out = np.asarray(mechanism(mask.astype(np.float64) * sensitivity, rng=src), dtype=np.float64)
        return out.ravel() / sensitivity

    claim = claim if claim is not None else Claim(epsilon=None, delta=delta)
    return gdp_audit(run, canaries=canaries, releases=1, claim=claim, runs=runs, confidence=confidence, rng=rng,
                     method="gdp-fit mechanism (one canary per coordinate)",
                     noise_multiplier_claimed=getattr(mechanism, "noise_multiplier", None))


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
        raise AuditInputError(f"run(mask) must return {canaries} scores, got shape {scores.shape}; return "
                              "one score per canary, as a 1-D array")
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


def _dp_sgd_canary_run(
    train_fn: Callable[..., Any], *, canaries: int, noise_multiplier: float, max_grad_norm: float, steps: int,
    mode: PerSampleMode, rng: NoiseSource,
) -> Callable[[NDArray[np.bool_]], NDArray[np.float64]]:
    """``run(mask)`` for DP-SGD: full-batch training on the included Dirac canaries, one score each.

    Canary ``k`` is the example ``100 e_k`` with label 1 of a logistic regression over ``canaries``
    inputs; its gradient (norm about 70, so clipping matters) lies on weight column ``k`` only, along
    ``(1, -1) / sqrt(2)`` in the two output rows. With every example in every step (``batch_size >= n``,
    so the step's denominator is ``n``), the score ``(w1 - w0)_k * n / (lr sqrt(2) C)`` is ``steps``
    plus ``N(0, steps z^2)`` for an included canary and the noise alone otherwise. The learning rate
    keeps the logits within about 0.5 of zero, so each canary's gradient stays above the clip norm.
    """

    def run(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        idx = np.flatnonzero(mask)
        n = int(idx.size)
        model = torch.nn.Linear(canaries, 2, bias=False)
        torch.nn.init.zeros_(model.weight)
        x = torch.zeros(n, canaries)
        x[torch.arange(n), torch.from_numpy(idx)] = 100.0
        y = torch.ones(n, dtype=torch.int64)
        lr = 0.5 * n / (100.0 * math.sqrt(2.0) * max_grad_norm * steps)
        _call_train(train_fn, model, x, y, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                    batch_size=canaries, steps=steps, lr=lr, mode=mode, rng=rng)
        w = model.weight.detach().numpy().astype(np.float64)
        return cast(NDArray[np.float64], (w[1] - w[0]) * n / (lr * math.sqrt(2.0) * max_grad_norm))

    return run


def _call_train(train_fn: Callable[..., Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                **kwargs: Any) -> None:
    """Call a ``dp.sgd.dp_sgd``-like function, passing only the optional keywords it accepts."""
    import inspect

    required = ("noise_multiplier", "max_grad_norm", "batch_size", "steps")
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        missing = [k for k in required if k not in params]
        if missing:
            raise SignatureError(f"the DP-SGD training function must accept the keywords {', '.join(required)} "
                            f"(like dp.sgd.dp_sgd); it lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    train_fn(model, x, y, **kwargs)


def audit_dp_sgd(
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    steps: int = 20,
    canaries: int = 1000,
    runs: int = 1,
    guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
    mode: PerSampleMode = "auto",
    train: Callable[..., Any] | None = None,
    rng: NoiseSource | None = None,
    method: Literal["gdp", "one-run"] = "gdp",
    claim: Claim | None = None,
) -> AuditResult:
    """White-box audit of DP-SGD (``train``, default :func:`dp.sgd.dp_sgd`, the code under test).

    ``runs`` full-batch runs of ``steps`` steps at ``noise_multiplier`` over ``canaries`` Dirac gradient
    canaries, each included with probability 1/2 (see :func:`_dp_sgd_canary_run`). ``method="gdp"``
    (default): the Gaussian-DP fit of the canary scores with a confidence bound (:func:`gdp_audit`),
    composed as ``claim`` says (default: the audited run itself, ``steps`` full-batch steps at
    ``delta``); it catches noise divided by 2 in one run of 1000 canaries for any claim with
    ``epsilon >= 1``. ``method="one-run"``: the older Steinke-Nasr-Jagielski bound from ``guesses``
    guesses (needs no distributional model, much weaker).
    """
    from dp.sgd import dp_sgd

    rng = rng if rng is not None else SecureRandom()
    run = _dp_sgd_canary_run(train if train is not None else dp_sgd, canaries=canaries,
                             noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, steps=steps,
                             mode=mode, rng=rng)
    extra = {"steps": steps, "noise_multiplier": noise_multiplier}
    if method == "one-run":
        res = canary_audit(run, canaries=canaries, guesses=guesses, delta=delta, confidence=confidence, rng=rng)
        return AuditResult(res.epsilon_lower_bound, res.epsilon_estimate, delta, confidence, "one-run dp-sgd",
                           {**res.details, **extra})
    claim = claim if claim is not None else Claim(epsilon=None, delta=delta, releases=steps)
    res = gdp_audit(run, canaries=canaries, releases=steps, claim=claim, runs=runs, confidence=confidence, rng=rng,
                    method="gdp-fit dp-sgd (white-box Dirac canaries)", noise_multiplier_claimed=noise_multiplier)
    return AuditResult(res.epsilon_lower_bound, res.epsilon_estimate, res.delta, confidence, res.method,
                       {**res.details, **extra})
