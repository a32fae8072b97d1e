"""Ed25519 signatures for authenticated mode: identity keys sign advertised keys and survivor lists."""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "SIGNATURE_BYTES",
    "generate_identity",
    "private_from_bytes",
    "public_from_private_bytes",
    "public_identity",
    "sign",
    "verify",
]

SIGNATURE_BYTES = 64


def generate_identity(random_bytes: Callable[[int], bytes]) -> Ed25519PrivateKey:
    """A fresh Ed25519 identity key from 32 CSPRNG bytes."""
    return Ed25519PrivateKey.from_private_bytes(random_bytes(32))


def public_identity(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, *, label: bytes, payload: bytes) -> bytes:
    """Signature over ``len(label) | label | payload`` (labels keep the two signed statements apart)."""
    if not label:
        raise ValueError("a signature needs a non-empty domain-separation label")
    return key.sign(len(label).to_bytes(2, "big") + label + payload)


def verify(public: bytes, signature: bytes, *, label: bytes, payload: bytes) -> bool:
    """True iff ``signature`` is valid for ``label | payload`` under the raw Ed25519 key ``public``."""
    if len(signature) != SIGNATURE_BYTES or len(public) != 32:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, len(label).to_bytes(2, "big") + label + payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def private_from_bytes(data: bytes) -> Ed25519PrivateKey:
    if len(data) != 32:
        raise ValueError(f"an Ed25519 private key has 32 bytes, got {len(data)}")
    return Ed25519PrivateKey.from_private_bytes(data)


def public_from_private_bytes(data: bytes) -> bytes:
    return public_identity(private_from_bytes(data))
