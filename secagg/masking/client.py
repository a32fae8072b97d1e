"""The SecAgg / SecAgg+ client as a sans-IO state machine (Bonawitz et al. CCS 2017, Bell et al. CCS 2020).

One instance per client per round. It never trusts the server: it recomputes the neighbour graph from
the public session data, checks every relayed key and ciphertext, and refuses (``ProtocolError``) any
unmask request that would let the server strip its masks -- one that names a client both alive and
dropped, names fewer than ``t`` survivors, leaves this client out of the survivors, or (authenticated
mode) does not match a survivor list signed by at least ``t`` of its neighbours.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from secagg import wire
from secagg._hazmat import aead, commit, kex, prg, shamir, sign
from secagg.errors import CodecError, KeyMismatchError, OverflowRiskError, ProtocolError
from secagg.machine import SERVER, Message
from secagg.masking import _state
from secagg.masking._common import (
    ADVERTISE_SIG_LABEL,
    B_COMMIT_LABEL,
    CIPHERTEXT_BYTES,
    PAIR_MASK_LABEL,
    SHARE_KEY_LABEL,
    SURVIVORS_SIG_LABEL,
    advertise_payload,
    commit_context,
    message_label,
    message_payload,
    pair_context,
    pair_contexts,
    ring_bits,
    sorted_unique,
    survivors_payload,
    word_dtype,
)
from secagg.masking.graph import GraphSpec, NeighbourGraph
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    KeyDirectory,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = ["IdentityKeys", "SecAggClient"]


@dataclass(frozen=True, slots=True)
class IdentityKeys:
    """A client's long-term Ed25519 identity (authenticated mode), as raw bytes."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> IdentityKeys:
        """Fresh keys from the CSPRNG ``random_bytes``."""
        key = sign.generate_identity(random_bytes)
        priv = key.private_bytes_raw()
        return cls(priv, sign.public_identity(key))


