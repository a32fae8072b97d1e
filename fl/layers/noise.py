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
  (:mod:`fl.privacy.accounting`) charges that weaker noise, so dropouts visibly raise epsilon.

``discrete=True`` draws the noise from the discrete Gaussian (Canonne, Kamath, Steinke 2020) on the grid
``granularity * Z``, after rounding the clipped update onto the same grid with unbiased stochastic
rounding, so every value leaving the client is an exact multiple of the grid step -- the integer-domain
mechanism, which avoids the floating-point Gaussian's least-significant-bit leak (Mironov 2012). The
rounding can grow the L2 norm by up to ``granularity * sqrt(d)``: :meth:`GaussianNoise.sensitivity`
(:func:`dp.accounting.rounding_sensitivity`) is that bound, and the accountant charges it. With a
following ``Quantize`` whose step equals ``granularity``, the ring values are the exact integers; with
another step, Quantize's own stochastic rounding (post-processing per client) follows.
The sum of ``n`` discrete Gaussians is close to, but not exactly, a discrete Gaussian (Kairouz, Liu,
Steinke 2021 bound the gap; it is negligible for ``sigma / granularity >= 1``); the accounting uses the
continuous Gaussian's epsilon, as that paper shows is accurate in this regime.

**Observers.** :meth:`GaussianNoise.steps` is the round's mechanism, as accounting data, for each observer
the layer protects (:data:`RELEASED`: whoever sees the released model and report, who does not know the
client sample, so sampling amplifies; :data:`SERVER`, for distributed noise only: the server knows which
clients were sampled, so no amplification, in every round a client could have been in). The loop draws
the sample from a CSPRNG and releases only participant counts, never the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from dp.mechanisms import discrete_gaussian
from fl.blocks import Blocks
from fl.spec import CompositionError, Guarantee, RandomSource, RoundInfo, ValueSpec

if TYPE_CHECKING:  # dp.accounting loads dp-accounting and scipy: only the accounting methods import it
    from dp.accounting import GaussianStep

__all__ = ["RELEASED", "SERVER", "GaussianNoise", "sampled_step"]

RELEASED = "released model"
"""Observer: anyone who sees the released model and the report (not the client sample)."""
SERVER = "server"
"""Observer: the server, which chose the client sample and sees the (noisy) sum."""


def sampled_step(info: RoundInfo, z: float) -> GaussianStep:
    """The round's Gaussian with multiplier ``z``, amplified by the client sampling ``info`` describes.

    Poisson sampling: add/remove-one neighbours. A fixed cohort of ``m`` of ``N``: sampling without
    replacement under replace-one neighbours (``N`` public). Everyone every round: the plain Gaussian.
    """
    from dp.accounting import GaussianStep

    q = min(1.0, info.sample_rate)
    if info.sampling == "poisson":
        return GaussianStep(z, q, "poisson")
    if q >= 1:
        return GaussianStep(z, 1.0, "fixed")
    return GaussianStep(z, q, "fixed", info.population, len(info.planned))


