"""SHA-256 commitments and message digests, always under a domain-separation label.

``commit`` binds a client to its self-mask seed b when it advertises its keys: the seed is 32 uniformly
random bytes, so SHA-256(label | context | b) hides it (random-oracle model) and binds it (collision
resistance). The server checks a reconstructed b against it, so one wrong Shamir share can no longer
turn into a silently wrong sum. ``digest`` hashes length-prefixed parts (unambiguous concatenation) for
the signed payloads of authenticated mode.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes

__all__ = ["COMMIT_BYTES", "commit", "digest", "matches"]

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
