"""Identity keys and the consortium roster: authenticated SecAgg / SecAgg+ over Flower.

In memory, authenticated mode draws every client's Ed25519 key in one process (a simulated PKI). Across
sites each SuperNode holds ONLY its own private identity key, and every node knows every planned client's
public key from a roster the server cannot change:

1. each site runs ``privagg flower identity --name SITE --out DIR`` (:func:`make_identity`): its private
   key ``DIR/SITE.identity.key`` (mode 0600, it never leaves the site) and its public key file
   ``DIR/SITE.identity.json``;
2. the consortium assembles ``roster.json`` (:class:`Roster`, ``privagg flower roster``): client id ->
   site name and public key, and hands it to every node out of band, with its SHA-256;
3. each node starts with ``--identity-key``, ``--identity-roster`` and a policy that pins the roster's
   SHA-256 (``privagg flower policy --roster roster.json``; it can also ``--require-authenticated``).

The job carries the roster too (public keys only: the ServerApp verifies signatures with them), and a
node refuses a job whose roster differs from its own (:func:`node_identities`); the node's machine
uses its own copy, never the job's. The job never carries a private key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.runners.flower.policy import NodePolicy, PolicyError

__all__ = ["IDENTITY_KEY_FILE", "IDENTITY_ROSTER_FILE", "IdentityError", "Roster", "RosterEntry", "check_identity",
           "client_sum", "job_authenticated", "make_identity", "node_identities", "own_identity", "server_sum"]

IDENTITY_KEY_FILE = "identity-key-file"
"""The SuperNode ``--node-config`` key naming this node's private identity key (``privagg flower identity``)."""
IDENTITY_ROSTER_FILE = "identity-roster-file"
"""The SuperNode ``--node-config`` key naming the consortium's roster (``privagg flower roster``)."""
_VERSION = 1


class IdentityError(PolicyError):
    """A node's identity key or roster is missing, malformed, or disagrees with the job or the node's pin."""


@dataclass(frozen=True)
class RosterEntry:
    """One planned client: its site's name and raw Ed25519 public identity key (32 bytes)."""

    site: str
    public_key: bytes


