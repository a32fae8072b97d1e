"""Privacy assertions for a user's own test suite: :func:`assert_dp` and :func:`assert_ledger`.

``assert_dp`` plays the membership attacker of a DP guarantee against the code under test (the
Gaussian-DP canary audit of :mod:`dp.audit`) and fails when the attacker proves the claimed epsilon
false. ``assert_ledger`` checks that a run's report holds the guarantees a policy needs. Both raise
:class:`PrivacyAssertionError` (an ``AssertionError``) with a report a person can act on.

The effort and the seed come from the pytest plugin (``--privacy-audit-effort``,
``--privacy-audit-seed``, the ``privacy_audit`` marker) when it runs, else from the arguments.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EFFORTS",
    "AuditEffort",
    "DpRequirement",
    "InputPrivacyRequirement",
    "PrivacyAssertionError",
    "assert_dp",
    "assert_ledger",
    "parse_requirement",
]


class PrivacyAssertionError(AssertionError):
    """A privacy assertion failed; the message says what was measured or missing and what to suspect."""


@dataclass(frozen=True, slots=True)
class AuditEffort:
    """How hard :func:`assert_dp` tries: canaries per run, runs, and releases (steps/rounds) per run."""

    name: str
    canaries: int
    runs: int
    releases: int


EFFORTS: dict[str, AuditEffort] = {
    "quick": AuditEffort("quick", canaries=1000, runs=4, releases=10),
    "thorough": AuditEffort("thorough", canaries=2000, runs=10, releases=20),
}


@dataclass
class _Context:
    """What the pytest plugin sets for the running test (module state: pytest runs one test at a time)."""

    effort: str = "quick"
    seed: int | None = None
    nodeid: str = ""
    calls: int = 0
    active: bool = False


_CONTEXT = _Context()


def _resolve(effort: str | AuditEffort | None, seed: int | None) -> tuple[AuditEffort, Any, str]:
    """The effort, the CSPRNG and a replay hint, from the arguments or the plugin's settings."""
    from dp.rng import SecureRandom

    chosen = effort if effort is not None else _CONTEXT.effort
    if isinstance(chosen, str):
        if chosen not in EFFORTS:
            raise ValueError(f"unknown audit effort {chosen!r}; choose one of {', '.join(EFFORTS)}")
        chosen = EFFORTS[chosen]
    s = seed if seed is not None else _CONTEXT.seed if _CONTEXT.active else None
    if s is None:
        return chosen, SecureRandom(), "unseeded (os.urandom); pass seed= or --privacy-audit-seed to repeat it"
    _CONTEXT.calls += 1
    key = f"privacy-audit:{s}:{_CONTEXT.nodeid}:{_CONTEXT.calls}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return chosen, SecureRandom.for_testing(key), f"seed {s} (--privacy-audit-seed={s}; stream {tag})"


# ---- assert_dp -------------------------------------------------------------------------------------------


def _is_train_function(target: Any) -> bool:
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "noise_multiplier" in params and "max_grad_norm" in params


def _pipeline_of(target: Any) -> Any | None:
    from fl.pipeline import Pipeline

    if isinstance(target, Pipeline):
        return target
    if isinstance(target, Sequence) and target and all(hasattr(x, "bind") and hasattr(x, "encode") for x in target):
        return Pipeline(list(target))
    return None


def _pipeline_clip(pipeline: Any, size: int) -> float:
    from fl.spec import ValueSpec

    bound = pipeline.bind(ValueSpec(size=size, cohort=size))
    clips = [s.l2_bound for s in (*bound.specs, bound.out_spec) if s.l2_bound is not None]
    if not clips:
        raise ValueError("the pipeline declares no L2 bound, so there is no sensitivity to audit: put Clip(l2=...) "
                         "before the noise layer")
    return float(min(clips))


