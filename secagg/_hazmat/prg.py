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
    """Adds or subtracts many masks of one length into an accumulator, reusing its buffers (fast path)."""

    __slots__ = ("_buf", "_dtype", "_n", "_zeros")

    def __init__(self, n: int, dtype: type[np.unsignedinteger] | np.dtype) -> None:
        self._dtype = np.dtype(dtype)
        if self._dtype.kind != "u" or self._dtype.itemsize not in (4, 8):
            raise ValueError(f"masks are uint32 or uint64 words, got {self._dtype}")
        self._n = n
        nbytes = n * self._dtype.itemsize
        self._zeros = _zeros(nbytes)
        self._buf = bytearray(nbytes + 16)

    def words(self, seed: bytes) -> NDArray[np.unsignedinteger]:
        """The mask of ``seed`` as a view of the internal buffer (valid until the next call)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
        enc = Cipher(algorithms.AES(seed), _CTR0).encryptor()
        enc.update_into(self._zeros, self._buf)
        return np.frombuffer(self._buf, dtype=self._dtype.newbyteorder("<"), count=self._n)

    def add(self, acc: NDArray[np.unsignedinteger], seed: bytes, sign: int = 1) -> None:
        """``acc += sign * PRG(seed)`` with natural wrap-around in the word size."""
        w = self.words(seed)
        if sign >= 0:
            np.add(acc, w, out=acc, casting="unsafe")
        else:
            np.subtract(acc, w, out=acc, casting="unsafe")


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

