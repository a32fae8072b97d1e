"""Privacy accounting for the subsampled Gaussian mechanism, on top of Google's ``dp-accounting``.

Every DP step (a DP-SGD step, or a DP-FedAvg round) is one *event*: a Gaussian mechanism with noise
multiplier ``z`` (noise std / L2 sensitivity), amplified by how its inputs were sampled:

- **Poisson sampling** at rate ``q`` (each record or client joins independently):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add/remove-one neighbours. Both accountants
  (PLD and RDP) support it; PLD is the default because it is tight (RDP is several times looser in the
  federated regime: 100 of 763,430 clients, z=1, 3000 rounds, delta=1e-9 gives RDP 1.057 vs PLD 0.060).
- **Fixed cohort without replacement** (``m`` of ``N``): ``SampledWithoutReplacementDpEvent`` under
  replace-one neighbours (``N`` is public), where replacing one record moves a clipped sum by up to
  *twice* the clip norm, so the event's multiplier is ``z / 2``. Only the RDP accountant
  (Wang-Balle-Kasiviswanathan 2019) handles it; with ``accountant="pld"`` the :class:`Accountant` falls
  back to RDP for these events and says so in :meth:`Accountant.accountant_used`.
- **Everyone, every time** (``q == 1``): a plain ``GaussianDpEvent(z)`` (add/remove-one).

:func:`calibrate_noise` finds the smallest noise multiplier that keeps a planned number of steps within
a target (epsilon, delta), with ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` over
dp-accounting's own accountant (Brent's method; the result is guaranteed within the budget).

**Accounting as data.** :meth:`Accountant.event` is the whole composition as one ``dp_accounting``
DpEvent; :func:`event_to_json` / :func:`event_from_json` write and read it (a whitelist of event classes,
never an import by name), so a report carries exactly what anyone needs to recompute epsilon.

:func:`rounding_sensitivity` is the one L2 sensitivity of a clipped vector after randomized rounding onto
a grid (the discrete Gaussian's input), used by the noise layer and the accountant alike.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from dp.errors import AccountingError, CalibrationError, PrivacyParameterError

__all__ = [
    "Accountant",
    "AccountantName",
    "GaussianStep",
    "Sampling",
    "calibrate_noise",
    "compute_epsilon",
    "event_from_json",
    "event_to_json",
    "gaussian_delta",
    "gaussian_epsilon",
    "make_event",
    "rounding_sensitivity",
]

AccountantName = Literal["pld", "rdp"]
Sampling = Literal["poisson", "fixed"]

PLD_FINE = 1e-4
"""PLD value-discretization interval for one-off epsilon computations (tightest)."""
PLD_FAST = 1e-3
"""Interval for ledgers and calibration: ~10x faster, epsilon pessimistic by well under 1% (still sound)."""

_DELTA_FIX = "choose a delta well below 1 / (number of records or clients), e.g. 1e-5"


@dataclass(frozen=True, slots=True, order=True)
class GaussianStep:
    """One subsampled-Gaussian step, as public data (everything needed to recompute epsilon).

    ``noise_multiplier``: noise std divided by the add/remove-one L2 sensitivity (the clip norm).
    ``sample_rate``: Poisson rate, or ``sample_size / population`` for a fixed cohort.
    ``sampling``: ``"poisson"`` or ``"fixed"`` (uniformly without replacement).
    ``population``/``sample_size``: only for a fixed cohort smaller than the population.
    """

    noise_multiplier: float
    sample_rate: float
    sampling: Sampling = "poisson"
    population: int = 0
    sample_size: int = 0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyParameterError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}; "
                                        "pass the noise std divided by the L2 sensitivity (0 for no noise)")
        if not 0 <= self.sample_rate <= 1:
            raise PrivacyParameterError(f"sample_rate must be in [0, 1], got {self.sample_rate}; pass the fraction of "
                                        "records (or clients) sampled per step")
        if self.sampling not in ("poisson", "fixed"):
            raise AccountingError(f"sampling must be 'poisson' or 'fixed', got {self.sampling!r}; pass 'poisson' "
                                  "(each joins independently) or 'fixed' (a cohort of fixed size)")
        if self.without_replacement and not (0 < self.sample_size <= self.population):
            raise AccountingError(
                "a fixed cohort smaller than the population needs population and sample_size "
                f"(0 < sample_size <= population), got {self.sample_size} of {self.population}; pass both"
            )

    @property
    def without_replacement(self) -> bool:
        """True when the event is a fixed cohort strictly smaller than the population."""
        return self.sampling == "fixed" and self.sample_rate < 1

    def event(self) -> dp_event.DpEvent:
        """The ``dp_accounting`` event for this step."""
        return make_event(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            sampling=self.sampling,
            population=self.population or None,
            sample_size=self.sample_size or None,
        )

    def as_dict(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "sampling": self.sampling,
        }
        if self.without_replacement:
            out["population"] = self.population
            out["sample_size"] = self.sample_size
        return out


def make_event(
    *,
    noise_multiplier: float,
    sample_rate: float,
    sampling: Sampling = "poisson",
    population: int | None = None,
    sample_size: int | None = None,
) -> dp_event.DpEvent:
    """The DP event of one subsampled Gaussian step (see the module docstring for the neighbour relations)."""
    if sample_rate >= 1:
        return dp_event.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        return dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    if population is None or sample_size is None:
        raise AccountingError("sampling='fixed' with sample_rate < 1 needs population= and sample_size= (the "
                              "population size and the cohort size); pass them, or use sampling='poisson'")
    # replace-one: a clipped sum moves by up to 2x the clip norm, so the multiplier is halved
    return dp_event.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_event.GaussianDpEvent(noise_multiplier / 2.0)
    )


class Accountant:
    """A composition of :class:`GaussianStep` events; computes epsilon for a delta (or vice versa).

    Steps are kept as a multiset, so composing thousands of identical rounds costs one self-composition.
    ``accountant="pld"`` (default, tight) or ``"rdp"``. Fixed-cohort-without-replacement steps are only
    supported by RDP; with ``"pld"`` the whole composition is then computed by RDP (an upper bound, so
    still sound) and :attr:`accountant_used` says so.
    """

    def __init__(self, *, accountant: AccountantName = "pld", pld_interval: float = PLD_FAST) -> None:
        if accountant not in ("pld", "rdp"):
            raise AccountingError(f"accountant must be 'pld' or 'rdp', got {accountant!r}; use 'pld' (tight, the "
                                  "default) or 'rdp'")
        self.accountant: AccountantName = accountant
        self.pld_interval = pld_interval
        self._steps: Counter[GaussianStep] = Counter()
        self._cache: dict[tuple[tuple[tuple[GaussianStep, int], ...], float], float] = {}

    def copy(self) -> Accountant:
        other = Accountant(accountant=self.accountant, pld_interval=self.pld_interval)
        other._steps = Counter(self._steps)
        other._cache = self._cache  # same keys mean the same answer
        return other

    def compose(self, step: GaussianStep, count: int = 1) -> None:
        """Add ``count`` repetitions of ``step``."""
        if count < 0:
            raise PrivacyParameterError(f"count must be >= 0, got {count}; pass how many times the step repeats")
        if count:
            self._steps[step] += count

    @property
    def steps(self) -> dict[GaussianStep, int]:
        return dict(self._steps)

    @property
    def total_steps(self) -> int:
        return sum(self._steps.values())

    @property
    def accountant_used(self) -> str:
        """Which accountant actually computes epsilon (``"rdp"`` when PLD cannot handle a step)."""
        if self.accountant == "pld" and any(s.without_replacement for s in self._steps):
            return "rdp (PLD does not support fixed-cohort sampling without replacement)"
        if self._analytic():
            return "pld (exact: composed Gaussians without sampling are one Gaussian)"
        return self.accountant

    def _analytic(self) -> bool:
        """Every step unsampled with noise: the composition is exactly a Gaussian (PLD in closed form)."""
        return (
            self.accountant == "pld"
            and bool(self._steps)
            and all(s.sample_rate >= 1 and s.noise_multiplier > 0 for s in self._steps)
        )

    def _pld_direct(self) -> bool:
        """PLD over Poisson-sampled / unsampled Gaussian steps only: composed from cached per-step PLDs."""
        return self.accountant == "pld" and all(
            s.sampling == "poisson" or s.sample_rate >= 1 for s in self._steps
        )

    def _pld_epsilon(self, delta: float) -> float:
        """Same computation as ``PLDAccountant`` (same PLDs, same self-composition), but the expensive
        per-step PLD is built once per (z, q) and reused across rounds and calibration steps."""
        total = None
        for step, count in sorted(self._steps.items()):
            if step.noise_multiplier == 0:
                return math.inf
            if step.sample_rate == 0:
                continue
            part = _step_pld(step.noise_multiplier, min(1.0, step.sample_rate), self.pld_interval).self_compose(count)
            total = part if total is None else total.compose(part)
        return 0.0 if total is None else float(total.get_epsilon_for_delta(delta))

    def _mu(self) -> float:
        """The Gaussian-DP parameter of an unsampled composition: sqrt(sum count / z^2)."""
        return math.sqrt(sum(c / s.noise_multiplier**2 for s, c in self._steps.items()))

    def _key(self) -> tuple[tuple[GaussianStep, int], ...]:
        return tuple(sorted(self._steps.items()))

    def _build(self) -> PLDAccountant | RdpAccountant:
        wor = any(s.without_replacement for s in self._steps)
        acc: PLDAccountant | RdpAccountant
        if self.accountant == "rdp" or wor:
            relation = NeighboringRelation.REPLACE_ONE if wor else NeighboringRelation.ADD_OR_REMOVE_ONE
            if wor and any(s.sampling == "poisson" and s.sample_rate < 1 for s in self._steps):
                raise AccountingError(
                    "cannot compose Poisson-sampled and fixed-cohort steps in one ledger (different "
                    "neighbour relations); use one client-sampling scheme for the whole run"
                )
            acc = RdpAccountant(neighboring_relation=relation)
        else:
            acc = PLDAccountant(value_discretization_interval=self.pld_interval)
        for step, count in sorted(self._steps.items()):
            acc.compose(dp_event.SelfComposedDpEvent(step.event(), count))
        return acc

    @property
    def neighboring_relation(self) -> str:
        """The neighbour relation the composition is accounted under (what a recomputation must use)."""
        if any(s.without_replacement for s in self._steps):
            return "replace_one"
        return "add_or_remove_one"

    def event(self) -> dp_event.DpEvent:
        """The whole composition as one ``dp_accounting`` event (``NoOpDpEvent`` when empty)."""
        parts = [dp_event.SelfComposedDpEvent(s.event(), c) for s, c in sorted(self._steps.items())]
        if not parts:
            return dp_event.NoOpDpEvent()
        return parts[0] if len(parts) == 1 else dp_event.ComposedDpEvent(parts)

    def state(self) -> list[dict[str, float | int | str]]:
        """The composed steps as JSON-ready data (for checkpoints); :meth:`load_state` restores them."""
        return [{**s.as_dict(), "count": c} for s, c in sorted(self._steps.items())]

    def load_state(self, state: Iterable[dict[str, float | int | str]]) -> None:
        """Replace the composition with ``state`` (as written by :meth:`state`)."""
        steps: Counter[GaussianStep] = Counter()
        for row in state:
            fields = dict(row)
            count = int(fields.pop("count"))
            steps[GaussianStep(**fields)] += count  # type: ignore[arg-type]
        self._steps = steps

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon the accountant certifies at ``delta`` (0 for no steps, inf without noise)."""
        if not 0 < delta < 1:
            raise PrivacyParameterError(f"delta must be in (0, 1), got {delta}; {_DELTA_FIX}")
        if not self._steps:
            return 0.0
        key = (self._key(), delta)
        if key not in self._cache:
            if self._analytic():
                self._cache[key] = gaussian_epsilon(mu=self._mu(), delta=delta)
            elif self._pld_direct():
                self._cache[key] = self._pld_epsilon(delta)
            else:
                with _quiet_absl():
                    self._cache[key] = float(self._build().get_epsilon(delta))
        return self._cache[key]

    def delta(self, epsilon: float) -> float:
        """The smallest delta the accountant certifies at ``epsilon``."""
        if not self._steps:
            return 0.0
        if self._analytic():
            return gaussian_delta(mu=self._mu(), epsilon=epsilon)
        with _quiet_absl():
            return float(self._build().get_delta(epsilon))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting's RDP code logs a warning per skipped order; those are expected, keep them out."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=512)
