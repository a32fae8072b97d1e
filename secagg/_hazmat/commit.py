"""SHA-256 commitments and message digests, always under a domain-separation label.

``commit`` binds a client to its self-mask seed b when it advertises its keys: the seed is 32 uniformly
random bytes, so SHA-256(label | context | b) hides it (random-oracle model) and binds it (collision
resistance). The server checks a reconstructed b against it, so one wrong Shamir share can no longer
turn into a silently wrong sum. ``digest`` hashes length-prefixed parts (unambiguous concatenation) for
the signed payloads of authenticated mode.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives import hashes

__all__ = ["COMMIT_BYTES", "commit", "digest", "matches", "matches_many"]

COMMIT_BYTES = 32


def digest(label: bytes, parts: Iterable[bytes | memoryview]) -> bytes:
    """SHA-256 over ``len(label) | label | (len(part) | part)*``; ``label`` must be non-empty."""
    if not label:
        raise ValueError("a digest needs a non-empty domain-separation label")
    h = hashes.Hash(hashes.SHA256())
    h.update(len(label).to_bytes(2, "big") + label)
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.finalize()


def commit(secret: bytes, *, label: bytes, context: bytes) -> bytes:
    """Commitment to a high-entropy ``secret`` (a fresh 32-byte seed) in ``context`` (session, round, owner)."""
    if len(secret) < 16:
        raise ValueError("commitments without randomness need a high-entropy secret of at least 16 bytes")
    return digest(label, (context, secret))


def matches(secret: bytes, commitment: bytes, *, label: bytes, context: bytes) -> bool:
    """True iff ``secret`` opens ``commitment`` (constant-time comparison)."""
    if len(commitment) != COMMIT_BYTES or len(secret) < 16:
        return False
    return hmac.compare_digest(commit(secret, label=label, context=context), commitment)


def matches_many(
    secrets: Sequence[bytes | None], commitments: Sequence[bytes], *, label: bytes, contexts: Sequence[bytes]
) -> list[bool]:
    """:func:`matches` of each secret with its commitment and context (``None``: no secret, False).

    The same hash input as :func:`commit` (``len(label) | label | len(ctx) | ctx | len(secret) | secret``),
    written in one update per secret: a server checks one commitment per surviving client.
    """
    if not label:
        raise ValueError("a digest needs a non-empty domain-separation label")
    if not len(secrets) == len(commitments) == len(contexts):
        raise ValueError(f"{len(secrets)} secrets, {len(commitments)} commitments, {len(contexts)} contexts")
    head = len(label).to_bytes(2, "big") + label
    sha = hashes.SHA256()
    out = []
    for secret, want, ctx in zip(secrets, commitments, contexts, strict=True):
        if secret is None or len(want) != COMMIT_BYTES or len(secret) < 16:
            out.append(False)
            continue
        h = hashes.Hash(sha)
        h.update(head + len(ctx).to_bytes(8, "big") + ctx + len(secret).to_bytes(8, "big") + secret)
        out.append(hmac.compare_digest(h.finalize(), want))
    return out
