"""AES-256-GCM sealing of a party's own stored state (e.g. a SuperNode's between-phase client state).

Unlike :mod:`secagg._hazmat.aead` (shares between two clients, bound to session/round/sender/recipient),
the caller supplies the whole associated data: it binds the blob to where and when it may be opened,
so a blob from another run, node, round or phase does not authenticate.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secagg.errors import KeyMismatchError

__all__ = ["KEY_BYTES", "new_key", "seal", "unseal"]

KEY_BYTES = 32
_NONCE = 12
_TAG = 16


def new_key() -> bytes:
    """A fresh 256-bit sealing key from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """``nonce | AES-GCM(key, nonce, plaintext, aad)`` with a fresh random 96-bit nonce."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a sealing key has {KEY_BYTES} bytes, got {len(key)}")
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, *, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; ``KeyMismatchError`` if the key, the associated data or the bytes differ."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a sealing key has {KEY_BYTES} bytes, got {len(key)}")
    if len(blob) < _NONCE + _TAG:
        raise KeyMismatchError(f"sealed blob of {len(blob)} bytes is shorter than nonce + tag")
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
    except InvalidTag as exc:
        raise KeyMismatchError("the sealed state does not authenticate (other key, other binding, or altered)") from exc