def _step_pld(z: float, q: float, interval: float) -> pld_lib.PrivacyLossDistribution:
    """The PLD of one Poisson-subsampled Gaussian step (add/remove-one), as ``PLDAccountant`` builds it."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=z,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(*, mu: float, epsilon: float) -> float:
    """Exact delta(epsilon) of a Gaussian mechanism with sensitivity/std ratio ``mu`` (Balle & Wang 2018)."""
    if mu <= 0:
        return 0.0
    return _phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * _phi(-epsilon / mu - mu / 2)


def gaussian_epsilon(*, mu: float, delta: float) -> float:
    """Exact smallest epsilon with ``gaussian_delta(mu, epsilon) <= delta`` (bisection, rounded up)."""
    if gaussian_delta(mu=mu, epsilon=0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu=mu, epsilon=hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mu=mu, epsilon=mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10 * max(1.0, hi):
            break
    return hi


def compute_epsilon(
    *,
    noise_multiplier: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "pld",
    sampling: Sampling = "poisson",
    population: int | None = None,
    pld_interval: float = PLD_FINE,
) -> float:
    """Epsilon after ``steps`` identical subsampled Gaussian steps."""
    acc = Accountant(accountant=accountant, pld_interval=pld_interval)
    acc.compose(_step(noise_multiplier, sample_rate, sampling, population), steps)
    return acc.epsilon(delta)


def _step(z: float, q: float, sampling: Sampling, population: int | None) -> GaussianStep:
    if sampling == "fixed" and q < 1:
        if not population:
            raise AccountingError("sampling='fixed' with sample_rate < 1 needs population= (the population "
                                  "size); pass it, or use sampling='poisson'")
        return GaussianStep(z, q, "fixed", population, max(1, round(q * population)))
    return GaussianStep(z, min(q, 1.0), sampling)


def _check_calibration_target(*, epsilon: float, delta: float, steps: int) -> None:
    """Refuse a calibration target that no noise multiplier could mean: epsilon, delta or steps out of range."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise PrivacyParameterError(f"epsilon must be a positive finite number, got {epsilon}; pass the target "
                                    "budget, e.g. epsilon=1.0")
    if not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta}; {_DELTA_FIX}")
    if steps < 1:
        raise PrivacyParameterError(f"steps must be >= 1, got {steps}; pass the number of planned steps (rounds "
                                    "or DP-SGD steps)")


