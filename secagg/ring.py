"""Fixed-point quantization of real vectors into the ring Z_{2^k}, sized so a cohort's sum cannot wrap.

A client value ``x`` with every coordinate in ``[-bound, bound]`` becomes the signed integer
``q = floor(x * scale + u)`` with ``u ~ U[0, 1)`` (stochastic rounding: ``E[q] = x * scale``), where
``scale = (2^(value_bits-1) - 1) / bound``, so ``|q| <= 2^(value_bits-1) - 1``. It is embedded in
``Z_{2^k}`` with ``k = value_bits + ceil(log2(cohort))``: the sum of up to ``cohort`` such values has
magnitude below ``2^(k-1)`` and decodes exactly as a signed integer. A coordinate outside the bound
is an error, never clipped silently: clip first (``fl.layers.Clip``) or raise the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from secagg.errors import OverflowRiskError

__all__ = [
    "BLOCK",
    "MAX_RING_BITS",
    "Quantizer",
    "headroom_bits",
    "is_power_of_two",
    "is_ring_modulus",
    "ring_bits",
    "ring_bits_for",
    "ring_dtype",
    "to_signed",
    "value_bits_for",
]

MAX_RING_BITS = 63
"""Largest ring we use: sums are kept in uint64 and decoded through int64."""

BLOCK = 1 << 18
"""Values per block of the block-wise encoders: O(block) temporaries (2 MiB of float64 each), never O(d)."""


def headroom_bits(cohort: int) -> int:
    """``ceil(log2(cohort))``: the extra bits a sum of ``cohort`` values needs (exact, in integers).

    The one headroom rule: the ring (SecAgg), a Paillier slot and every sizing of a quantizer use it.
    """
    if cohort < 1:
        raise ValueError(f"cohort must be >= 1, got {cohort}")
    return (cohort - 1).bit_length()


def ring_bits_for(value_bits: int, cohort: int) -> int:
    """Bits of the ring that holds the sum of ``cohort`` signed ``value_bits``-bit values without wrap."""
    return value_bits + headroom_bits(cohort)


def value_bits_for(ring_bits: int, cohort: int) -> int:
    """The widest value whose sum over ``cohort`` clients fits ``ring_bits`` (the inverse of the rule)."""
    return ring_bits - headroom_bits(cohort)


def is_power_of_two(m: int) -> bool:
    """Whether ``m`` is 2^k for some k >= 0 (the one power-of-two check)."""
    return m >= 1 and not m & (m - 1)


def is_ring_modulus(modulus: int) -> bool:
    """Whether ``modulus`` is 2^k with 1 <= k <= 64 (a ring whose words fit uint64)."""
    return 2 <= modulus <= (1 << 64) and is_power_of_two(modulus)


def ring_bits(modulus: int, *, what: str = "the modulus") -> int:
    """k for a ring modulus 2^k with 1 <= k <= 64; a clear ``ValueError`` otherwise."""
    if not is_ring_modulus(modulus):
        raise ValueError(f"{what} must be a power of two in [2, 2^64], got {modulus}: size the ring with Quantize")
    return modulus.bit_length() - 1


def ring_dtype(modulus: int) -> type[np.unsignedinteger]:
    """The narrowest word that holds Z_modulus: uint32 for rings up to 2^32, else uint64.

    Encoded updates are stored in it (half the memory of uint64 for the usual 16-bit values); the
    masking machines mask in the same width (:func:`secagg.masking._common.word_dtype`).
    """
    ring_bits(modulus)
    return np.uint32 if modulus <= (1 << 32) else np.uint64


@dataclass(frozen=True, slots=True)
class Quantizer:
    """Stochastic-rounding quantizer for values in ``[-bound, bound]`` summed over ``cohort`` clients."""

    bound: float
    value_bits: int
    cohort: int

    def __post_init__(self) -> None:
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ValueError(f"bound must be a positive finite number, got {self.bound}")
        if not 2 <= self.value_bits <= 48:
            raise ValueError(f"value_bits must be in [2, 48], got {self.value_bits}")
        if self.ring_bits > MAX_RING_BITS:
            raise OverflowRiskError(
                f"{self.value_bits}-bit values summed over {self.cohort} clients need a "
                f"{self.ring_bits}-bit ring, more than {MAX_RING_BITS}; lower value_bits or the cohort size"
            )

    @property
    def ring_bits(self) -> int:
        return ring_bits_for(self.value_bits, self.cohort)

    @property
    def modulus(self) -> int:
        return 1 << self.ring_bits

    @property
    def scale(self) -> float:
        return float((1 << (self.value_bits - 1)) - 1) / self.bound

    def max_error(self, summands: int) -> float:
        """Worst-case absolute error per coordinate of a decoded sum of ``summands`` values."""
        return summands / self.scale

    def encode(
        self, x: NDArray[np.floating], uniform: Callable[[int], NDArray[np.float64]]
    ) -> NDArray[np.uint64]:
        """Quantize one client's vector; ``uniform(n)`` supplies rounding noise in ``[0, 1)`` (a CSPRNG)."""
        x = np.asarray(x, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise OverflowRiskError("cannot quantize NaN or Inf values; reject this update before encoding")
        worst = float(np.max(np.abs(x))) if x.size else 0.0
        if worst > self.bound:
            raise OverflowRiskError(
                f"a coordinate of magnitude {worst:.6g} exceeds the quantization bound {self.bound:.6g}; "
                f"put Clip(l2=...) before Quantize or declare a larger bound (values are never clipped "
                f"silently)"
            )
        u = uniform(x.size)
        q = np.floor(x * self.scale + u).astype(np.int64)
        # Float rounding can push |x| = bound one step past the largest value (x * scale rounds up, then
        # u adds almost 1): clamp in integer space so no value reaches 2^(value_bits-1) and wraps.
        top = (1 << (self.value_bits - 1)) - 1
        np.clip(q, -top, top, out=q)
        return q.view(np.uint64) & np.uint64(self.modulus - 1)

    def encode_into(
        self, x: NDArray[np.floating], uniform: Callable[[int], NDArray[np.float64]], out: NDArray[np.unsignedinteger],
        *, block: int = BLOCK,
    ) -> NDArray[np.unsignedinteger]:
        """:meth:`encode` ``x`` block by block into ``out`` (uint32 or uint64 words): O(block) temporaries.

        ``uniform`` is called once per block, in order; for a stream-consistent source (``uniform(a)`` then
        ``uniform(b)`` equals ``uniform(a + b)``, as :class:`dp.rng.SecureRandom`) the words are those
        :meth:`encode` gives, bit for bit. Clamping stays in integer space, block by block.
        """
        x = np.asarray(x).ravel()
        if out.shape != x.shape or out.dtype.kind != "u" or out.dtype.itemsize * 8 < self.ring_bits:
            raise ValueError(
                f"out must be an unsigned array of shape {x.shape} with >= {self.ring_bits} bits per word, "
                f"got {out.dtype} {out.shape}: allocate it with secagg.ring.ring_dtype(modulus)"
            )
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        for start in range(0, x.size, block):
            stop = min(x.size, start + block)
            out[start:stop] = self.encode(x[start:stop], uniform)
        return out

    def decode(self, total: NDArray[np.unsignedinteger], summands: int) -> NDArray[np.float64]:
        """Decode a ring sum of ``summands`` encoded values back to reals."""
        if summands > self.cohort:
            raise OverflowRiskError(
                f"the sum has {summands} summands but the ring was sized for {self.cohort}; "
                f"size the quantizer for the whole cohort"
            )
        out = to_signed(np.asarray(total, dtype=np.uint64), self.ring_bits).astype(np.float64)
        out /= self.scale  # in place: one float64 copy of the sum, not two
        return out


def to_signed(words: NDArray[np.uint64], bits: int) -> NDArray[np.int64]:
    """Two's-complement value of each ``bits``-bit ring element (``1 <= bits <= 64``), without overflow.

    Shifts the ring's sign bit to bit 63 and shifts back arithmetically: exact for every ring up to 2^64
    (subtracting the modulus in int64, as before, overflowed for a 2^63 ring).
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"ring bits must be in [1, 64], got {bits}")
    shift = np.uint64(64 - bits)
    return (np.asarray(words, dtype=np.uint64) << shift).view(np.int64) >> np.int64(64 - bits)
