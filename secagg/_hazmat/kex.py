"""X25519 key agreement followed by HKDF-SHA256 with a mandatory domain-separation label.

Every derived key names what it is for (``label``) and where it belongs (``context``: session, round,
parties), so a key derived for one purpose can never be reused for another: the share-encryption key and
the pairwise-mask seed of the same two clients come from different key pairs *and* different labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

__all__ = [
    "KEY_BYTES",
    "PrivateKey",
    "PublicKey",
    "agree",
    "agree_many",
    "derive",
    "generate_private",
    "parse_public",
    "private_bytes",
    "private_from_bytes",
    "private_matching",
    "public_bytes",
    "public_from_private_bytes",
]

KEY_BYTES = 32
"""Length of X25519 private and public keys, and of every derived key."""

RandomBytes = Callable[[int], bytes]
PublicKey = X25519PublicKey
"""A parsed peer public key (:func:`parse_public`)."""
PrivateKey = X25519PrivateKey
"""A parsed private key (:func:`private_from_bytes`, :func:`private_matching`)."""


def generate_private(random_bytes: RandomBytes) -> X25519PrivateKey:
    """A fresh X25519 private key from 32 CSPRNG bytes (``os.urandom`` in production)."""
    return X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    if len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(data)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_matching(data: bytes | None, public: bytes) -> X25519PrivateKey | None:
    """The private key of raw bytes ``data`` if it belongs to ``public``, else None (parsed once: a server
    checks a reconstructed key and then agrees with it)."""
    if data is None or len(data) != KEY_BYTES:
        return None
    try:
        key = X25519PrivateKey.from_private_bytes(data)
    except ValueError:
        return None
    return key if key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == public else None


def public_from_private_bytes(data: bytes) -> bytes:
    """The public key belonging to raw private-key bytes (used to check a reconstructed secret)."""
    return public_bytes(private_from_bytes(data))


def derive(secret: bytes, *, label: bytes, context: bytes = b"", length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256(secret) with ``info = len(label) | label | context``; ``label`` must be non-empty."""
    if not label:
        raise ValueError("HKDF needs a non-empty domain-separation label")
    info = len(label).to_bytes(2, "big") + label + context
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, *, label: bytes, context: bytes = b"") -> bytes:
    """A 32-byte key shared with the owner of ``peer_public``: HKDF(X25519(private, peer), label, context).

    Raises ``ValueError`` for a malformed or low-order peer key (the all-zero shared secret).
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive(shared, label=label, context=context)


def parse_public(data: bytes) -> X25519PublicKey:
    """A peer's public key, parsed once (for a party that agrees with it many times)."""
    if len(data) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def agree_many(
    private: X25519PrivateKey, peers: Sequence[X25519PublicKey], *, label: bytes, contexts: Sequence[bytes]
) -> list[bytes]:
    """:func:`agree` of one private key with many parsed peer keys, each with its own context.

    Same bytes as ``agree(private, peer, label=label, context=ctx)`` per pair (RFC 5869 HKDF-SHA256 with
    the default salt, written as its two HMACs: the salt's HMAC is keyed once and copied per pair, half
    the cost of a fresh HKDF object); the label prefix is built once. Raises ``ValueError`` for a
    low-order peer key.
    """
    if not label:
        raise ValueError("HKDF needs a non-empty domain-separation label")
    if len(peers) != len(contexts):
        raise ValueError(f"{len(peers)} peer keys but {len(contexts)} contexts")
    head = len(label).to_bytes(2, "big") + label
    sha = hashes.SHA256()
    zero_salt = hmac.HMAC(b"\x00" * KEY_BYTES, sha)  # HKDF's default salt (HashLen zeros), keyed once
    out = []
    for peer, ctx in zip(peers, contexts, strict=True):
        extract = zero_salt.copy()
        extract.update(private.exchange(peer))
        expand = hmac.HMAC(extract.finalize(), sha)  # PRK
        expand.update(head + ctx + b"\x01")  # one output block: T(1) = HMAC(PRK, info | 0x01)
        out.append(expand.finalize())
    return out