def _refuse_spent_budget(
    spent: list[tuple[GaussianStep, int]],
    *,
    epsilon: float,
    delta: float,
    accountant: AccountantName,
    pld_interval: float,
) -> None:
    """Raise when the steps already ``spent`` alone reach the target epsilon: no further step could fit."""
    already = Accountant(accountant=accountant, pld_interval=pld_interval)
    for s, c in spent:
        already.compose(s, c)
    if already.epsilon(delta) >= epsilon:
        raise CalibrationError(
            f"the steps already spent use epsilon {already.epsilon(delta):.4g} >= the target {epsilon:g}; "
            "no further step fits: raise the budget (a larger epsilon or delta)"
        )


def calibrate_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "pld",
    sampling: Sampling = "poisson",
    population: int | None = None,
    rtol: float = 2e-3,
    extra: Iterable[tuple[GaussianStep, int]] = (),
    pld_interval: float = PLD_FAST,
) -> float:
    """The smallest noise multiplier (to ``rtol``) whose ``steps`` steps stay within (epsilon, delta).

    Runs ``dp_accounting``'s ``calibrate_dp_mechanism`` (Brent's method, result guaranteed not to exceed
    the budget) over a fresh dp-accounting accountant: PLD with ``pld_interval`` (use the ledger's), or
    RDP; fixed cohorts smaller than the population always go to RDP under replace-one neighbours, as the
    ledger does. ``extra`` adds steps already spent (e.g. earlier rounds).
    """
    _check_calibration_target(epsilon=epsilon, delta=delta, steps=steps)
    spent = [(s, c) for s, c in extra if c]
    probe = _step(1.0, sample_rate, sampling, population)
    wor = probe.without_replacement or any(s.without_replacement for s, _ in spent)

    def fresh() -> PLDAccountant | RdpAccountant:
        if accountant == "rdp" or wor:
            relation = NeighboringRelation.REPLACE_ONE if wor else NeighboringRelation.ADD_OR_REMOVE_ONE
            return RdpAccountant(neighboring_relation=relation)
        return PLDAccountant(value_discretization_interval=pld_interval)

    def event(z: float) -> dp_event.DpEvent:
        mine = dp_event.SelfComposedDpEvent(_step(z, sample_rate, sampling, population).event(), steps)
        return dp_event.ComposedDpEvent([*(dp_event.SelfComposedDpEvent(s.event(), c) for s, c in spent), mine])

    # Without sampling (and nothing spent) the composition is one Gaussian with mu = sqrt(steps)/z: that
    # z meets the budget exactly, and sampling only amplifies, so it is an upper end of the bracket.
    if spent:
        _refuse_spent_budget(spent, epsilon=epsilon, delta=delta, accountant=accountant, pld_interval=pld_interval)
    hi = math.sqrt(steps) / _gaussian_mu(epsilon, delta)
    if wor:
        hi *= 2.0  # replace-one: twice the sensitivity
    lo = hi * min(1.0, sample_rate) / 4
    with _quiet_absl():
        gap = _gap(fresh, event, epsilon, delta)
        while gap(hi) > 0:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise CalibrationError(f"no noise multiplier up to 1e6 reaches epsilon={epsilon} at delta={delta}; "
                                       "relax the target: a larger epsilon or delta, fewer steps or a lower "
                                       "sample rate")
        while gap(lo) <= 0:
            if lo < 1e-3:
                return lo
            hi, lo = lo, lo / 4
        z = mechanism_calibration.calibrate_dp_mechanism(
            fresh, event, epsilon, delta, mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=rtol * lo
        )
    return float(z)


