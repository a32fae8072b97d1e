"""A cryptographically secure random source for DP noise and stochastic rounding.

NumPy's generators (PCG64, MT19937) are predictable from their output, so noise drawn from them can be
subtracted by anyone who recovers the state. :class:`SecureRandom` expands a 32-byte key with AES-256 in
CTR mode (from ``cryptography``) and turns the keystream into uniforms (53 bits each) and Gaussians
(Box–Muller). The key comes from ``os.urandom`` unless a test passes one through the named seam
:meth:`SecureRandom.for_testing`.

Floating-point caveat (Mironov 2012): a Gaussian sample in floating point does not hit every double, and
its low-order bits can leak the un-noised value; the discrete Gaussian in :mod:`dp.mechanisms` avoids
this on integer domains.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from dp.errors import InputError

__all__ = ["SecureRandom"]


class SecureRandom:
    """AES-256-CTR keystream turned into numbers. Not thread-safe; one instance per party."""

    __slots__ = ("_enc",)

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise InputError(f"SecureRandom needs a 32-byte key, got {len(key)} bytes; pass key=None for a fresh "
                             "os.urandom key (SecureRandom.for_testing(seed) in tests)")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()

    @classmethod
    def for_testing(cls, seed: int | str) -> SecureRandom:
        """Deterministic instance for tests and reproducible simulations; never use it in production."""
        return cls(hashlib.sha256(f"privagg-test-seam:{seed}".encode()).digest())

    def bytes(self, n: int) -> bytes:
        """``n`` keystream bytes."""
        return self._enc.update(b"\x00" * n)

    def uint64(self, n: int) -> NDArray[np.uint64]:
        return np.frombuffer(self.bytes(8 * n), dtype=np.uint64).copy()

    def uniform(self, n: int) -> NDArray[np.float64]:
        """``n`` uniforms in ``[0, 1)`` with 53 random bits each."""
        return (self.uint64(n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def normal(self, n: int, std: float = 1.0) -> NDArray[np.float64]:
        """``n`` samples of N(0, std^2) by Box–Muller on CSPRNG uniforms."""
        m = (n + 1) // 2
        u1 = 1.0 - self.uniform(m)  # (0, 1]: log is finite
        u2 = self.uniform(m)
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * np.pi * u2
        z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
        return z * std if std != 1.0 else z
