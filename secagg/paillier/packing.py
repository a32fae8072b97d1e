"""Bit-level packing of many signed integers into one Paillier plaintext (BatchCrypt, USENIX ATC 2020).

A vector of signed ``value_bits``-bit integers ``v`` (``|v| <= 2^(value_bits-1) - 1``) is offset-encoded
as ``e = v + B`` with ``B = 2^(value_bits-1) - 1``, so ``0 <= e <= 2B = 2^value_bits - 2``. Each
plaintext holds ``slots`` such values side by side, slot ``i`` at bit ``i * slot_bits`` (little end
first), where ``slot_bits = value_bits + ceil(log2 K)`` leaves room for the sum of ``K`` encodings:
``K * 2B < 2^slot_bits``, so adding up to ``K`` plaintexts never carries from one slot into the next and
the sum of ``k <= K`` vectors decodes as ``slot - k * B``.

Everything here is plain integer/numpy work (no key, no randomness); the crypto lives in
:mod:`secagg.paillier._fast`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from secagg.ring import ring_bits_for

__all__ = ["pack", "slot_bits_for", "unpack"]

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
