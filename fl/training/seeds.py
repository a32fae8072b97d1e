"""Where each party of a run gets its randomness: CSPRNGs, seeded only through the named test seam.

Both halves use these, so the client side (training seed, layer noise) and the server side (sampling,
session ids, server-side layer noise) draw exactly what they drew when one object held both roles:
the same labels give the same streams under ``insecure_seeded_randomness``, on one machine or many.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from dp.rng import SecureRandom
from fl.config import TrainConfig
from fl.spec import RandomSource

__all__ = ["LazyRandom", "derive_seed", "party_rng", "session_id"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from the run seed and labels (for public simulation randomness)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class LazyRandom:
    """Creates the CSPRNG on first use: most pipelines draw no randomness on most parties."""

    __slots__ = ("_factory", "_rng")

    def __init__(self, factory: Callable[[], SecureRandom]) -> None:
        self._factory = factory
        self._rng: SecureRandom | None = None

    def _get(self) -> SecureRandom:
        if self._rng is None:
            self._rng = self._factory()
        return self._rng

    def uniform(self, n: int) -> NDArray[np.float64]:
        return self._get().uniform(n)

    def normal(self, n: int, std: float = 1.0) -> NDArray[np.float64]:
        return self._get().normal(n, std)

    def bytes(self, n: int) -> bytes:
        return self._get().bytes(n)


def party_rng(config: TrainConfig, round: int, who: object) -> RandomSource:
    """A CSPRNG for one party's layer randomness (``who``: a client id or ``"server"``)."""
    if config.insecure_seeded_randomness:
        label = f"{config.seed}:{round}:{who}"
        return LazyRandom(lambda: SecureRandom.for_testing(label))
    return LazyRandom(SecureRandom)


def session_id(config: TrainConfig, round: int) -> bytes:
    """The 16-byte id binding one round's protocol messages (random; seeded only through the test seam)."""
    if config.insecure_seeded_randomness:
        return hashlib.sha256(f"session:{config.seed}:{round}".encode()).digest()[:16]
    return os.urandom(16)