@dataclass(frozen=True, slots=True, kw_only=True)
class GaussianNoise:
    """Gaussian noise with std ``multiplier * S`` on the sum, ``S`` the preceding ``Clip``'s L2 bound.

    ``shares``: for ``placement="clients"``, how many clients split the noise (default: the spec's
    cohort); set it to the planned clients per round. ``granularity``: the grid step for
    ``discrete=True`` (default ``S / 2**16``). The layer holds no accountant: it reports its mechanism
    per round (:meth:`steps`) and the ledger (:mod:`fl.privacy.accounting`) composes and states epsilon.
    """

    multiplier: float
    placement: Literal["server", "clients"] = "server"
    discrete: bool = False
    shares: int | None = None
    granularity: float | None = None

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

    def sensitivity(self, spec: ValueSpec) -> float:
        """L2 sensitivity of one client's contribution: the clip norm, plus the grid rounding if discrete."""
        if self.discrete:
            from dp.accounting import rounding_sensitivity

            return rounding_sensitivity(clip=self._clip(spec), granularity=self.grid(spec), dim=spec.size)
        return self._clip(spec)

    def effective_multiplier(self, spec: ValueSpec, *, included: int | None = None) -> float:
        """Noise std on the sum divided by the sensitivity, for ``included`` surviving shares.

        Central noise is unaffected by dropouts; distributed noise shrinks to ``sqrt(included/shares)``.
        With ``discrete=True`` the sensitivity grows by the rounding to the grid (:meth:`sensitivity`).
        """
        sigma = self.sigma(spec)
        if self.placement == "clients" and included is not None:
            sigma *= math.sqrt(included / self.n_shares(spec))
        return sigma / self.sensitivity(spec)

    def steps(self, spec: ValueSpec, info: RoundInfo, *, sum_hides_updates: bool = True) -> dict[str, GaussianStep]:
        """This round's mechanism for each observer the layer protects (what the ledger composes).

        :data:`RELEASED`: the noise on the sum, amplified by the (secret) client sampling. :data:`SERVER`
        (distributed noise only): the server knows the sample, so the same Gaussian unamplified -- or, if
        the sum does not hide single updates (``sum_hides_updates=False``), one update with one noise share.
        """
        from dp.accounting import GaussianStep

        z_sum = self.effective_multiplier(spec, included=info.n_included)
        out = {RELEASED: sampled_step(info, z_sum)}
        if self.placement == "clients":
            one_share = self.sigma(spec) / math.sqrt(self.n_shares(spec)) / self.sensitivity(spec)
            out[SERVER] = GaussianStep(z_sum if sum_hides_updates else one_share, 1.0)
        return out

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
        return self._noisy(x, spec, rng)

    def encode_blocks(self, x: Blocks, spec: ValueSpec, rng: RandomSource) -> Blocks:
        """Block-wise :meth:`encode`: each block gets its rounding and its noise share as it is read.

        The noise of every coordinate is still drawn fresh from the client's CSPRNG with the same std, so
        the distribution is exactly that of :meth:`encode` (the same numbers for a vector of one block).
        """
        if self.placement == "server":
            return x
        return x.map(lambda b: self._noisy(b, spec, rng), dtype=np.float64, replayable=False)

    def _noisy(self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource) -> NDArray[np.float64]:
        """``x`` (rounded onto the grid if discrete) plus this client's noise share."""
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
            "clip": self._clip(spec),
            "l2_sensitivity": self.sensitivity(spec),
            "sigma": self.sigma(spec),
            "placement": self.placement,
            "discrete": self.discrete,
            "sample_rate": info.sample_rate,
            "sampling": info.sampling,
        }
        if self.discrete:
            params["granularity"] = self.grid(spec)
        if self.placement == "clients":
            params["shares"] = self.n_shares(spec)
            params["included"] = info.n_included
        prop = (
            f"client-level Gaussian mechanism, noise multiplier {z_eff:.4g} per round on the sum; the ledger's "
            "dp-fedavg entries state epsilon per observer"
        )
        if info.sampling == "fixed" and info.sample_rate < 1:
            neighbours = (
                f"replace-one neighbours: one client's data replaced by another's (a fixed cohort of "
                f"{len(info.planned)} of {info.population} clients, sampled without replacement)"
            )
        else:
            neighbours = "add/remove-one neighbours: one client's data present or absent"
        assumptions = [
            f"each client's update is clipped to L2 norm {self._clip(spec):g}; {neighbours}",
            "uniform (unweighted) averaging, so one client's influence is bounded by the clip norm",
            "noise and the client sample drawn from a CSPRNG; the sample is never released (counts only)",
            "public: the number of clients planned and included each round, each client's sample count n_k, "
            "the population size",
        ]
        if self.discrete:
            assumptions.append(
                f"grid rounding charged as sensitivity {self.sensitivity(spec):.6g} = clip + granularity * sqrt(d)"
            )
        if self.placement == "clients":
            against = "the server (which knows the sample: no amplification) and anyone who sees the model"
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
