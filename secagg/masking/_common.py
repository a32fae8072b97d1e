"""Helpers shared by the SecAgg client and server: labels, contexts, signed payloads, word types."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Final

import numpy as np

from secagg._hazmat import aead, commit, shamir
from secagg.masking.messages import MaskedInput, ShareKeys, UnmaskResponse
from secagg.ring import ring_bits as ring_bits  # the one rule, for client and server

__all__: list[str] = []

SHARE_KEY_LABEL: Final = b"privagg/secagg/share-encryption-key/v1"
PAIR_MASK_LABEL: Final = b"privagg/secagg/pairwise-mask-seed/v1"
ADVERTISE_SIG_LABEL: Final = b"privagg/secagg/advertise-keys/v1"
SURVIVORS_SIG_LABEL: Final = b"privagg/secagg/survivor-list/v1"
SHARE_KEYS_SIG_LABEL: Final = b"privagg/secagg/share-keys/v1"
MASKED_SIG_LABEL: Final = b"privagg/secagg/masked-input/v1"
UNMASK_SIG_LABEL: Final = b"privagg/secagg/unmask-response/v1"
B_COMMIT_LABEL: Final = b"privagg/secagg/self-mask-commitment/v1"
PLAINTEXT_BYTES: Final = 2 * shamir.SHARE_BYTES
CIPHERTEXT_BYTES: Final = PLAINTEXT_BYTES + aead.OVERHEAD


def pair_context(session: bytes, round: int, u: int, v: int) -> bytes:
    """HKDF context of the (unordered) pair u, v in one session and round."""
    a, b = (u, v) if u < v else (v, u)
    return aead.associated_data(session, round, a, b)


def pair_contexts(session: bytes, round: int, u: int, peers: Sequence[int]) -> list[bytes]:
    """:func:`pair_context` of ``u`` with each of ``peers`` (same bytes; the common prefix built once)."""
    head = aead.associated_data(session, round, 0, 0)[:-16]
    return [
        head + (u if u < v else v).to_bytes(8, "big", signed=True) + (v if u < v else u).to_bytes(8, "big", signed=True)
        for v in peers
    ]


def advertise_payload(session: bytes, round: int, cid: int, c_pk: bytes, s_pk: bytes, b_commit: bytes) -> bytes:
    return aead.associated_data(session, round, cid, -1) + c_pk + s_pk + b_commit


def commit_context(session: bytes, round: int, cid: int) -> bytes:
    """Where a self-mask commitment belongs: its owner, session and round."""
    return aead.associated_data(session, round, cid, -1)


def commit_contexts(session: bytes, round: int, owners: Sequence[int]) -> list[bytes]:
    """:func:`commit_context` of each owner (same bytes; the common prefix built once)."""
    head, tail = aead.associated_data(session, round, 0, -1)[:-16], (-1).to_bytes(8, "big", signed=True)
    return [head + u.to_bytes(8, "big", signed=True) + tail for u in owners]


def _ids(ids: Sequence[int]) -> bytes:
    return b"".join(i.to_bytes(8, "big", signed=True) for i in ids)


def message_payload(session: bytes, round: int, msg: ShareKeys | MaskedInput | UnmaskResponse) -> bytes:
    """The signed statement of a client's message: (session, round, sender) | digest of its content.

    The phase is the signature's label (:func:`message_label`), so a signature never moves to another
    phase, round, session or sender; the digest covers every content field.
    """
    if isinstance(msg, ShareKeys):
        parts: list[bytes | memoryview] = [_ids(msg.recipients), *msg.ciphertexts]
    elif isinstance(msg, MaskedInput):
        y = np.asarray(msg.y)
        size = y.dtype.itemsize
        # a byte view, not a copy: y may hold 1e8 words
        parts = [bytes((size,)), np.ascontiguousarray(y, dtype=y.dtype.newbyteorder("<")).data.cast("B")]
    else:
        parts = [_ids(msg.alive), *msg.b_shares, _ids(msg.dropped), *msg.s_shares]
    label = message_label(msg)
    return aead.associated_data(session, round, msg.sender, -1) + commit.digest(label, parts)


def message_label(msg: ShareKeys | MaskedInput | UnmaskResponse) -> bytes:
    if isinstance(msg, ShareKeys):
        return SHARE_KEYS_SIG_LABEL
    if isinstance(msg, MaskedInput):
        return MASKED_SIG_LABEL
    return UNMASK_SIG_LABEL


def survivors_payload(session: bytes, round: int, survivors: Sequence[int]) -> bytes:
    head = aead.associated_data(session, round, -1, -1) + len(survivors).to_bytes(4, "big")
    return head + b"".join(s.to_bytes(8, "big", signed=True) for s in survivors)


def word_dtype(modulus: int) -> type[np.unsignedinteger]:
    """uint32 words when the ring fits (k <= 32), else uint64."""
    return np.uint32 if modulus <= (1 << 32) else np.uint64


def sorted_unique(ids: Sequence[int]) -> bool:
    """Strictly increasing (C-level comparisons: a client checks the whole cohort list)."""
    return all(map(operator.lt, ids, itertools.islice(ids, 1, None)))