def _run_audit(target: Any, claim: Any, effort: AuditEffort, rng: Any, confidence: float,
               max_grad_norm: float) -> tuple[Any, str]:
    """Dispatch on the target's kind; returns the audit result and a description of the target."""
    from dp.audit import audit_dp_sgd, audit_gaussian_mechanism
    from fl.cli.audit import audit_dp_fedavg

    pipeline = _pipeline_of(target)
    if pipeline is not None:
        clip = _pipeline_clip(pipeline, effort.canaries)
        res = audit_dp_fedavg(layers=pipeline, clip=clip, rounds=effort.releases, canaries=effort.canaries,
                              runs=effort.runs, delta=claim.delta, confidence=confidence, rng=rng, claim=claim)
        return res, f"DP-FedAvg pipeline {pipeline.name} (clip {clip:g})"
    if callable(target) and _is_train_function(target):
        z = claim.noise_multiplier()
        res = audit_dp_sgd(train=target, noise_multiplier=z, max_grad_norm=max_grad_norm, steps=effort.releases,
                           canaries=effort.canaries, runs=effort.runs, delta=claim.delta, confidence=confidence,
                           rng=rng, claim=claim)
        name = getattr(target, "__qualname__", repr(target))
        return res, f"DP-SGD training function {name} (called with noise multiplier {z:.4g}, the claim's)"
    if callable(target) and hasattr(target, "sensitivity"):
        res = audit_gaussian_mechanism(target, sensitivity=float(target.sensitivity), canaries=effort.canaries,
                                       runs=effort.runs * effort.releases, delta=claim.delta, confidence=confidence,
                                       claim=claim, rng=rng)
        return res, f"mechanism {target!r}"
    raise TypeError(
        "assert_dp audits a DP-SGD training function (accepting noise_multiplier= and max_grad_norm=, like "
        "dp.sgd.dp_sgd), a DP-FedAvg pipeline (fl.pipeline.Pipeline or a list of layers starting with Clip), or "
        f"a Gaussian mechanism (callable with a .sensitivity, like dp.mechanisms.GaussianMechanism); got {target!r}"
    )


def _suspects(ratio: float) -> str:
    if ratio >= 4:
        return ("a canary moved the output far more than the clip norm allows: clipping looks switched off or "
                "applied after the noise; else the noise is much smaller than noise_multiplier * clip")
    return ("the noise is weaker than the accounting assumes (std not noise_multiplier * clip, e.g. divided by a "
            "factor or a batch size, or noise added before averaging), or clipping is looser than declared; also "
            "check that the claimed epsilon is for this schedule (steps=, sample_rate=, delta=)")


def _report(res: Any, claim: Any, what: str, replay: str, *, failed: bool) -> str:
    d = res.details
    z_claim = claim.noise_multiplier()  # what the accounting needs for the claim (cheap without sampling)
    z_meas, z_up = d["noise_multiplier_measured"], d["noise_multiplier_upper"]
    head = (f"privacy audit {'FAILED' if failed else 'passed'}: epsilon >= {res.epsilon_lower_bound:.4g} with "
            f"{res.confidence * 100:.4g}% confidence at delta = {claim.delta:g}; "
            f"the claim is epsilon = {claim.epsilon:g}")
    lines = [
        head,
        f"  target:    {what}",
        f"  claim:     ({claim.epsilon:g}, {claim.delta:g})-DP for {claim.releases} release(s) at sample rate "
        f"{claim.sample_rate:g}",
        f"  method:    {res.method}; {d['canaries']} canaries x {d['runs']} run(s) = {d['observations']} "
        f"observations, {d['releases_per_run']} releases per run",
        f"  estimate:  epsilon ~= {res.epsilon_estimate:.4g} (Gaussian-DP fit, mu per run {d['mu_run']:.4g}, "
        f"{res.confidence * 100:.4g}% lower bound {d['mu_run_lower']:.4g})",
    ]
    if z_claim:
        ratio = z_claim / z_meas if z_meas > 0 else math.inf
        lines.append(f"  noise:     measured noise multiplier ~= {z_meas:.4g} (at most {z_up:.4g}) vs {z_claim:.4g} "
                     f"the claim needs: {ratio:.2f}x {'weaker' if ratio > 1 else 'as strong or stronger'}")
    else:
        ratio = 1.0
    if failed:
        lines.append(f"  suspect:   {_suspects(ratio)}")
    lines.append(f"  replay:    {replay}")
    return "\n".join(lines)


