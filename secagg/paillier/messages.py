"""The Paillier round's messages: client -> aggregator input, aggregate to the decryptor, decrypted sum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from secagg.paillier.ciphertexts import CiphertextBatch

__all__ = ["PaillierAggregate", "PaillierDecrypted", "PaillierInput"]


@dataclass(frozen=True, slots=True)
class PaillierInput:
    """Client -> aggregator: the client's encrypted, packed vector."""

    sender: int
    recipient: int
    session: bytes
    round: int
    batch: CiphertextBatch


@dataclass(frozen=True, slots=True)
class PaillierAggregate:
    """Aggregator -> key holder: the homomorphic sum of the included clients' batches."""

    sender: int
    recipient: int
    session: bytes
    round: int
    included: tuple[int, ...]
    batch: CiphertextBatch


@dataclass(frozen=True, slots=True)
class PaillierDecrypted:
    """Key holder -> aggregator: the decrypted sum (signed integers), nothing else."""

    sender: int
    recipient: int
    session: bytes
    round: int
    included: tuple[int, ...]
    total: NDArray[np.int64]
