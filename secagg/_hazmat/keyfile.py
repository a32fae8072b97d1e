"""Identity key files for authenticated SecAgg across sites: one Ed25519 private key per site, on disk.

A site's private identity key is 32 raw Ed25519 bytes, written as hex to a file of mode 0600 that only
that site holds; its public key (32 bytes) goes to the consortium's roster. Kept here with the other
primitives so that every use of ``cryptography`` lives in ``secagg._hazmat``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from secagg._hazmat import sign

__all__ = ["read_identity_key", "write_identity_key"]


def write_identity_key(path: Path, random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """Write a fresh Ed25519 private key (hex, mode 0600) to ``path``; return its raw public key.

    Refuses to overwrite an existing file: a site's identity is in the consortium's roster, and a new key
    would silently lock the site out of every run that pins it.
    """
    key = sign.generate_identity(random_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: an identity key is never overwritten (its public key is in the "
                              "roster); remove it yourself, or choose another --out") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key.private_bytes_raw().hex() + "\n")
    return sign.public_identity(key)


def read_identity_key(path: Path) -> tuple[bytes, bytes]:
    """``(private, public)`` raw bytes of the identity key in ``path``.

    Refused (``ValueError`` naming the fix): a file that others may read or write (mode beyond 0600),
    or one that does not hold exactly 32 bytes in hex.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read identity key {path}: {exc}; make one with `privagg flower identity`") from exc
    if mode & 0o077:
        raise ValueError(f"identity key {path} has mode {mode:o}: others may read it; `chmod 600 {path}`")
    try:
        private = bytes.fromhex(text)
    except ValueError:
        private = b""
    if len(private) != 32:
        raise ValueError(f"identity key {path} must hold 32 bytes in hex; make one with `privagg flower identity`")
    return private, sign.public_from_private_bytes(private)
