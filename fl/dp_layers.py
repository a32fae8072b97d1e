"""The Gaussian-noise layer of user-level DP-FedAvg (McMahan et al., ICLR 2018).

``Pipeline([Clip(l2=S), GaussianNoise(multiplier=z), Quantize(bits=20)], sum=SecAggPlus(...))``:
each client's update is clipped to L2 norm ``S`` (so one client moves the sum by at most ``S``), and
Gaussian noise with std ``sigma = z * S`` lands on the sum:

- ``placement="server"`` (central DP): the server adds ``N(0, sigma^2)`` to the decoded sum. Whoever sees
  the released model is protected; the server itself sees the noiseless sum.
- ``placement="clients"`` (distributed DP): each of the ``shares`` clients planned for the round adds
  ``N(0, sigma^2 / shares)`` before the secure sum, so the sum already carries ``N(0, sigma^2)`` and the
  server never sees a noiseless sum (with a secure sum, it sees only the sum). If only ``n`` of the
  ``shares`` clients survive, the noise on the sum has std ``sigma * sqrt(n / shares)``; the accountant
  (:mod:`fl.dp_accounting`) charges that weaker noise, so dropouts visibly raise epsilon.

``discrete=True`` draws the noise from the discrete Gaussian (Canonne, Kamath, Steinke 2020) on the grid
``granularity * Z``, after rounding the clipped update onto the same grid with unbiased stochastic
rounding, so every value leaving the client is an exact multiple of the grid step -- the integer-domain
mechanism, which avoids the floating-point Gaussian's least-significant-bit leak (Mironov 2012). The
rounding can grow the L2 norm by up to ``granularity * sqrt(d)``, which :meth:`effective_multiplier`
charges. With a following ``Quantize`` whose step equals ``granularity``, the ring values are the exact
integers; with another step, Quantize's own stochastic rounding (post-processing per client) follows.
The sum of ``n`` discrete Gaussians is close to, but not exactly, a discrete Gaussian (Kairouz, Liu,
Steinke 2021 bound the gap; it is negligible for ``sigma / granularity >= 1``); the accounting uses the
continuous Gaussian's epsilon, as that paper shows is accurate in this regime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from dp.mechanisms import discrete_gaussian
from fl.spec import CompositionError, Guarantee, RandomSource, RoundInfo, ValueSpec

__all__ = ["BudgetView", "GaussianNoise"]


class BudgetView(Protocol):
    """What the layer reads from the accountant to state its guarantee: (epsilon, delta) spent so far."""

    def spent(self) -> tuple[float, float]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class GaussianNoise:
    """Gaussian noise with std ``multiplier * S`` on the sum, ``S`` the preceding ``Clip``'s L2 bound.

    ``shares``: for ``placement="clients"``, how many clients split the noise (default: the spec's
    cohort); set it to the planned clients per round. ``granularity``: the grid step for
    ``discrete=True`` (default ``S / 2**16``). ``budget``: the accountant, so :meth:`guarantees` can state
    the (epsilon, delta) spent (it is not part of the layer's identity).
    """

    multiplier: float
    placement: Literal["server", "clients"] = "server"
    discrete: bool = False
    shares: int | None = None
    granularity: float | None = None
    budget: BudgetView | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.multiplier > 0 and math.isfinite(self.multiplier)):
            raise ValueError(f"GaussianNoise(multiplier=...) needs a positive finite number, got {self.multiplier}")
        if self.placement not in ("server", "clients"):
            raise ValueError(f"placement must be 'server' or 'clients', got {self.placement!r}")
        if self.shares is not None and self.shares < 1:
            raise ValueError(f"shares must be >= 1, got {self.shares}")
        if self.granularity is not None and not (self.granularity > 0 and math.isfinite(self.granularity)):
            raise ValueError(f"granularity must be a positive finite number, got {self.granularity}")

    @property
    def name(self) -> str:
        kind = "discrete-gaussian" if self.discrete else "gaussian"
        where = "distributed" if self.placement == "clients" else "central"
        return f"{kind}-noise(z={self.multiplier:g}, {where})"

    # ---- helpers -----------------------------------------------------------------------------------
    def _clip(self, spec: ValueSpec) -> float:
        if spec.l2_bound is None:
            raise CompositionError("put Clip(l2=...) before GaussianNoise: the noise is calibrated to the clip norm")
        return spec.l2_bound

    def sigma(self, spec: ValueSpec) -> float:
        """Std of the noise on the sum (all shares present)."""
        return self.multiplier * self._clip(spec)

    def n_shares(self, spec: ValueSpec) -> int:
        return self.shares if self.shares is not None else spec.cohort

    def grid(self, spec: ValueSpec) -> float:
        return self.granularity if self.granularity is not None else self._clip(spec) / 2.0**16

    def effective_multiplier(self, spec: ValueSpec, *, included: int | None = None) -> float:
        """Noise std on the sum divided by the sensitivity, for ``included`` surviving shares.

        Central noise is unaffected by dropouts; distributed noise shrinks to ``sqrt(included/shares)``.
        With ``discrete=True`` the sensitivity grows by the rounding to the grid.
        """
        sens = self._clip(spec)
        if self.discrete:
            sens += self.grid(spec) * math.sqrt(spec.size)
        sigma = self.sigma(spec)
        if self.placement == "clients" and included is not None:
            sigma *= math.sqrt(included / self.n_shares(spec))
        return sigma / sens

    def _noise(self, n: int, std: float, spec: ValueSpec, rng: RandomSource) -> NDArray[np.float64]:
        if not self.discrete:
            return rng.normal(n, std)
        g = self.grid(spec)
        return discrete_gaussian(n, sigma=std / g, rng=rng).astype(np.float64) * g

    # ---- the Layer protocol ------------------------------------------------------------------------
    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "real":
            raise CompositionError("GaussianNoise works on real vectors: put it before Quantize")
        if spec.noise_std > 0:
            raise CompositionError("GaussianNoise appears twice: keep one noise layer")
        self._clip(spec)
        if self.placement == "server":
            return spec
        per_client = self.sigma(spec) / math.sqrt(self.n_shares(spec))
        return spec.with_(noise_std=per_client)

    def encode(self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource) -> NDArray[Any]:
        if self.placement == "server":
            return x
        x = np.asarray(x, dtype=np.float64)
        std = self.sigma(spec) / math.sqrt(self.n_shares(spec))
        if self.discrete:
            g = self.grid(spec)
            scaled = x / g
            low = np.floor(scaled)
            x = (low + (rng.uniform(x.size) < (scaled - low))) * g  # unbiased rounding onto the grid
        return x + self._noise(x.size, std, spec, rng)

    def decode(self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource) -> NDArray[Any]:
        if self.placement == "clients":
            return total
        total = np.asarray(total, dtype=np.float64)
        return total + self._noise(total.size, self.sigma(spec), spec, rng)

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        z_eff = self.effective_multiplier(spec, included=info.n_included)
        params: dict[str, Any] = {
            "noise_multiplier": self.multiplier,
            "effective_noise_multiplier": z_eff,
            "l2_sensitivity": self._clip(spec),
            "sigma": self.sigma(spec),
            "placement": self.placement,
            "discrete": self.discrete,
            "sample_rate": info.sample_rate,
            "sampling": info.sampling,
        }
        if self.placement == "clients":
            params["shares"] = self.n_shares(spec)
            params["included"] = info.n_included
        if self.budget is not None:
            eps, delta = self.budget.spent()
            params["epsilon"], params["delta"] = eps, delta
            prop = f"({eps:.4g}, {delta:g})-DP at client level for the released model, over all rounds so far"
        else:
            prop = f"client-level Gaussian mechanism, noise multiplier {z_eff:.4g} per round (see the accountant)"
        assumptions = [
            f"each client's update is clipped to L2 norm {self._clip(spec):g} (add/remove one client)",
            "uniform (unweighted) averaging, so one client's influence is bounded by the clip norm",
            "noise drawn from a CSPRNG; clients are sampled as the accountant assumes",
        ]
        if self.placement == "clients":
            against = "the server and anyone who sees the model (the server never sees a noiseless sum)"
            assumptions += [
                "honest clients add their noise shares; a secure sum hides each noisy update",
                f"epsilon is charged with the {info.n_included} of {self.n_shares(spec)} shares that survived",
            ]
        else:
            against = "anyone who sees the released model (not the server, which adds the noise)"
            assumptions.append("the server adds the noise honestly")
        if not self.discrete:
            assumptions.append("floating-point Gaussian (Mironov 2012 caveat); discrete=True avoids it")
        return (
            Guarantee(layer=self.name, property=prop, against=against, assumptions=tuple(assumptions), params=params),
        )