@dataclass(frozen=True)
class Roster:
    """Client id -> :class:`RosterEntry`; its :meth:`fingerprint` is what nodes pin in their policy."""

    clients: Mapping[int, RosterEntry]

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("a roster names at least one client")
        keys = [e.public_key for e in self.clients.values()]
        sites = [e.site for e in self.clients.values()]
        if any(len(k) != 32 for k in keys):
            raise ValueError("roster public keys are 32-byte Ed25519 keys")
        if len(set(keys)) != len(keys) or len(set(sites)) != len(sites):
            raise ValueError("roster sites and public keys must be distinct (one identity per site)")
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in self.clients):
            raise ValueError("roster client ids are integers >= 0")

    @classmethod
    def assemble(cls, public_files: Sequence[Path]) -> Roster:
        """Client i = the site of the i-th public key file (``privagg flower identity``'s ``.identity.json``)."""
        entries: dict[int, RosterEntry] = {}
        for i, path in enumerate(public_files):
            try:
                data = json.loads(Path(path).read_text())
                entries[i] = RosterEntry(site=str(data["site"]), public_key=bytes.fromhex(data["public_key"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} is not a public identity file of `privagg flower identity`: {exc}") \
                    from exc
        return cls(entries)

    def to_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, "clients": {str(c): {"site": e.site, "public_key": e.public_key.hex()}
                                                 for c, e in sorted(self.clients.items())}}

    @classmethod
    def from_dict(cls, data: Any) -> Roster:
        """Parse strictly: exactly ``version`` and ``clients``; each client exactly ``site`` and ``public_key``."""
        if not isinstance(data, Mapping) or set(data) != {"version", "clients"} or data["version"] != _VERSION:
            raise ValueError(f"a roster is a JSON object with version {_VERSION} and clients")
        clients = data["clients"]
        if not isinstance(clients, Mapping):
            raise ValueError("roster clients must be an object: client id -> {site, public_key}")
        entries: dict[int, RosterEntry] = {}
        for cid, e in clients.items():
            if not (isinstance(cid, str) and cid.isdigit()) or not isinstance(e, Mapping) or \
                    set(e) != {"site", "public_key"} or not all(isinstance(v, str) for v in e.values()):
                raise ValueError(f"roster entry {cid!r} must be \"ID\": {{\"site\": str, \"public_key\": hex}}")
            entries[int(cid)] = RosterEntry(site=e["site"], public_key=bytes.fromhex(e["public_key"]))
        return cls(entries)

    def canonical(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON: what every node pins (``NodePolicy.roster_sha256``)."""
        from secagg._hazmat.pki import sha256_hex

        return sha256_hex(self.canonical())

    def publics(self) -> dict[int, bytes]:
        return {c: e.public_key for c, e in self.clients.items()}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read roster {path}: {exc}; assemble one with `privagg flower roster`") from exc


def make_identity(out: Path, name: str) -> tuple[Path, Path]:
    """A site's identity: ``(out/NAME.identity.key, out/NAME.identity.json)`` (private 0600; public for the roster)."""
    from secagg._hazmat.keyfile import write_identity_key

    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"--name {name!r} must be a plain site name (no path separators)")
    key, pub = out / f"{name}.identity.key", out / f"{name}.identity.json"
    public = write_identity_key(key)
    pub.write_text(json.dumps({"site": name, "public_key": public.hex()}, indent=2) + "\n")
    return key, pub


def check_identity(key: Path, roster: Roster, cid: int, *, pin: str | None = None) -> bytes:
    """This node's private key, once it matches ``roster``'s entry for ``cid`` and the roster its ``pin``.

    Raises :class:`IdentityError` naming the fix (a node with the wrong key or roster refuses to start).
    """
    from secagg._hazmat.keyfile import read_identity_key

    if pin is not None and roster.fingerprint() != pin:
        raise IdentityError(f"the roster's SHA-256 {roster.fingerprint()} is not the one this node's policy pins "
                            f"({pin}): get the consortium's roster.json again, out of band")
    try:
        private, public = read_identity_key(key)
    except ValueError as exc:
        raise IdentityError(str(exc)) from exc
    entry = roster.clients.get(cid)
    if entry is None:
        raise IdentityError(f"the roster has no entry for partition {cid}; its clients are {sorted(roster.clients)}")
    if entry.public_key != public:
        raise IdentityError(f"this node's identity key {key} does not match the roster's entry for partition {cid} "
                            f"(site {entry.site!r}): start the node with that site's key, or fix --partition")
    return private


def job_authenticated(job: Any) -> bool:
    """Whether a job runs authenticated SecAgg(+) (train: the privacy config; sum: the job's flag)."""
    if job.task == "train":
        return bool(dict(job.config.get("privacy", {})).get("authenticated", False))
    return bool(job.authenticated)


def _job_roster(job: Any) -> Roster:
    if job.roster is None:
        raise IdentityError("the authenticated job carries no roster of public identity keys; submit it with "
                            "`privagg flower run --identity-roster roster.json`")
    try:
        return Roster.from_dict(job.roster)
    except ValueError as exc:
        raise IdentityError(f"the job's roster is malformed: {exc}") from exc


def _node_file(node_config: Mapping[str, Any], key: str, flag: str) -> Path:
    path = node_config.get(key)
    if not isinstance(path, str) or not path:
        raise IdentityError(f"this job runs authenticated SecAgg but the SuperNode has no {key!r}: start it with "
                            f"`privagg flower supernode {flag} PATH` (see `privagg flower identity`)")
    return Path(path)


def node_identities(node_config: Mapping[str, Any], policy: NodePolicy, job: Any, cid: int) -> Any:
    """This node's :class:`~fl.sums.secagg.FixedIdentities` for an authenticated job (``None`` otherwise).

    Its own private key and ITS OWN roster's public keys; refused (:class:`IdentityError`) when the
    roster is not the one its policy pins, the job ships another roster, the key does not match its
    partition's entry, or a planned client has no entry.
    """
    from fl.sums.secagg import FixedIdentities

    if not job_authenticated(job):
        return None
    key = _node_file(node_config, IDENTITY_KEY_FILE, "--identity-key")
    try:
        own = Roster.load(_node_file(node_config, IDENTITY_ROSTER_FILE, "--identity-roster"))
    except ValueError as exc:
        raise IdentityError(str(exc)) from exc
    private = check_identity(key, own, cid, pin=policy.roster_sha256)
    shipped = _job_roster(job)
    if shipped.fingerprint() != own.fingerprint():
        raise IdentityError(f"the job's roster (SHA-256 {shipped.fingerprint()}) is not this node's "
                            f"({own.fingerprint()}): the server substituted identity keys; refusing the job")
    _require_planned(own, range(job.num_clients))
    return FixedIdentities(own.publics(), own=(cid, private))


def own_identity(node_config: Mapping[str, Any], policy: NodePolicy) -> tuple[int, bytes, Roster]:
    """``(client id, private key, roster)`` of this node for ``privagg_mod``, from its OWN files only.

    The client id is the entry of the node's own roster whose public key is the node's own identity key
    (never a number the server sends); the roster must be the one the node's policy pins (if it pins one).
    Raises :class:`IdentityError` naming the fix when a file is missing, or the key is in no entry.
    """
    from secagg._hazmat.keyfile import read_identity_key

    key = _node_file(node_config, IDENTITY_KEY_FILE, "--identity-key")
    try:
        own = Roster.load(_node_file(node_config, IDENTITY_ROSTER_FILE, "--identity-roster"))
        public = read_identity_key(key)[1]
    except ValueError as exc:
        raise IdentityError(str(exc)) from exc
    cid = next((c for c, e in sorted(own.clients.items()) if e.public_key == public), None)
    if cid is None:
        raise IdentityError(f"this node's identity key {key} is in no entry of its roster: add its public key "
                            "(`privagg flower identity`'s .identity.json) to the consortium's roster, or start the "
                            "node with the key the roster names")
    return cid, check_identity(key, own, cid, pin=policy.roster_sha256), own


def _require_planned(roster: Roster, cids: Iterable[int]) -> None:
    missing = sorted(set(cids) - set(roster.clients))
    if missing:
        raise IdentityError(f"planned client(s) {missing} have no entry in the roster: nobody could check their "
                            "signatures; add them to the consortium's roster or plan fewer clients")


def client_sum(ssum: Any, identities: Any) -> Any:
    """The node's secure sum with its own identities (unchanged for an unauthenticated job)."""
    from fl.sums.secagg import with_identities

    if identities is None:
        if getattr(ssum, "authenticated", False):  # never fall back to keys drawn in this process
            raise IdentityError("an authenticated secure sum needs this node's identity key and roster")
        return ssum
    return with_identities(ssum, identities)


def server_sum(ssum: Any, job: Any) -> Any:
    """The ServerApp's secure sum: for an authenticated job, the job roster's public keys (no private key)."""
    from fl.sums.secagg import FixedIdentities, with_identities

    if not job_authenticated(job):
        return ssum
    roster = _job_roster(job)
    _require_planned(roster, range(job.num_clients))
    return with_identities(ssum, FixedIdentities(roster.publics()))


def provision_local(directory: Path, n: int) -> tuple[list[Path], Path, Roster]:
    """Identities for ``n`` local sites ``node0..`` (tests, ``privagg flower local --authenticated``).

    Returns ``(private key files, roster.json, roster)``; existing keys in ``directory`` are reused (a
    node restarted by a test keeps its identity).
    """
    keys, pubs = [], []
    for i in range(n):
        key, pub = directory / f"node{i}.identity.key", directory / f"node{i}.identity.json"
        if not key.is_file():
            key, pub = make_identity(directory, f"node{i}")
        keys.append(key)
        pubs.append(pub)
    roster = Roster.assemble(pubs)
    return keys, roster.save(directory / "roster.json"), roster


def node_config_entries(key: Path | None, roster: Path | None) -> str:
    """The ``--node-config`` entries naming this node's identity key and roster (empty when neither)."""
    if (key is None) != (roster is None):
        raise ValueError("give --identity-key and --identity-roster together (a node needs both its own key and "
                         "everyone's public keys)")
    return "" if key is None else f' {IDENTITY_KEY_FILE}="{key}" {IDENTITY_ROSTER_FILE}="{roster}"'
