"""Mask expansion: a 32-byte seed -> AES-256-CTR keystream -> uint32/uint64 words.

Each seed is used for exactly one mask (seeds are fresh per round and come out of HKDF with their own
label), so a fixed all-zero initial counter block is safe. The keystream is produced by OpenSSL at
GB/s; words are read with ``np.frombuffer`` -- no per-element Python.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

__all__ = ["SEED_BYTES", "BlockPrf", "MaskExpander", "expand", "keystream"]

SEED_BYTES = 32
_IV = b"\x00" * 16
_CTR0 = modes.CTR(_IV)  # immutable: shared by every expander (saves building it per mask)


def keystream(seed: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` bytes of AES-256-CTR(seed, counter block 0) -- the PRG output."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_IV)).encryptor().update(b"\x00" * nbytes)


def expand(seed: bytes, n: int, dtype: type[np.unsignedinteger] | np.dtype = np.uint32) -> NDArray[np.unsignedinteger]:
    """``n`` little-endian words of ``dtype`` (uint32 or uint64) from ``seed``."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u" or dt.itemsize not in (4, 8):
        raise ValueError(f"masks are uint32 or uint64 words, got {dt}")
    return np.frombuffer(keystream(seed, n * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="))


_ZEROS: dict[int, bytes] = {}


def _zeros(nbytes: int) -> bytes:
    """A shared all-zero plaintext of ``nbytes`` (immutable, so safe to reuse across expanders)."""
    z = _ZEROS.get(nbytes)
    if z is None:
        if len(_ZEROS) > 8:
            _ZEROS.clear()
        z = _ZEROS[nbytes] = bytes(nbytes)
    return z


class MaskExpander:
    """Adds or subtracts many masks of one length into an accumulator, reusing its buffers (fast path).

    Masks are expanded in blocks of at most ``BLOCK_WORDS`` words (the CTR keystream continues across
    blocks, so the mask is the same as one-shot expansion), so expanding a mask of ``n`` words takes
    O(min(n, BLOCK_WORDS)) extra memory, not a second copy of the accumulator (large updates: d = 1e8).
    """

    __slots__ = ("_block", "_buf", "_dtype", "_n", "_zeros")

    BLOCK_WORDS = 1 << 20

    def __init__(self, n: int, dtype: type[np.unsignedinteger] | np.dtype) -> None:
        self._dtype = np.dtype(dtype)
        if self._dtype.kind != "u" or self._dtype.itemsize not in (4, 8):
            raise ValueError(f"masks are uint32 or uint64 words, got {self._dtype}")
        self._n = n
        self._block = min(n, self.BLOCK_WORDS)
        nbytes = self._block * self._dtype.itemsize
        self._zeros = _zeros(nbytes)
        self._buf = bytearray(nbytes + 16)

    def words(self, seed: bytes) -> NDArray[np.unsignedinteger]:
        """The whole mask of ``seed`` (a fresh array of ``n`` words)."""
        acc = np.zeros(self._n, dtype=self._dtype)
        self.add(acc, seed)
        return acc

    def add(self, acc: NDArray[np.unsignedinteger], seed: bytes, sign: int = 1) -> None:
        """``acc += sign * PRG(seed)`` with natural wrap-around in the word size."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
        if acc.shape != (self._n,):
            raise ValueError(f"accumulator has shape {acc.shape}, masks have ({self._n},)")
        enc = Cipher(algorithms.AES(seed), _CTR0).encryptor()
        le = self._dtype.newbyteorder("<")
        op = np.add if sign >= 0 else np.subtract
        for start in range(0, self._n, self._block):
            k = min(self._block, self._n - start)
            nbytes = k * self._dtype.itemsize
            zeros = self._zeros if k == self._block else memoryview(self._zeros)[:nbytes]
            enc.update_into(zeros, self._buf)
            w = np.frombuffer(self._buf, dtype=le, count=k)
            part = acc[start : start + k]
            op(part, w, out=part, casting="unsafe")


class BlockPrf:
    """AES-256 on whole 16-byte blocks under ``key`` (a PRF/PRP keyed from public session data, e.g. the
    round functions of the neighbour graph's Feistel permutation). ECB is right here: every input block is
    a distinct (round, point) pair, and the output is used as a pseudorandom function value, not to hide data."""

    __slots__ = ("_enc",)

    def __init__(self, key: bytes) -> None:
        self._enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def blocks(self, data: bytes) -> bytes:
        """AES_key of each 16-byte block of ``data``."""
        if len(data) % 16:
            raise ValueError(f"BlockPrf takes whole 16-byte blocks, got {len(data)} bytes")
        return self._enc.update(data)