def _gap(
    fresh: Callable[[], PLDAccountant | RdpAccountant],
    event: Callable[[float], dp_event.DpEvent],
    epsilon: float,
    delta: float,
) -> Callable[[float], float]:
    def gap(z: float) -> float:
        return float(fresh().compose(event(z)).get_epsilon(delta)) - epsilon

    return gap


def _gaussian_mu(epsilon: float, delta: float) -> float:
    """The largest Gaussian-DP mu with ``gaussian_delta(mu, epsilon) <= delta`` (geometric bisection)."""
    lo, hi = 1e-6, 1.0
    while gaussian_delta(mu=hi, epsilon=epsilon) <= delta and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gaussian_delta(mu=mid, epsilon=epsilon) <= delta else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return lo


def rounding_sensitivity(*, clip: float, granularity: float, dim: int) -> float:
    """L2 sensitivity of a vector clipped to ``clip`` after unbiased randomized rounding onto ``granularity * Z``.

    Each coordinate moves by less than ``granularity``, so the rounded vector's norm is at most
    ``clip + granularity * sqrt(dim)`` -- a deterministic bound, so no extra delta is charged (Kairouz, Liu,
    Steinke 2021 give a tighter bound that holds with probability ``1 - beta``; it would need ``beta`` added
    to delta). This one function is used by the noise layer and by the accountant.
    """
    if not (clip > 0 and granularity > 0 and dim >= 1):
        raise PrivacyParameterError(f"need clip > 0, granularity > 0, dim >= 1; got {clip}, {granularity}, {dim}; "
                                    "pass a positive clip norm, a positive grid step and the vector length")
    return clip + granularity * math.sqrt(dim)


