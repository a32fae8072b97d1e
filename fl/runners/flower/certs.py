"""TLS certificates, SuperNode authentication keys, and the plaintext-transport refusal.

Certificates and keys are made in :mod:`secagg._hazmat.pki` (``cryptography`` only). Plaintext outside
loopback is refused unless asked for explicitly: the unauthenticated SecAgg modes take message
integrity from TLS.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertPaths:
    """A throw-away CA and a server certificate for local TLS testing."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertPaths:
        paths = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        missing = [str(p) for p in (paths.ca, paths.cert, paths.key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing {', '.join(missing)}; make them with `privagg flower certs --out {directory}`"
            )
        return paths


def make_certificates(
    directory: Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 7
) -> CertPaths:
    """Make a CA and a server certificate for ``hosts`` (IPs or DNS names): for local TLS tests only."""
    from secagg._hazmat.pki import make_tls_certificates

    return CertPaths(*make_tls_certificates(directory, hosts=hosts, days=days))


def make_node_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """This site's SuperNode authentication key pair ``(DIR/NAME.key, DIR/NAME.pub)``, made if missing.

    The private key stays on the site (``privagg flower supernode --auth-key``); only the public key
    goes to the SuperLink's operator, who registers it (:func:`register_node`).
    """
    from secagg._hazmat.pki import make_node_keypair

    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    if not private.exists():
        make_node_keypair(private, public)
    elif not public.exists():
        raise FileNotFoundError(f"{private} exists but {public} does not; remove {private} to make a fresh pair")
    return private, public


class InsecureTransportError(ValueError):
    """``--insecure`` (no TLS) asked for an address outside loopback without the explicit override."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); a DNS name other than localhost is not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> str:
    """``HOST`` of ``HOST:PORT`` / ``[V6]:PORT`` / ``HOST``."""
    if address.startswith("["):
        return address[1:address.index("]")] if "]" in address else address
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def refuse_insecure_remote(address: str, *, what: str, allow: bool) -> None:
    """Refuse plaintext (no TLS) to or on ``address`` unless it is loopback or ``allow`` (``--insecure-i-know``).

    Message integrity of the unauthenticated SecAgg modes comes from TLS: without it anyone on the path
    can change a masked input or an unmask share and the sum is silently wrong.
    """
    if allow or is_loopback(_host_of(address)):
        return
    raise InsecureTransportError(
        f"{what} {address} without TLS: protocol messages would cross the network unauthenticated (anyone on the "
        "path could alter the sum). Use TLS (--certs / --ca), or pass --insecure-i-know if the network is trusted"
    )
