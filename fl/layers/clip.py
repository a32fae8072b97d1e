"""Layers that shape a client's update before it is summed: clipping and quantization.

Differential-privacy noise layers live in :mod:`fl.layers.noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dp.mechanisms import clip_l2
from fl.blocks import Blocks
from fl.spec import CompositionError, Guarantee, RandomSource, RoundInfo, ValueSpec
from secagg.errors import OverflowRiskError
from secagg.ring import MAX_RING_BITS, Quantizer, ring_dtype

__all__ = ["Clip", "Quantize", "clip_l2"]


@dataclass(frozen=True, slots=True)
class Clip:
    """Clip each client's update to L2 norm ``l2`` (the sensitivity that DP noise is calibrated to)."""

    l2: float

    def __post_init__(self) -> None:
        if not (self.l2 > 0 and math.isfinite(self.l2)):
            raise ValueError(f"Clip(l2=...) needs a positive finite norm, got {self.l2}")

    @property
    def name(self) -> str:
        return f"clip(l2={self.l2:g})"

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "real":
            raise CompositionError("Clip works on real vectors: put it before Quantize")
        if spec.noise_std > 0:
            raise CompositionError("Clip after noise voids the noise calibration: put Clip before the noise layer")
        bound = self.l2 if spec.l2_bound is None else min(self.l2, spec.l2_bound)
        return spec.with_(l2_bound=bound)

    def encode(self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource) -> NDArray[Any]:
        return clip_l2(x, self.l2)

    def encode_blocks(self, x: Blocks, spec: ValueSpec, rng: RandomSource) -> Blocks:
        """Block-wise :meth:`encode`: one pass for the norm, then each block scaled as it is read."""
        x = x.replayable_form()
        norm = x.l2_norm()
        if not math.isfinite(norm):
            raise ValueError("cannot clip a vector with NaN or Inf entries; reject it before clipping")
        if norm <= self.l2:
            return x.map(lambda b: np.asarray(b, dtype=np.float64), dtype=np.float64)
        factor = self.l2 / norm  # the very factor clip_l2 applies
        return x.map(lambda b: np.asarray(b, dtype=np.float64) * factor, dtype=np.float64)

    def decode(self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource) -> NDArray[Any]:
        return total

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return (
            Guarantee(
                layer=self.name,
                property=f"each client's contribution has L2 norm <= {self.l2:g} (bounded sensitivity)",
                against="no one by itself: it bounds one client's influence (DP noise, if any, is calibrated to it)",
                params={"l2": self.l2},
            ),
        )


@dataclass(frozen=True, slots=True)
class Quantize:
    """Stochastic rounding into Z_{2^k}, with headroom so the whole cohort's sum never wraps.

    ``bits`` is the width of one client's signed value; the ring gets ``ceil(log2(cohort))`` more bits.
    The coordinate bound comes from the preceding ``Clip`` (``l2``) or an explicit ``bound``.
    """

    bits: int = 16
    bound: float | None = None

    @property
    def name(self) -> str:
        return f"quantize(bits={self.bits})"

    def quantizer(self, spec: ValueSpec) -> Quantizer:
        bound = self.bound if self.bound is not None else spec.coord_bound
        if spec.noise_std > 0 and self.bound is None:
            # distributed noise: leave room for 8 sigma of client noise (P[exceed] < 1e-15 per coordinate)
            base = spec.coord_bound
            bound = None if base is None else base + 8.0 * spec.noise_std
        if bound is None:
            raise CompositionError(
                "Quantize needs a bound on each coordinate: put Clip(l2=...) before it or pass Quantize(bound=...)"
            )
        return Quantizer(bound=bound, value_bits=self.bits, cohort=spec.cohort)

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "real":
            raise CompositionError("Quantize expects real vectors; it appears twice or after another ring layer")
        try:
            q = self.quantizer(spec)
        except OverflowRiskError as exc:
            raise CompositionError(
                f"{exc}; the ring may have at most {MAX_RING_BITS} bits (lower Quantize(bits=...))"
            ) from exc
        return spec.with_(domain="ring", modulus=q.modulus, value_bits=self.bits, linf_bound=None, l2_bound=None)

    def encode(self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource) -> NDArray[Any]:
        return self.quantizer(spec).encode(x, rng.uniform)

    def encode_blocks(self, x: Blocks, spec: ValueSpec, rng: RandomSource) -> Blocks:
        """Block-wise :meth:`encode` into ring words (uint32 when the ring fits): rounding noise per block."""
        q = self.quantizer(spec)
        return x.map(lambda b: q.encode(b, rng.uniform), dtype=ring_dtype(q.modulus), replayable=False)

    def decode(self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource) -> NDArray[Any]:
        return self.quantizer(spec).decode(total, info.n_included)

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        q = self.quantizer(spec)
        return (
            Guarantee(
                layer=self.name,
                property=(
                    f"exact sum in Z_2^{q.ring_bits} for up to {spec.cohort} clients (no wrap-around); "
                    f"decoded error <= {q.max_error(info.n_included):.3g} per coordinate"
                ),
                against="not a privacy layer (correctness of the secure sum)",
                params={"value_bits": self.bits, "ring_bits": q.ring_bits, "bound": q.bound},
            ),
        )
