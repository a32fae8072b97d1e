"""The SecAgg / SecAgg+ protocol messages: one frozen dataclass per protocol step.

Every message names its ``sender`` and ``recipient`` (client ids, or :data:`secagg.machine.SERVER`),
and the ``session`` and ``round`` it belongs to, so replays into another round or session are refused.
Lists of ids are sorted tuples; per-id payloads are parallel tuples (simple to encode on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AdvertiseKeys",
    "ConsistencyCheck",
    "ConsistencySignature",
    "KeyDirectory",
    "MaskedInput",
    "SecAggMessage",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
]


@dataclass(frozen=True, slots=True)
class AdvertiseKeys:
    """Client -> server (phase ``advertise``): two X25519 public keys, signed in authenticated mode.

    ``c_pk`` encrypts the shares sent to this client; ``s_pk`` derives its pairwise masks.
    ``b_commit``: SHA-256 commitment to the self-mask seed b (checked when the server reconstructs b).
    ``signature``: Ed25519 over (session, round, sender, c_pk, s_pk, b_commit), empty when unauthenticated.
    """

    sender: int
    recipient: int
    session: bytes
    round: int
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class KeyDirectory:
    """Server -> client: the advertised keys of the client's neighbourhood (itself included).

    ``cohort``: every client sampled for the round, from which the client recomputes the neighbour graph
    (unsigned: a client refuses a cohort smaller than its own configured ``min_cohort``).
    ``b_commits``: the listed clients' self-mask commitments (part of their signed advertisements).
    """

    sender: int
    recipient: int
    session: bytes
    round: int
    cohort: tuple[int, ...]
    ids: tuple[int, ...]
    c_pks: tuple[bytes, ...]
    s_pks: tuple[bytes, ...]
    signatures: tuple[bytes, ...]
    b_commits: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class ShareKeys:
    """Client -> server (phase ``share``): one AES-GCM ciphertext of Shamir shares per neighbour.

    ``signature``: Ed25519 over (session, round, sender, phase, digest of the fields) in authenticated mode.
    """

    sender: int
    recipient: int
    session: bytes
    round: int
    recipients: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class ShareDelivery:
    """Server -> client: the ciphertexts addressed to the client by neighbours who shared their keys."""

    sender: int
    recipient: int
    session: bytes
    round: int
    senders: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Client -> server (phase ``masked``): y = x + PRG(b) + sum of +-pairwise masks, in Z_2^k.

    ``y`` is uint32 when k <= 32, else uint64. ``signature``: Ed25519 over (session, round, sender, phase,
    SHA-256 of y's words) in authenticated mode; otherwise integrity comes from the transport (TLS).
    """

    sender: int
    recipient: int
    session: bytes
    round: int
    y: NDArray[np.uint32] | NDArray[np.uint64]
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class ConsistencyCheck:
    """Server -> client (authenticated mode): the survivors of the masked-input phase, to be signed."""

    sender: int
    recipient: int
    session: bytes
    round: int
    survivors: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConsistencySignature:
    """Client -> server (phase ``consistency``): Ed25519 signature over (session, round, survivors)."""

    sender: int
    recipient: int
    session: bytes
    round: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Server -> client: whose self-mask share (``alive``) and whose key share (``dropped``) it needs.

    In authenticated mode ``signers``/``signatures`` carry the neighbours' consistency signatures over
    the survivor list; they are empty otherwise.
    """

    sender: int
    recipient: int
    session: bytes
    round: int
    alive: tuple[int, ...]
    dropped: tuple[int, ...]
    signers: tuple[int, ...] = ()
    signatures: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class UnmaskResponse:
    """Client -> server (phase ``unmask``): shares of b_v for the alive ids, of s_v^SK for the dropped ids.

    ``signature``: Ed25519 over (session, round, sender, phase, digest of the fields) in authenticated mode.
    """

    sender: int
    recipient: int
    session: bytes
    round: int
    alive: tuple[int, ...]
    b_shares: tuple[bytes, ...]
    dropped: tuple[int, ...]
    s_shares: tuple[bytes, ...]
    signature: bytes = b""


SecAggMessage = (
    AdvertiseKeys
    | KeyDirectory
    | ShareKeys
    | ShareDelivery
    | MaskedInput
    | ConsistencyCheck
    | ConsistencySignature
    | UnmaskRequest
    | UnmaskResponse
)
