"""Bit-level packing of many signed integers into one Paillier plaintext (BatchCrypt, USENIX ATC 2020).

A vector of signed ``value_bits``-bit integers ``v`` (``|v| <= 2^(value_bits-1) - 1``) is offset-encoded
as ``e = v + B`` with ``B = 2^(value_bits-1) - 1``, so ``0 <= e <= 2B = 2^value_bits - 2``. Each
plaintext holds ``slots`` such values side by side, slot ``i`` at bit ``i * slot_bits`` (little end
first), where ``slot_bits = value_bits + ceil(log2 K)`` leaves room for the sum of ``K`` encodings:
``K * 2B < 2^slot_bits``, so adding up to ``K`` plaintexts never carries from one slot into the next and
the sum of ``k <= K`` vectors decodes as ``slot - k * B``.

Everything here is plain integer/numpy work (no key, no randomness): the plan (:class:`PackingPlan`, the
layout every party derives from the key size) and the bit-level packing. The crypto lives in
:mod:`secagg.paillier._fast` and :mod:`secagg.paillier.ciphertexts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from secagg.errors import CodecError, OverflowRiskError
from secagg.ring import ring_bits_for

if TYPE_CHECKING:
    from secagg.paillier.keys import PaillierPublicKey

__all__ = ["MARGIN_BITS", "PackingPlan", "pack", "slot_bits_for", "unpack"]

MARGIN_BITS = 16
"""Bits kept free below ``n``: the largest packed sum stays under ``2^(|n| - 1 - MARGIN_BITS)``."""

_ROWS_PER_STEP = 512  # bound the temporaries (rows * slots * slot_bits bytes)


def slot_bits_for(value_bits: int, summands: int) -> int:
    """Width of one slot holding the sum of ``summands`` offset-encoded ``value_bits``-bit values."""
    return ring_bits_for(value_bits, summands)


def pack(encoded: NDArray[np.uint64], *, slots: int, slot_bits: int) -> list[int]:
    """Pack ``encoded`` (length a multiple of ``slots``, each ``< 2^slot_bits``) into plaintext integers.

    Row ``j`` of ``encoded.reshape(-1, slots)`` becomes ``sum_i encoded[j, i] << (i * slot_bits)``.
    """
    enc = np.ascontiguousarray(encoded, dtype=np.uint64)
    if enc.size % slots:
        raise ValueError(f"pack needs a multiple of {slots} values, got {enc.size}")
    rows = enc.reshape(-1, slots)
    shifts = np.arange(slot_bits, dtype=np.uint64)
    width = slots * slot_bits
    pad = (-width) % 8
    out: list[int] = []
    for start in range(0, rows.shape[0], _ROWS_PER_STEP):
        block = rows[start : start + _ROWS_PER_STEP]
        bits = ((block[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(block.shape[0], width)
        if pad:
            bits = np.concatenate([bits, np.zeros((block.shape[0], pad), dtype=np.uint8)], axis=1)
        packed = np.packbits(bits, axis=1, bitorder="little")
        out += [int.from_bytes(row.tobytes(), "little") for row in packed]
    return out


def unpack(plaintexts: list[int], *, slots: int, slot_bits: int) -> NDArray[np.uint64]:
    """Inverse of :func:`pack`: ``len(plaintexts) * slots`` slot values (each ``< 2^slot_bits``).

    The caller must have checked ``0 <= m < 2^(slots * slot_bits)`` for every plaintext.
    """
    width = slots * slot_bits
    nbytes = (width + 7) // 8
    weights = np.uint64(1) << np.arange(slot_bits, dtype=np.uint64)
    out = np.empty((len(plaintexts), slots), dtype=np.uint64)
    for start in range(0, len(plaintexts), _ROWS_PER_STEP):
        chunk = plaintexts[start : start + _ROWS_PER_STEP]
        raw = np.frombuffer(b"".join(int(m).to_bytes(nbytes, "little") for m in chunk), dtype=np.uint8)
        bits = np.unpackbits(raw.reshape(len(chunk), nbytes), axis=1, bitorder="little")[:, :width]
        vals = bits.reshape(len(chunk), slots, slot_bits).astype(np.uint64) * weights
        out[start : start + len(chunk)] = vals.sum(axis=2, dtype=np.uint64)
    return out.reshape(-1)


@dataclass(frozen=True, slots=True)
class PackingPlan:
    """How signed ``value_bits``-bit integers from up to ``summands`` parties fit into plaintexts.

    ``|v| <= 2^(value_bits-1) - 1``; slot width ``value_bits + ceil(log2 summands)``; ``slots`` per
    plaintext from the key size minus ``MARGIN_BITS`` (the safety margin below ``n``; a constant, so that
    every party derives the same layout from the key and the batch header alone).
    """

    key_bits: int
    value_bits: int
    summands: int

    MARGIN_BITS: ClassVar[int] = MARGIN_BITS

    def __post_init__(self) -> None:
        if not 2 <= self.value_bits <= 62:
            raise OverflowRiskError(f"value_bits must be in [2, 62], got {self.value_bits}")
        if self.summands < 1:
            raise OverflowRiskError(f"summands must be >= 1, got {self.summands}")
        if self.slot_bits > 63:
            raise OverflowRiskError(
                f"{self.value_bits}-bit values summed over {self.summands} parties need {self.slot_bits}-bit "
                f"slots (more than 63); lower value_bits or the cohort size"
            )
        if self.slots < 1:
            raise OverflowRiskError(
                f"a {self.key_bits}-bit key cannot hold one {self.slot_bits}-bit slot; use a larger key"
            )

    @classmethod
    def for_key(cls, public: PaillierPublicKey, *, value_bits: int, summands: int) -> PackingPlan:
        return cls(public.bits, value_bits, summands)

    @property
    def slot_bits(self) -> int:
        return slot_bits_for(self.value_bits, self.summands)

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return (self.key_bits - 1 - MARGIN_BITS) // self.slot_bits

    @property
    def offset(self) -> int:
        """``B = 2^(value_bits-1) - 1``: the largest magnitude allowed, added to make values non-negative."""
        return (1 << (self.value_bits - 1)) - 1

    def ciphertexts(self, size: int) -> int:
        """Ciphertexts needed for ``size`` values."""
        return -(-size // self.slots)

    def encode(self, values: NDArray[Any]) -> NDArray[np.uint64]:
        """Offset-encode signed integers, padded with zeros to whole plaintexts; ``OverflowRiskError`` if a
        value is out of range (checked before any encryption)."""
        v = np.asarray(values)
        if v.ndim != 1:
            raise ValueError(f"expected a 1-D vector of integers, got shape {v.shape}")
        if v.dtype.kind not in "iu":
            raise OverflowRiskError(
                f"Paillier packing encrypts integers, got dtype {v.dtype}; quantize first (fl.layers.Quantize)"
            )
        if v.size:
            lo, hi = int(v.min()), int(v.max())
            if hi > self.offset or lo < -self.offset:
                raise OverflowRiskError(
                    f"value {hi if hi > self.offset else lo} is outside the packed range "
                    f"+-{self.offset} (signed {self.value_bits}-bit); quantize with fewer bits or plan a "
                    f"larger value_bits -- nothing was encrypted"
                )
        out = np.zeros(self.ciphertexts(v.size) * self.slots, dtype=np.uint64)
        out[: v.size] = (v.astype(np.int64) + self.offset).astype(np.uint64)
        return out

    def decode(self, slot_sums: NDArray[np.uint64], *, size: int, count: int) -> NDArray[np.int64]:
        """Signed sums of ``count`` vectors from raw slot sums; ``CodecError`` if a slot exceeds the
        headroom of ``count`` summands or a padding slot is non-zero (tampering or a miscounted sum)."""
        top = np.uint64(count * 2 * self.offset)
        if slot_sums.size and int(slot_sums[:size].max(initial=0)) > int(top):
            raise CodecError(
                f"a decrypted slot exceeds the headroom of {count} summand(s): the aggregate was tampered "
                f"with or holds more summands than it claims; discard this round"
            )
        if np.any(slot_sums[size:]):
            raise CodecError("a padding slot of the decrypted aggregate is non-zero: the aggregate was tampered with")
        return slot_sums[:size].astype(np.int64) - np.int64(count * self.offset)
