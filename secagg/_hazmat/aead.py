"""AES-256-GCM for the Shamir shares relayed by the server.

The associated data binds every ciphertext to its session, round, sender and recipient, so the server
cannot replay a share into another round or redirect it to another client: decryption then fails.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secagg.errors import KeyMismatchError

__all__ = ["NONCE_BYTES", "OVERHEAD", "associated_data", "decrypt", "encrypt"]

NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
"""Ciphertext length minus plaintext length."""


def associated_data(session: bytes, round: int, sender: int, recipient: int) -> bytes:
    """``len(session) | session | round | sender | recipient``, fixed-width and unambiguous."""
    return (
        len(session).to_bytes(4, "big")
        + session
        + round.to_bytes(8, "big", signed=True)
        + sender.to_bytes(8, "big", signed=True)
        + recipient.to_bytes(8, "big", signed=True)
    )


def encrypt(
    key: bytes,
    plaintext: bytes,
    *,
    session: bytes,
    round: int,
    sender: int,
    recipient: int,
    random_bytes: Callable[[int], bytes],
) -> bytes:
    """``nonce | AES-GCM(key, nonce, plaintext, aad)`` with a fresh random 96-bit nonce."""
    nonce = random_bytes(NONCE_BYTES)
    aad = associated_data(session, round, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, *, session: bytes, round: int, sender: int, recipient: int) -> bytes:
    """Inverse of :func:`encrypt`; raises ``KeyMismatchError`` if the key, the binding or the bytes differ."""
    if len(ciphertext) < OVERHEAD:
        raise KeyMismatchError(f"ciphertext of {len(ciphertext)} bytes is shorter than the {OVERHEAD}-byte overhead")
    aad = associated_data(session, round, sender, recipient)
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise KeyMismatchError(
            f"share from client {sender} to client {recipient} does not authenticate: it was tampered with, "
            f"or belongs to another session, round or pair of clients"
        ) from exc