def assert_dp(
    target: Any,
    *,
    epsilon: float,
    delta: float,
    steps: int = 1,
    sample_rate: float = 1.0,
    effort: str | AuditEffort | None = None,
    seed: int | None = None,
    confidence: float = 0.999,
    max_grad_norm: float = 1.0,
) -> Any:
    """Fail unless an empirical audit of ``target`` is consistent with ``(epsilon, delta)``-DP.

    ``target``: a DP-SGD training function with :func:`dp.sgd.dp_sgd`'s keywords (it is called on
    Dirac gradient canaries with the noise multiplier the accountant gives for the claim), a DP-FedAvg
    pipeline (``Pipeline`` or a list of layers such as ``[Clip(l2=1), GaussianNoise(multiplier=z)]``,
    run with canary clients), or a Gaussian mechanism (callable ``m(x, rng=...)`` with ``.sensitivity``).
    The claim is ``(epsilon, delta)`` for ``steps`` releases (DP-SGD steps, rounds) at Poisson
    ``sample_rate``; the audit measures one release's noise and composes it the same way. The bound
    holds with ``confidence``: correct code fails with probability at most ``1 - confidence`` (0.1% by
    default, so a CI suite of audits rarely cries wolf); noise divided by 2 fails at the default
    (quick) effort for claims with epsilon >= 0.5 per release; smaller claims need
    ``effort="thorough"``. Returns the :class:`dp.audit.AuditResult` when the audit passes.
    """
    from dp.audit import Claim

    claim = Claim(epsilon=epsilon, delta=delta, releases=steps, sample_rate=sample_rate)
    chosen, rng, replay = _resolve(effort, seed)
    res, what = _run_audit(target, claim, chosen, rng, confidence, max_grad_norm)
    if res.epsilon_lower_bound > epsilon:
        raise PrivacyAssertionError(_report(res, claim, what, replay, failed=True))
    return res


# ---- assert_ledger ---------------------------------------------------------------------------------------


def _observer_text(g: Mapping[str, Any]) -> str:
    """Whom a guarantee covers, lower case; "(not the server, ...)" clauses are removed."""
    params = g.get("params") or {}
    explicit = g.get("observer", params.get("observer"))
    if explicit:
        return " ".join(explicit if isinstance(explicit, list | tuple) else [str(explicit)]).lower()
    return re.sub(r"\(not [^)]*\)", "", str(g.get("against", ""))).lower()