_EVENTS: dict[str, type[dp_event.DpEvent]] = {
    cls.__name__: cls
    for cls in (
        dp_event.NoOpDpEvent,
        dp_event.GaussianDpEvent,
        dp_event.PoissonSampledDpEvent,
        dp_event.SampledWithoutReplacementDpEvent,
        dp_event.SelfComposedDpEvent,
        dp_event.ComposedDpEvent,
    )
}


def event_to_json(event: dp_event.DpEvent) -> dict[str, Any]:
    """A DpEvent as JSON-ready data: ``{"class_name": ..., <its dp_accounting fields>}``, nested.

    Built from dp-accounting's own ``DpEvent.to_named_tuple`` (its serialization form), minus the
    module path.
    """
    name = type(event).__name__
    if name not in _EVENTS:
        raise AccountingError(f"cannot serialize {name}; supported: {', '.join(sorted(_EVENTS))}; build the "
                              "event from these (e.g. with make_event)")
    return cast(dict[str, Any], _tuple_to_json(event.to_named_tuple()))


def _tuple_to_json(value: Any) -> Any:
    if hasattr(value, "_asdict") and hasattr(value, "class_name"):
        return {k: _tuple_to_json(v) for k, v in value._asdict().items() if k != "module_name"}
    if isinstance(value, list | tuple):
        return [_tuple_to_json(v) for v in value]
    return value


def event_from_json(data: Mapping[str, Any]) -> dp_event.DpEvent:
    """Inverse of :func:`event_to_json`; only the whitelisted event classes, never an import by name."""
    name = data.get("class_name")
    if name not in _EVENTS:
        raise AccountingError(f"unknown DpEvent class {name!r}; expected one of {', '.join(sorted(_EVENTS))}; "
                              "the event was written by another version or altered: recompute it from the run")
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key == "class_name":
            continue
        if isinstance(value, Mapping):
            value = event_from_json(value)
        elif isinstance(value, list):
            value = [event_from_json(v) if isinstance(v, Mapping) else v for v in value]
        fields[key] = value
    return _EVENTS[name](**fields)