class SecAggClient:
    """One client's half of a SecAgg(+) round.

    ``value``: the client's vector in Z_modulus (uint64 from ``Quantize``), ``size`` long; ``None`` when the
    client agrees its keys before it knows its value (a training round whose key agreement overlaps the
    previous round): :meth:`provide` gives it before the masked-input phase, which refuses to run without.
    ``threshold``: fraction of the share group (or absolute count) needed at every phase; ``None`` takes
    the t of the graph parameters (:func:`secagg.masking.graph.find_parameters`).
    ``min_cohort``: the smallest cohort this client's own configuration accepts (the planned cohort
    size). The server's key directory names the cohort but nobody signs it, so a directory showing
    fewer clients is refused: a server cannot shrink the cohort to shrink ``t``.
    ``graph``: complete (SecAgg) or sparse (SecAgg+) neighbour graph parameters.
    ``identity_key``/``identities``: raw Ed25519 private key of this client and public keys of all
    clients, for authenticated mode (both or neither). ``random_bytes``: the CSPRNG (``os.urandom``;
    tests pass a deterministic source through this seam).
    """

    def __init__(
        self,
        cid: int,
        value: NDArray[Any] | None,
        *,
        session: bytes,
        round: int,
        modulus: int,
        size: int,
        threshold: float | int | None,
        min_cohort: int,
        graph: GraphSpec | None = None,
        identity_key: bytes | None = None,
        identities: Mapping[int, bytes] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._init_state(
            cid, session=session, round=round, modulus=modulus, threshold=threshold, min_cohort=min_cohort,
            graph=graph, identity_key=identity_key, identities=identities, random_bytes=random_bytes,
        )
        self._pending = value is None
        empty = np.zeros(0, np.uint64)
        self._value = self._check_value(empty if value is None else value, 0 if value is None else size)
        self._size = size
        # Round secrets.
        self._c_sk = kex.generate_private(random_bytes)
        self._s_sk = kex.generate_private(random_bytes)
        self._b = random_bytes(prg.SEED_BYTES)

    def _init_state(
        self,
        cid: int,
        *,
        session: bytes,
        round: int,
        modulus: int,
        threshold: float | int | None,
        min_cohort: int,
        graph: GraphSpec | None,
        identity_key: bytes | None,
        identities: Mapping[int, bytes] | None,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        """Check and store the configuration; empty per-round knowledge (shared by __init__ and restore)."""
        if cid < 0:
            raise ValueError(f"client ids are non-negative, got {cid}")
        if (identity_key is None) != (identities is None):
            raise ValueError("authenticated mode needs both identity_key and identities (or neither)")
        if isinstance(min_cohort, bool) or not isinstance(min_cohort, int) or min_cohort < 2:
            raise ValueError(
                f"min_cohort must be an int >= 2 (a secure sum of one client protects nobody), got {min_cohort!r}"
            )
        self._min_cohort = min_cohort
        self._cid = cid
        self._session = bytes(session)
        self._round = round
        self._bits = ring_bits(modulus)
        self._modulus = modulus
        self._dtype = word_dtype(modulus)
        self._threshold = threshold
        self._graph_spec = graph or GraphSpec()
        self._identity_key = identity_key
        self._identities = identities
        self._rand = random_bytes
        self._auth = identity_key is not None
        self._table = _state.client_transitions(self._auth)
        self._state = "new"
        # What the client learns along the way.
        self._graph: NeighbourGraph | None = None
        self._t = 0
        self._dir: dict[int, tuple[bytes, bytes]] = {}
        self._share_keys: dict[int, bytes] = {}
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b_sender, share of s_sender)
        self._survivors: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ the machine interface
    @property
    def cid(self) -> int:
        return self._cid

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> list[Message]:
        if self._state != "new":
            raise ProtocolError(f"client {self._cid} already started")
        c_pk, s_pk = kex.public_bytes(self._c_sk), kex.public_bytes(self._s_sk)
        b_commit = commit.commit(
            self._b, label=B_COMMIT_LABEL, context=commit_context(self._session, self._round, self._cid)
        )
        sig = b""
        if self._identity_key is not None:
            sig = sign.sign(
                sign.private_from_bytes(self._identity_key),
                label=ADVERTISE_SIG_LABEL,
                payload=advertise_payload(self._session, self._round, self._cid, c_pk, s_pk, b_commit),
            )
        self._state = "advertised"
        return [AdvertiseKeys(self._cid, SERVER, self._session, self._round, c_pk, s_pk, b_commit, sig)]

    def _signed(self, msg: ShareKeys | MaskedInput | UnmaskResponse) -> list[Message]:
        """Authenticated mode: sign (session, round, sender, phase, digest of the content); else as is."""
        if self._identity_key is None:
            return [msg]
        sig = sign.sign(
            sign.private_from_bytes(self._identity_key),
            label=message_label(msg),
            payload=message_payload(self._session, self._round, msg),
        )
        return [dataclasses.replace(msg, signature=sig)]

    def receive(self, msg: Message) -> list[Message]:
        session = getattr(msg, "session", None)
        rnd = getattr(msg, "round", None)
        if session != self._session or rnd != self._round:
            raise ProtocolError(
                f"client {self._cid} refuses a {type(msg).__name__} from another session or round "
                f"(replayed or misrouted)"
            )
        if msg.sender != SERVER or msg.recipient != self._cid:
            raise ProtocolError(f"client {self._cid} accepts only server messages addressed to it")
        nxt = self._table.get((self._state, type(msg)))
        if nxt is None:
            raise ProtocolError(
                f"client {self._cid} got {type(msg).__name__} in state {self._state!r}: out of phase or replayed"
            )
        if isinstance(msg, KeyDirectory):
            out: list[Message] = self._on_directory(msg)
        elif isinstance(msg, ShareDelivery):
            out = self._on_delivery(msg)
        elif isinstance(msg, ConsistencyCheck):
            out = self._on_consistency(msg)
        elif isinstance(msg, UnmaskRequest):
            out = self._on_unmask(msg)
        else:  # pragma: no cover - the table only lists the types above
            raise ProtocolError(f"unexpected {type(msg).__name__}")
        self._state = nxt
        return out

    def provide(self, value: NDArray[Any]) -> None:
        """This client's value, for a client built without one; before its masked-input phase only."""
        if self._state not in _PRE_MASK:
            raise ProtocolError(f"a value given in phase {self._state!r}, after the masked input, cannot be summed")
        if not self._pending:
            raise ProtocolError("this client already has its value")
        self._value = self._check_value(value, self._size)
        self._pending = False

    # ------------------------------------------------------------------ phases
    def _check_value(self, value: NDArray[Any], size: int) -> NDArray[np.unsignedinteger]:
        v = np.asarray(value)
        if v.shape != (size,):
            raise ValueError(f"client {self._cid}'s value has shape {v.shape}, expected ({size},)")
        if v.dtype.kind not in "ui":
            raise OverflowRiskError(
                f"SecAgg masks integers in Z_2^{self._bits}, got {v.dtype} values: put Quantize before the sum"
            )
        if v.size and ((v.dtype.kind == "i" and int(v.min()) < 0) or int(v.max()) >= self._modulus):
            raise OverflowRiskError(f"client {self._cid}'s value has entries outside Z_2^{self._bits}")
        return v  # checked, not copied: the masking step makes the one working copy (O(d) per live client)

    def _on_directory(self, msg: KeyDirectory) -> list[Message]:
        """Check the server's key directory against this client's view, then send its secrets' shares."""
        self._check_directory_shape(msg)
        graph, t = self._directory_graph(msg)
        entries = self._directory_entries(msg)
        self._graph, self._t, self._dir = graph, t, entries
        return self._share_secrets(msg, graph, t)

    def _check_directory_shape(self, msg: KeyDirectory) -> None:
        """Refuse a malformed directory or cohort, or one smaller than this client's ``min_cohort``."""
        n = len(msg.ids)
        same = len(msg.c_pks) == len(msg.s_pks) == len(msg.signatures) == len(msg.b_commits) == n
        if not same or not sorted_unique(msg.ids):
            raise ProtocolError("key directory is malformed (lengths differ or ids not sorted and unique)")
        if not sorted_unique(msg.cohort) or self._cid not in msg.cohort:
            raise ProtocolError("key directory's cohort is malformed or does not include this client")
        if len(msg.cohort) < self._min_cohort:
            raise ProtocolError(
                f"the server shows a cohort of {len(msg.cohort)} clients but this client's configuration "
                f"requires at least {self._min_cohort} (min_cohort): a smaller cohort would lower the "
                f"threshold t; refusing to share keys"
            )

    def _directory_graph(self, msg: KeyDirectory) -> tuple[NeighbourGraph, int]:
        """Rebuild the announced cohort's neighbour graph; refuse a threshold t lower than planned or unsafe."""
        try:
            graph = self._graph_spec.build(
                msg.cohort, threshold=self._threshold, session=self._session, round=self._round
            )
        except ValueError as exc:
            raise ProtocolError(f"cannot rebuild the neighbour graph: {exc}") from exc
        group = graph.group(self._cid)  # O(k + log n): only this client's neighbourhood is evaluated
        t = self._graph_spec.parameters(graph.n, self._threshold)[1]
        floor = self._graph_spec.parameters(self._min_cohort, self._threshold)[1]
        if t < floor:  # a (padded) cohort may only raise t above the planned cohort's, never lower it
            raise ProtocolError(
                f"the server's cohort of {len(msg.cohort)} gives t={t}, below the t={floor} of this client's "
                f"planned cohort of {self._min_cohort}: refusing a cohort that lowers the threshold"
            )
        if not set(msg.ids) <= group:
            raise ProtocolError("key directory lists clients that are not this client's neighbours")
        if len(msg.ids) < t:
            raise ProtocolError(f"only {len(msg.ids)} keys in the directory, fewer than the threshold {t}")
        if t < 2:
            raise ProtocolError(f"the announced cohort gives threshold t={t}: one share would reveal a secret")
        if self._auth and 2 * t <= graph.k + 1:
            raise ProtocolError(
                f"threshold t={t} of a share group of {graph.k + 1} allows a split view (2t <= group): "
                f"authenticated mode needs a threshold above one half"
            )
        return graph, t

    def _directory_entries(self, msg: KeyDirectory) -> dict[int, tuple[bytes, bytes]]:
        """The directory's (c_pk, s_pk) per client, once this client's own keys, key shapes and signatures check."""
        entries = dict(zip(msg.ids, zip(msg.c_pks, msg.s_pks, strict=True), strict=True))
        own = (kex.public_bytes(self._c_sk), kex.public_bytes(self._s_sk))
        if entries.get(self._cid) != own:
            raise ProtocolError("the server relayed this client's own keys altered or not at all")
        all_keys = [k for pair in entries.values() for k in pair]
        if any(len(k) != kex.KEY_BYTES for k in all_keys) or len(set(all_keys)) != len(all_keys):
            raise ProtocolError("advertised keys must be 32 bytes and pairwise distinct")
        if self._identities is not None:
            for v, sig, bc in zip(msg.ids, msg.signatures, msg.b_commits, strict=True):
                ident = self._identities.get(v)
                payload = advertise_payload(self._session, self._round, v, *entries[v], bc)
                if ident is None or not sign.verify(ident, sig, label=ADVERTISE_SIG_LABEL, payload=payload):
                    raise ProtocolError(f"client {v}'s advertised keys carry no valid signature of its identity key")
        return entries

    def _share_secrets(self, msg: KeyDirectory, graph: NeighbourGraph, t: int) -> list[Message]:
        """Shamir-share b and s_sk among the directory's members; encrypt each share to its recipient."""
        # each member present gets its shares at its own point in this group
        xs = [graph.share_x(self._cid, v) for v in msg.ids]
        secrets = (self._b, kex.private_bytes(self._s_sk))
        b_sh, s_sh = shamir.split_many(secrets, xs, threshold=t, random_bytes=self._rand)
        others = [v for v in msg.ids if v != self._cid]
        self._share_keys.update(zip(others, self._agree_all(self._c_sk, others, 0, SHARE_KEY_LABEL), strict=True))
        recipients: list[int] = []
        cts: list[bytes] = []
        for v, yb, ys in zip(msg.ids, b_sh, s_sh, strict=True):
            if v == self._cid:
                self._held[v] = (yb, ys)
                continue
            key = self._share_keys[v]
            pt = shamir.encode_share(yb) + shamir.encode_share(ys)
            cts.append(
                aead.encrypt(
                    key,
                    pt,
                    session=self._session,
                    round=self._round,
                    sender=self._cid,
                    recipient=v,
                    random_bytes=self._rand,
                )
            )
            recipients.append(v)
        return self._signed(ShareKeys(self._cid, SERVER, self._session, self._round, tuple(recipients), tuple(cts)))


    def _share_key(self, v: int) -> bytes:
        key = self._share_keys.get(v)
        if key is None:
            key = self._share_keys[v] = self._derive_share_key(v)
        return key

    def _agree_all(self, private: Any, peers: Sequence[int], slot: int, label: bytes) -> list[bytes]:
        """HKDF(X25519) of ``private`` with each peer's advertised key (slot 0: encryption, 1: mask), batched.

        A peer key that yields no usable secret (e.g. a low-order point) raises ``ProtocolError`` naming it.
        """
        try:
            parsed = [kex.parse_public(self._dir[v][slot]) for v in peers]
            contexts = pair_contexts(self._session, self._round, self._cid, peers)
            return kex.agree_many(private, parsed, label=label, contexts=contexts)
        except ValueError:
            pass
        for v in peers:  # name the first unusable key
            try:
                kex.agree(private, self._dir[v][slot], label=label)
            except ValueError as exc:
                what = ("encryption", "mask")[slot]
                raise ProtocolError(f"client {v}'s advertised {what} key is unusable: {exc}") from exc
        raise ProtocolError("an advertised key is unusable")  # pragma: no cover - the loop names it

    def _derive_share_key(self, v: int) -> bytes:
        c_pk_v = self._dir[v][0]
        return kex.agree(
            self._c_sk, c_pk_v, label=SHARE_KEY_LABEL, context=pair_context(self._session, self._round, self._cid, v)
        )

    def _on_delivery(self, msg: ShareDelivery) -> list[Message]:
        if self._pending:
            raise ProtocolError("this client has no value to mask yet: provide() it before the masked-input phase")
        if len(msg.senders) != len(msg.ciphertexts) or not sorted_unique(msg.senders):
            raise ProtocolError("share delivery is malformed")
        if self._cid in msg.senders or not set(msg.senders) <= set(self._dir):
            raise ProtocolError("share delivery names senders outside this client's key directory")
        if len(msg.senders) + 1 < self._t:
            raise ProtocolError(f"only {len(msg.senders) + 1} share holders, fewer than the threshold {self._t}")
        for v, ct in zip(msg.senders, msg.ciphertexts, strict=True):
            if len(ct) != CIPHERTEXT_BYTES:
                raise ProtocolError(f"ciphertext from client {v} has the wrong length")
            try:
                pt = aead.decrypt(
                    self._share_key(v), ct, session=self._session, round=self._round, sender=v, recipient=self._cid
                )
                self._held[v] = (
                    shamir.decode_share(pt[: shamir.SHARE_BYTES]),
                    shamir.decode_share(pt[shamir.SHARE_BYTES :]),
                )
            except (KeyMismatchError, ValueError) as exc:
                raise ProtocolError(f"share from client {v} is invalid: {exc}") from exc
        seeds = self._agree_all(self._s_sk, msg.senders, 1, PAIR_MASK_LABEL)
        y = self._value.astype(self._dtype)  # a fresh copy, masked in place; the caller's array is untouched
        exp = prg.MaskExpander(self._size, self._dtype)
        exp.add(y, self._b, +1)
        for v, seed in zip(msg.senders, seeds, strict=True):
            exp.add(y, seed, +1 if self._cid < v else -1)
        if self._bits < 8 * np.dtype(self._dtype).itemsize:
            y &= self._dtype(self._modulus - 1)
        self._value = np.zeros(0, dtype=self._dtype)  # the clear input is no longer needed
        self._share_keys.clear()
        return self._signed(MaskedInput(self._cid, SERVER, self._session, self._round, y))

    def _on_consistency(self, msg: ConsistencyCheck) -> list[Message]:
        assert self._graph is not None and self._identity_key is not None
        survivors = msg.survivors
        if not sorted_unique(survivors) or self._cid not in survivors:
            raise ProtocolError("survivor list is malformed or leaves out this client, which sent its input")
        mine = set(survivors) & (set(self._held))
        if len(mine) < self._t:
            raise ProtocolError(f"survivor list names {len(mine)} of this client's group, fewer than t={self._t}")
        self._survivors = survivors
        sig = sign.sign(
            sign.private_from_bytes(self._identity_key),
            label=SURVIVORS_SIG_LABEL,
            payload=survivors_payload(self._session, self._round, survivors),
        )
        return [ConsistencySignature(self._cid, SERVER, self._session, self._round, sig)]

    def _on_unmask(self, msg: UnmaskRequest) -> list[Message]:
        alive, dropped = msg.alive, msg.dropped
        if not sorted_unique(alive) or not sorted_unique(dropped):
            raise ProtocolError("unmask request lists are not sorted and unique")
        both = set(alive) & set(dropped)
        if both:
            raise ProtocolError(
                f"unmask request names client(s) {sorted(both)} both alive and dropped: answering would give "
                f"the server both the self-mask and the mask key, i.e. the client's input"
            )
        if self._cid not in alive:
            raise ProtocolError("unmask request does not list this client as alive, yet it sent its masked input")
        unknown = (set(alive) | set(dropped)) - set(self._held)
        if unknown:
            raise ProtocolError(f"unmask request asks for shares of {sorted(unknown)}, which this client does not hold")
        if len(alive) < self._t:
            raise ProtocolError(f"unmask request names {len(alive)} survivor(s), fewer than the threshold t={self._t}")
        if self._auth:
            self._check_signed_survivors(msg)
        b_sh = tuple(shamir.encode_share(self._held[v][0]) for v in alive)
        s_sh = tuple(shamir.encode_share(self._held[v][1]) for v in dropped)
        self._held.clear()  # answer at most once
        return self._signed(UnmaskResponse(self._cid, SERVER, self._session, self._round, alive, b_sh, dropped, s_sh))

    def _check_signed_survivors(self, msg: UnmaskRequest) -> None:
        assert self._survivors is not None and self._identities is not None and self._graph is not None
        surv = set(self._survivors)
        held = set(self._held)
        if set(msg.alive) != surv & held or not set(msg.dropped) <= held - surv:
            raise ProtocolError("unmask request disagrees with the survivor list this client signed")
        if len(msg.signers) != len(msg.signatures) or not sorted_unique(msg.signers):
            raise ProtocolError("consistency signatures are malformed")
        payload = survivors_payload(self._session, self._round, self._survivors)
        group = self._graph.group(self._cid)
        valid = 0
        for v, sig in zip(msg.signers, msg.signatures, strict=True):
            ident = self._identities.get(v)
            if (
                v not in surv
                or ident is None
                or not sign.verify(ident, sig, label=SURVIVORS_SIG_LABEL, payload=payload)
            ):
                raise ProtocolError(f"client {v}'s signature on the survivor list is missing or invalid")
            valid += v in group
        if valid < self._t:
            raise ProtocolError(f"only {valid} neighbours signed the survivor list, fewer than t={self._t}")

    # ------------------------------------------------------------------ state snapshot (no pickle)
    def snapshot(self) -> bytes:
        """This client's whole between-phase state as bytes (versioned, length-checked; never pickle).

        The blob holds the round secrets (c_sk, s_sk, b, the shares held for others and the clear input
        until it is masked), so whoever stores it must keep it confidential and intact -- e.g. seal it
        with AES-GCM under a key only this node holds. The identity private key and the identities are
        *not* in it: :meth:`restore` takes them from the node's own configuration.
        """
        return _dump_state(self)

    @classmethod
    def restore(
        cls,
        blob: bytes,
        *,
        session: bytes,
        round: int,
        state: str,
        identity_key: bytes | None = None,
        identities: Mapping[int, bytes] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> SecAggClient:
        """The client a :meth:`snapshot` was taken of, continuing where it stopped.

        ``session``/``round``/``state`` are what the caller expects (from its own records): a blob of
        another session, round or phase (an old blob replayed: rollback) raises ``ProtocolError``; a
        malformed or truncated one raises ``CodecError``. Authenticated mode must match the blob's.
        """
        client = cls.__new__(cls)
        _load_state(
            client, blob, session=session, round=round, state=state, identity_key=identity_key,
            identities=identities, random_bytes=random_bytes,
        )
        return client


SNAPSHOT_MAGIC = b"PAGS"
SNAPSHOT_VERSION = 1
_STATES = ("new", "advertised", "shared", "masked", "signed", "done")
_PRE_MASK = ("new", "advertised", "shared")  # the states in which the clear value is still held
_SNAPSHOT_KINDS = (
    "bytes", "i64", "bytes", "i64",  # state, cid, session, round
    "i64", "i64", "i64", "i64", "f64",  # ring bits, size, min_cohort, threshold kind (0 int 1 float 2 none), value
    "i64", "i64", "f64", "f64", "f64", "f64", "i64",  # graph: complete, k (-1 none), sigma, eta, drop, corrupt, active
    "i64", "array", "bytes", "bytes", "bytes",  # authenticated, value, c_sk, s_sk, b
    "i64", "ids", "i64",  # has graph, cohort, t
    "ids", "blobs", "blobs",  # directory: ids, c_pks, s_pks
    "ids", "blobs", "blobs",  # held shares: senders, b shares, s shares
    "i64", "ids",  # has survivors, survivors
)


def _threshold_kind(threshold: float | int | None) -> int:
    return 2 if threshold is None else int(isinstance(threshold, float))


def _threshold_from(kind: int, value: float) -> float | int | None:
    if kind not in (0, 1, 2):
        raise ValueError(f"unknown threshold kind {kind}")
    return None if kind == 2 else value if kind == 1 else int(value)


def _dump_state(c: SecAggClient) -> bytes:
    g = c._graph_spec
    held = sorted(c._held)
    dir_ids = sorted(c._dir)
    items: list[tuple[str, Any]] = [
        ("bytes", c._state.encode()), ("i64", c._cid), ("bytes", c._session), ("i64", c._round),
        ("i64", c._bits), ("i64", c._size), ("i64", c._min_cohort),
        ("i64", _threshold_kind(c._threshold)), ("f64", float(c._threshold or 0)),
        ("i64", int(g.complete)), ("i64", -1 if g.neighbours is None else g.neighbours),
        ("f64", g.sigma), ("f64", g.eta), ("f64", g.dropout), ("f64", g.corrupt), ("i64", int(g.active)),
        ("i64", int(c._auth)), ("array", c._value), ("bytes", kex.private_bytes(c._c_sk)),
        ("bytes", kex.private_bytes(c._s_sk)), ("bytes", c._b),
        ("i64", int(c._graph is not None)), ("ids", c._graph.cohort if c._graph is not None else ()), ("i64", c._t),
        ("ids", dir_ids), ("blobs", [c._dir[v][0] for v in dir_ids]), ("blobs", [c._dir[v][1] for v in dir_ids]),
        ("ids", held), ("blobs", [shamir.encode_share(c._held[v][0]) for v in held]),
        ("blobs", [shamir.encode_share(c._held[v][1]) for v in held]),
        ("i64", int(c._survivors is not None)), ("ids", c._survivors or ()),
    ]
    return wire.pack_record(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, items)


def _load_state(
    c: SecAggClient,
    blob: bytes,
    *,
    session: bytes,
    round: int,
    state: str,
    identity_key: bytes | None,
    identities: Mapping[int, bytes] | None,
    random_bytes: Callable[[int], bytes],
) -> None:
    # a large model's value exceeds one frame; every array is still bounded by the blob's own length
    v = wire.unpack_record(blob, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, _SNAPSHOT_KINDS, max_items=wire.MAX_STREAM_ITEMS)
    (st, cid, sess, rnd, bits, size, min_cohort, thr_kind, thr, complete, nb, sigma, eta, dropout, corrupt, active,
     auth, value, c_sk, s_sk, b, has_graph, cohort, t, dir_ids, c_pks, s_pks, held, hb, hs, has_surv, surv) = v
    if sess != bytes(session) or rnd != round or st != state.encode():
        raise ProtocolError(
            f"client state snapshot is of session/round/phase ({sess!r}, {rnd}, {st!r}), not the expected "
            f"({bytes(session)!r}, {round}, {state!r}): refusing an old or foreign snapshot (rollback)"
        )
    if (identity_key is None) != (identities is None) or bool(auth) != (identity_key is not None):
        raise ProtocolError("the snapshot's authenticated mode differs from the identity keys passed to restore")
    try:
        if not 1 <= bits <= 64 or not 0 <= size <= wire.MAX_STREAM_ITEMS:
            raise ValueError(f"ring bits {bits} or size {size} out of range")
        c._init_state(
            cid, session=sess, round=rnd, modulus=1 << bits, threshold=_threshold_from(thr_kind, thr),
            min_cohort=min_cohort,
            graph=GraphSpec(bool(complete), None if nb < 0 else nb, sigma, eta, dropout, corrupt, bool(active)),
            identity_key=identity_key, identities=identities, random_bytes=random_bytes,
        )
        if st.decode() not in _STATES or len(dir_ids) != len(c_pks) or len(dir_ids) != len(s_pks):
            raise ValueError("unknown state or directory lists of different lengths")
        if len(held) != len(hb) or len(held) != len(hs) or not sorted_unique(held) or not sorted_unique(dir_ids):
            raise ValueError("held-share lists are malformed")
        c._state, c._size = st.decode(), size
        # an empty value before the masked input: a client built without one, still waiting for provide()
        c._pending = c._state in _PRE_MASK and size > 0 and np.asarray(value).size == 0
        c._value = c._check_value(value, size if c._state in _PRE_MASK and not c._pending else 0)
        c._c_sk, c._s_sk, c._b = kex.private_from_bytes(c_sk), kex.private_from_bytes(s_sk), bytes(b)
        if len(c._b) != prg.SEED_BYTES:
            raise ValueError("self-mask seed has the wrong length")
        c._t = t
        c._graph = c._graph_spec.build(cohort, threshold=c._threshold, session=sess, round=rnd) if has_graph else None
        c._dir = {i: (bytes(a), bytes(p)) for i, a, p in zip(dir_ids, c_pks, s_pks, strict=True)}
        c._held = {
            i: (shamir.decode_share(x), shamir.decode_share(y)) for i, x, y in zip(held, hb, hs, strict=True)
        }
        c._survivors = tuple(surv) if has_surv else None
    except (ValueError, OverflowError, OverflowRiskError) as exc:
        raise CodecError(f"client state snapshot is malformed: {exc}") from exc