@dataclass(frozen=True, slots=True)
class DpRequirement:
    """``(epsilon <= ..., delta <= ...)``-DP at ``unit`` level (``example``/``client``) covering ``observer``."""

    epsilon: float
    delta: float
    unit: str | None = None
    observer: str | None = None

    def met_by(self, g: Mapping[str, Any]) -> bool:
        params = g.get("params") or {}
        eps, dlt = params.get("epsilon"), params.get("delta")
        if not isinstance(eps, int | float) or not isinstance(dlt, int | float):
            return False
        if eps > self.epsilon or dlt > self.delta:
            return False
        text = f"{g.get('property', '')} {params.get('unit', '')}".lower()
        if self.unit and f"{self.unit} level" not in text and params.get("unit") != self.unit:
            return False
        return not self.observer or self.observer.lower() in _observer_text(g)

    def __str__(self) -> str:
        parts = [f"(epsilon <= {self.epsilon:g}, delta <= {self.delta:g})-DP"]
        if self.unit:
            parts.append(f"at {self.unit} level")
        if self.observer:
            parts.append(f"for {self.observer}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class InputPrivacyRequirement:
    """Input privacy (only the sum is revealed) against ``observer`` (e.g. ``"server"``)."""

    observer: str

    def met_by(self, g: Mapping[str, Any]) -> bool:
        prop = str(g.get("property", "")).lower()
        return prop.startswith("input privacy") and self.observer.lower() in _observer_text(g)

    def __str__(self) -> str:
        return f"input privacy against the {self.observer}"


_NUM = r"([0-9.]+(?:e-?[0-9]+)?)"
_DP_RE = re.compile(
    rf"^\(\s*(?:eps|epsilon|ε)\s*<=\s*{_NUM}\s*,\s*(?:delta|δ)\s*<=\s*{_NUM}\s*\)(?:-dp)?"
    r"(?:\s+at\s+(example|client)\s+level)?(?:\s+(?:for|against)\s+(?:the\s+)?(.+?))?\s*$",
    re.IGNORECASE,
)
_INPUT_RE = re.compile(r"^input privacy\s+(?:against|from)\s+(?:the\s+)?(.+?)\s*$", re.IGNORECASE)


def parse_requirement(text: str | DpRequirement | InputPrivacyRequirement) -> DpRequirement | InputPrivacyRequirement:
    """``"input privacy against the server"`` or ``"(eps <= 3, delta <= 1e-5) at example level for the
    released model"`` as a requirement object (objects pass through)."""
    if not isinstance(text, str):
        return text
    m = _DP_RE.match(text.strip())
    if m:
        return DpRequirement(float(m.group(1)), float(m.group(2)), m.group(3) and m.group(3).lower(), m.group(4))
    m = _INPUT_RE.match(text.strip())
    if m:
        return InputPrivacyRequirement(m.group(1))
    raise ValueError(f"cannot read the requirement {text!r}; write 'input privacy against the server' or "
                     "'(eps <= 3, delta <= 1e-5) at example level for the released model' (level and observer "
                     "optional), or pass a DpRequirement / InputPrivacyRequirement")


def _guarantees(report: Mapping[str, Any] | str | Path) -> list[Mapping[str, Any]]:
    if isinstance(report, str | Path):
        report = json.loads(Path(report).read_text())
    if not isinstance(report, Mapping) or not isinstance(report.get("guarantees"), list):
        raise ValueError("assert_ledger needs the run's report (fl.training.loop.train's return value, or the JSON "
                         "written by `privagg train --report`), with its 'guarantees' list")
    return list(report["guarantees"])


PREPROCESSING_LAYERS = frozenset({"federated-statistics", "public-standardization"})
"""Ledger layers that release something once, before training, that every later round builds on."""


def _preprocessing_cost(gs: Sequence[Mapping[str, Any]], observer: str | None) -> tuple[float, float] | None:
    """(epsilon, delta) the preprocessing releases cost ``observer``; None if one of them is not DP at all.

    They compose with training (basic composition) for every observer; a server that sees each site's
    statistics vector (plain sum) is charged the guarantee's ``epsilon_server``."""
    eps = dlt = 0.0
    for g in gs:
        if g.get("layer") not in PREPROCESSING_LAYERS:
            continue
        params = g.get("params") or {}
        if g.get("layer") == "public-standardization":
            continue  # reads no site
        if not isinstance(params.get("epsilon"), int | float):
            return None  # statistics released without DP: nothing built on them is DP
        server = observer is not None and "server" in observer.lower()
        eps += float(params.get("epsilon_server", params["epsilon"]) if server else params["epsilon"])
        dlt += float(params.get("delta", 0.0))
    return eps, dlt


def _met(r: DpRequirement | InputPrivacyRequirement, gs: Sequence[Mapping[str, Any]]) -> bool:
    """Input privacy: one guarantee states it. DP: one training guarantee meets the unit and observer, and
    its (epsilon, delta) plus the preprocessing's stay within the requirement (they compose)."""
    training = [g for g in gs if g.get("layer") not in PREPROCESSING_LAYERS]
    if isinstance(r, InputPrivacyRequirement):
        return any(r.met_by(g) for g in training)
    pre = _preprocessing_cost(gs, r.observer)
    if pre is None:
        return False
    left = DpRequirement(r.epsilon - pre[0], r.delta - pre[1], r.unit, r.observer)
    return left.epsilon >= 0 and left.delta >= 0 and any(left.met_by(g) for g in training)


def assert_ledger(report: Mapping[str, Any] | str | Path,
                  requires: Sequence[str | DpRequirement | InputPrivacyRequirement]) -> None:
    """Fail unless the report's guarantees (what holds for the released model) meet every requirement.

    A DP requirement needs a training guarantee for its unit and observer whose budget, composed with what
    the preprocessing statistics spent, stays within it; the statistics alone never meet it."""
    reqs = [parse_requirement(r) for r in requires]
    gs = _guarantees(report)
    missing = [r for r in reqs if not _met(r, gs)]
    if missing:
        have = "\n".join(f"    - [{g.get('layer')}] {g.get('property')} -- against: {g.get('against')}" for g in gs)
        need = "\n".join(f"    - {r}" for r in missing)
        raise PrivacyAssertionError(f"the run's ledger lacks {len(missing)} required guarantee(s):\n{need}\n"
                                    f"  it holds:\n{have or '    (none)'}")

