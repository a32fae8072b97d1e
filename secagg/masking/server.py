"""The SecAgg / SecAgg+ server as a sans-IO state machine.

It collects one phase at a time and moves on when the runner calls :meth:`SecAggServer.end_phase` (the
phase deadline): whoever has not answered has dropped. Every phase needs at least ``t`` members of each
affected share group, else the round aborts with :class:`~secagg.errors.AbortError`. For each client the
server asks for exactly one kind of share -- the self-mask seed ``b_u`` of a survivor of the masked-input
phase, the mask key ``s_u^SK`` of a client that dropped after sharing its keys -- never both.

The result is ``sum_{u in U3} y_u - PRG(b_u) -/+ PRG(s_{u,v}) for dropped v``, computed with in-place
uint32/uint64 vector operations (natural wrap-around) and reduced mod 2^k.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.typing import NDArray

from secagg._hazmat import commit, kex, prg, shamir, sign
from secagg.errors import AbortError, ProtocolError
from secagg.machine import SERVER, Message
from secagg.masking import _state
from secagg.masking._common import (
    ADVERTISE_SIG_LABEL,
    B_COMMIT_LABEL,
    CIPHERTEXT_BYTES,
    PAIR_MASK_LABEL,
    SURVIVORS_SIG_LABEL,
    advertise_payload,
    commit_context,
    commit_contexts,
    message_label,
    message_payload,
    pair_contexts,
    ring_bits,
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

__all__ = ["SecAggServer"]

log = logging.getLogger(__name__)

_Indices = Callable[[NDArray[np.int64]], NDArray[np.int64]]
_BatchCheck = Callable[[Sequence[int], Sequence[bytes | None]], list[bool]]

MAX_RECOVERY_TRIES = 512
"""Share subsets tried when a reconstruction fails its check (bounds the work a liar can cause)."""


class SecAggServer:
    """The aggregator of one SecAgg(+) round over the clients ``cids``.

    ``identities``: raw Ed25519 public keys of the clients, which turns on authenticated mode (signed
    keys and the consistency-check phase). ``random_bytes``: the CSPRNG for the server's throw-away key
    that probes advertised keys for low-order points (test seam, as for the client).
    """

    def __init__(
        self,
        cids: Sequence[int],
        *,
        session: bytes,
        round: int,
        modulus: int,
        size: int,
        threshold: float | int | None,
        graph: GraphSpec | None = None,
        identities: Mapping[int, bytes] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._session = bytes(session)
        self._round = round
        self._bits = ring_bits(modulus)
        self._modulus = modulus
        self._dtype = word_dtype(modulus)
        self._size = size
        self._identities = identities
        self._auth = identities is not None
        self._phases = _state.server_phases(self._auth)
        self._i = 0
        spec = graph or GraphSpec()
        self._graph: NeighbourGraph = spec.build(list(cids), threshold=threshold, session=self._session, round=round)
        self._graph.materialise()  # the server needs every neighbourhood: all at once, vectorised
        self._members = frozenset(self._graph.cohort)
        self._probe = kex.generate_private(random_bytes)
        self._t = spec.parameters(self._graph.n, threshold)[1]
        if self._graph.n < 2:
            raise ValueError(
                f"a secure sum over {self._graph.n} client(s) reveals that client's input: sample at least 2"
            )
        if self._t < 2:
            raise ValueError(f"threshold t={self._t}: one share would reveal a client's secrets; use t >= 2")
        if self._auth and 2 * self._t <= self._graph.k + 1:
            raise ValueError(
                f"authenticated mode needs 2t > share group ({self._t} of {self._graph.k + 1}): with 2t <= group "
                f"an active server showing two survivor lists needs no colluder; raise the threshold above 1/2"
            )
        if self._auth and identities is not None and not set(self._graph.cohort) <= set(identities):
            raise ValueError("authenticated mode needs an identity key for every sampled client")
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._s_pub: dict[int, kex.PublicKey] = {}
        self._shares: dict[int, ShareKeys] = {}
        self._acc = np.zeros(size, dtype=self._dtype)
        self._u3: set[int] = set()
        self._sigs: dict[int, bytes] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._u1: tuple[int, ...] = ()
        self._u2: tuple[int, ...] = ()
        self._survivors: tuple[int, ...] = ()
        self._result: NDArray[np.uint64] | None = None
        self._done = False
        self._asked_b: set[int] = set()
        self._asked_s: set[int] = set()
        self._bad: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ public state
    @property
    def phases(self) -> tuple[str, ...]:
        return self._phases

    @property
    def phase(self) -> str:
        return self._phases[min(self._i, len(self._phases) - 1)]

    @property
    def done(self) -> bool:
        return self._done

    @property
    def result(self) -> NDArray[np.uint64] | None:
        return self._result

    @property
    def included(self) -> tuple[int, ...]:
        return self._survivors if self._done else ()

    @property
    def threshold(self) -> int:
        return self._t

    @property
    def graph(self) -> NeighbourGraph:
        return self._graph

    @property
    def asked(self) -> tuple[frozenset[int], frozenset[int]]:
        """(clients whose b share was requested, clients whose s_sk share was requested) -- disjoint."""
        return frozenset(self._asked_b), frozenset(self._asked_s)

    def start(self) -> list[Message]:
        return []

    # ------------------------------------------------------------------ receiving
    def receive(self, msg: Message) -> list[Message]:
        if self._done:
            raise ProtocolError("the round is over; no more messages are accepted")
        expected = _state.SERVER_ACCEPTS[self.phase]
        if getattr(msg, "session", None) != self._session or getattr(msg, "round", None) != self._round:
            raise ProtocolError(f"{type(msg).__name__} from {msg.sender} belongs to another session or round")
        if msg.recipient != SERVER:
            raise ProtocolError(f"{type(msg).__name__} is not addressed to the server")
        if msg.sender not in self._members:
            raise ProtocolError(f"client {msg.sender} was not sampled for this round")
        if type(msg) is not expected:
            raise ProtocolError(
                f"{type(msg).__name__} from client {msg.sender} is out of phase: the server is collecting "
                f"{expected.__name__} (phase {self.phase!r})"
            )
        if isinstance(msg, AdvertiseKeys):
            self._on_advertise(msg)
        elif isinstance(msg, ShareKeys):
            self._on_share(msg)
        elif isinstance(msg, MaskedInput):
            self._on_masked(msg)
        elif isinstance(msg, ConsistencySignature):
            self._on_signature(msg)
        elif isinstance(msg, UnmaskResponse):
            self._on_unmask(msg)
        return []

    def _dup(self, seen: Iterable[int], sender: int) -> None:
        if sender in seen:
            raise ProtocolError(f"client {sender} already answered this phase (duplicated or replayed message)")

    def _on_advertise(self, msg: AdvertiseKeys) -> None:
        self._dup(self._adverts, msg.sender)
        if len(msg.c_pk) != kex.KEY_BYTES or len(msg.s_pk) != kex.KEY_BYTES or msg.c_pk == msg.s_pk:
            raise ProtocolError(f"client {msg.sender} advertised malformed keys")
        try:  # a low-order point gives an all-zero shared secret with any key: refuse it now
            c_pub, s_pub = kex.parse_public(msg.c_pk), kex.parse_public(msg.s_pk)
            kex.agree_many(self._probe, [c_pub, s_pub], label=b"privagg/secagg/key-validity-probe", contexts=[b""] * 2)
        except ValueError as exc:
            raise ProtocolError(f"client {msg.sender} advertised an unusable X25519 key") from exc
        if len(msg.b_commit) != commit.COMMIT_BYTES:
            raise ProtocolError(f"client {msg.sender} advertised no {commit.COMMIT_BYTES}-byte self-mask commitment")
        if self._identities is not None:
            payload = advertise_payload(self._session, self._round, msg.sender, msg.c_pk, msg.s_pk, msg.b_commit)
            if not sign.verify(self._identities[msg.sender], msg.signature, label=ADVERTISE_SIG_LABEL, payload=payload):
                raise ProtocolError(f"client {msg.sender}'s advertised keys are not signed by its identity key")
        elif msg.signature:
            raise ProtocolError("signature on advertised keys in unauthenticated mode")
        self._adverts[msg.sender] = msg
        self._s_pub[msg.sender] = s_pub  # parsed once: the unmask step agrees with it per dropped neighbour

    def _check_signed(self, msg: ShareKeys | MaskedInput | UnmaskResponse) -> None:
        """Authenticated mode: the client's signature over (session, round, sender, phase, content digest)."""
        if self._identities is None:
            if msg.signature:
                raise ProtocolError(f"signature on a {type(msg).__name__} in unauthenticated mode")
            return
        payload = message_payload(self._session, self._round, msg)
        if not sign.verify(self._identities[msg.sender], msg.signature, label=message_label(msg), payload=payload):
            raise ProtocolError(
                f"{type(msg).__name__} from client {msg.sender} is not signed by its identity key: altered in "
                f"transit, replayed from another phase, or forged"
            )

    def _on_share(self, msg: ShareKeys) -> None:
        self._dup(self._shares, msg.sender)
        if msg.sender not in self._u1:
            raise ProtocolError(f"client {msg.sender} did not take part in the advertise phase")
        want = tuple(sorted((self._graph.group(msg.sender) & set(self._u1)) - {msg.sender}))
        if msg.recipients != want or len(msg.ciphertexts) != len(want):
            raise ProtocolError(f"client {msg.sender} must send one ciphertext to each of {list(want)}")
        if any(len(c) != CIPHERTEXT_BYTES for c in msg.ciphertexts):
            raise ProtocolError(f"client {msg.sender} sent ciphertexts of the wrong length")
        self._check_signed(msg)
        self._shares[msg.sender] = msg

    def _on_masked(self, msg: MaskedInput) -> None:
        self._dup(self._u3, msg.sender)
        if msg.sender not in self._u2:
            raise ProtocolError(f"client {msg.sender} did not share its keys; its masked input cannot be unmasked")
        y = msg.y
        if not isinstance(y, np.ndarray) or y.dtype != np.dtype(self._dtype) or y.shape != (self._size,):
            raise ProtocolError(
                f"client {msg.sender} sent a masked input of {getattr(y, 'dtype', type(y))} "
                f"{getattr(y, 'shape', '')}; expected {np.dtype(self._dtype)} ({self._size},)"
            )
        self._check_signed(msg)
        np.add(self._acc, y, out=self._acc)
        self._u3.add(msg.sender)

    def _on_signature(self, msg: ConsistencySignature) -> None:
        self._dup(self._sigs, msg.sender)
        assert self._identities is not None
        if msg.sender not in self._survivors:
            raise ProtocolError(f"client {msg.sender} is not a survivor and may not sign the survivor list")
        payload = survivors_payload(self._session, self._round, self._survivors)
        if not sign.verify(self._identities[msg.sender], msg.signature, label=SURVIVORS_SIG_LABEL, payload=payload):
            raise ProtocolError(f"client {msg.sender}'s consistency signature is invalid")
        self._sigs[msg.sender] = msg.signature

    def _on_unmask(self, msg: UnmaskResponse) -> None:
        self._dup(self._responses, msg.sender)
        req = self._requests.get(msg.sender)
        if req is None:
            raise ProtocolError(f"client {msg.sender} was not asked to unmask")
        if msg.alive != req.alive or msg.dropped != req.dropped:
            raise ProtocolError(f"client {msg.sender} answered for other clients than the server asked about")
        if len(msg.b_shares) != len(req.alive) or len(msg.s_shares) != len(req.dropped):
            raise ProtocolError(f"client {msg.sender} sent the wrong number of shares")
        try:  # every share checked here (66 bytes, a field element); the unmask step reads the bytes
            for share in itertools.chain(msg.b_shares, msg.s_shares):
                shamir.decode_share(share)
        except ValueError as exc:
            raise ProtocolError(f"client {msg.sender} sent a malformed share: {exc}") from exc
        self._check_signed(msg)
        self._responses[msg.sender] = msg

    # ------------------------------------------------------------------ phase transitions
    def _require(self, phase: str, live: set[int], whose: Iterable[int]) -> None:
        """Abort unless every share group of ``whose`` keeps >= t members in ``live``."""
        worst = None
        for u in whose:
            c = len(self._graph.group(u) & live)
            worst = c if worst is None else min(worst, c)
        if worst is None:
            worst = 0
        if worst < self._t:
            raise AbortError(phase, needed=self._t, answered=worst)

    def end_phase(self) -> list[Message]:
        if self._done:
            return []
        phase = self.phase
        if phase == _state.ADVERTISE:
            out = self._close_advertise()
        elif phase == _state.SHARE:
            out = self._close_share()
        elif phase == _state.MASKED:
            out = self._close_masked()
        elif phase == _state.CONSISTENCY:
            out = self._close_consistency()
        else:
            self._close_unmask()
            return []
        self._i += 1
        return out

    def _close_advertise(self) -> list[Message]:
        u1 = set(self._adverts)
        self._require(_state.ADVERTISE, u1, u1)
        self._u1 = tuple(sorted(u1))
        out: list[Message] = []
        for u in self._u1:
            ids = tuple(sorted(self._graph.group(u) & u1))
            ads = [self._adverts[v] for v in ids]
            out.append(
                KeyDirectory(
                    SERVER,
                    u,
                    self._session,
                    self._round,
                    self._graph.cohort,
                    ids,
                    tuple(a.c_pk for a in ads),
                    tuple(a.s_pk for a in ads),
                    tuple(a.signature for a in ads),
                    tuple(a.b_commit for a in ads),
                )
            )
        return out

    def _close_share(self) -> list[Message]:
        u2 = set(self._shares)
        self._require(_state.SHARE, u2, u2)
        self._u2 = tuple(sorted(u2))
        inbox: dict[int, list[tuple[int, bytes]]] = {u: [] for u in self._u2}
        for v in self._u2:
            sk = self._shares[v]
            for r, ct in zip(sk.recipients, sk.ciphertexts, strict=True):
                if r in inbox:
                    inbox[r].append((v, ct))
        out: list[Message] = []
        for u in self._u2:
            items = sorted(inbox[u])
            out.append(
                ShareDelivery(
                    SERVER, u, self._session, self._round, tuple(v for v, _ in items), tuple(c for _, c in items)
                )
            )
        return out

    def _needs_s(self, live: set[int]) -> list[int]:
        """Dropped clients (shared keys, no masked input) whose masks sit in some survivor's input."""
        return [w for w in self._u2 if w not in self._u3 and self._graph.neighbours(w) & live]

    def _close_masked(self) -> list[Message]:
        u3 = set(self._u3)
        self._require(_state.MASKED, u3, [*u3, *self._needs_s(u3)])
        self._survivors = tuple(sorted(u3))
        if self._auth:
            return [ConsistencyCheck(SERVER, u, self._session, self._round, self._survivors) for u in self._survivors]
        return self._unmask_requests(u3)

    def _close_consistency(self) -> list[Message]:
        u4 = set(self._sigs)
        self._require(_state.CONSISTENCY, u4, [*self._u3, *self._needs_s(set(self._u3))])
        return self._unmask_requests(u4)

    def _unmask_requests(self, responders: set[int]) -> list[Message]:
        u2, u3 = set(self._u2), set(self._u3)
        out: list[Message] = []
        for u in sorted(responders):
            group = self._graph.group(u)
            alive = tuple(sorted(group & u3))
            dropped = tuple(sorted((group & u2) - u3))
            signers: tuple[int, ...] = ()
            sigs: tuple[bytes, ...] = ()
            if self._auth:
                signers = tuple(sorted(group & set(self._sigs)))
                sigs = tuple(self._sigs[v] for v in signers)
            # Invariant: one kind of share per client, across the whole round.
            if set(alive) & self._asked_s or set(dropped) & self._asked_b:  # never reached by construction
                raise ProtocolError("refusing to ask for both kinds of share of one client")
            self._asked_b.update(alive)
            self._asked_s.update(dropped)
            req = UnmaskRequest(SERVER, u, self._session, self._round, alive, dropped, signers, sigs)
            self._requests[u] = req
            out.append(req)
        return out

    def _share_table(self, kind: int, wanted: set[int]) -> _ShareTable:
        """Every share of one kind (0: b, 1: s_sk) that came back for the ``wanted`` owners, as a table."""
        owners: list[tuple[int, ...]] = []
        blobs: list[tuple[bytes, ...]] = []
        senders: list[int] = []
        lens: list[int] = []
        for r, resp in self._responses.items():
            own = resp.dropped if kind else resp.alive
            if own:
                owners.append(own)
                blobs.append(resp.s_shares if kind else resp.b_shares)
                senders.append(r)
                lens.append(len(own))
        chain = itertools.chain.from_iterable
        gr = self._graph
        o = gr.indices(np.fromiter(chain(owners), dtype=np.int64, count=sum(lens)))  # cohort indices from here
        raw = np.frombuffer(b"".join(map(b"".join, blobs)), dtype=np.uint8).reshape(len(o), shamir.SHARE_BYTES)
        holders = np.repeat(gr.indices(np.asarray(senders, dtype=np.int64)), lens)
        xs = gr.points_at(holders, o)  # r's evaluation point in each owner's group
        # complete graph: points are holder id + 1, columns in cohort order; else offsets 1..k+1
        cols, width = (holders, gr.n) if gr.complete else (xs - 1, gr.k + 1)
        ids = np.asarray(gr.cohort, dtype=np.int64)
        return _ShareTable.build(o, xs, ids[holders], cols, width, raw, sorted(wanted), gr.indices)

    def _reconstruct(self, table: _ShareTable) -> dict[int, bytes | None]:
        """Every owner's secret from its t shares at the lowest points, in one batched call.

        ``None`` marks a secret whose shares are inconsistent (the caller's check names the liars).
        """
        sel = table.lowest(self._t)  # (owners, t) indices into the table's shares
        return dict(zip(table.owners, shamir.combine_table(table.x[sel], table.raw[sel]), strict=True))

    @property
    def bad_shares(self) -> Mapping[int, frozenset[int]]:
        """Sender -> owners whose share it sent wrong (found when a reconstruction failed its check).

        Only shares the server needed are judged: a wrong spare share beyond the first t is never used.
        """
        return {r: frozenset(v) for r, v in self._bad.items()}

    def _opens_commitment(self, u: int) -> Callable[[bytes], bool]:
        ctx, want = commit_context(self._session, self._round, u), self._adverts[u].b_commit
        return lambda secret: commit.matches(secret, want, label=B_COMMIT_LABEL, context=ctx)

    def _opens_mask_key(self, w: int) -> Callable[[bytes], bool]:
        public = self._adverts[w].s_pk
        return lambda secret: _opens_key(secret, public)

    def _recover(
        self, owner: int, what: str, shares: list[tuple[int, int]], ok: Callable[[bytes], bool],
        senders: Mapping[int, int],
    ) -> bytes:
        """A secret from >= t shares that passes ``ok``; liars (``senders``: x -> client) are named and
        dropped, else AbortError. The slow path, taken only after the fast reconstruction failed its check."""
        secret, bad = _reconstruct(shares, self._t, ok)
        for x in sorted(bad):
            log.warning("client %d sent a wrong share of client %d's %s; dropped", senders[x], owner, what)
            self._bad.setdefault(senders[x], set()).add(owner)
        if secret is None:
            raise AbortError(
                _state.UNMASK,
                needed=self._t,
                answered=len(shares),
                reason=(
                    f"the {len(shares)} shares of client {owner}'s {what} contain no {self._t} that reconstruct "
                    f"the secret it committed to when advertising its keys: some client(s) sent wrong shares. "
                    f"No sum is released; find the faulty client(s) or raise the number of spare responders"
                ),
            )
        return secret

    def _close_unmask(self) -> None:
        u3 = set(self._u3)
        needs_s = self._needs_s(u3)
        b_tab, s_tab = self._share_table(0, u3), self._share_table(1, set(needs_s))
        # Every share-holder that answered returns its share of each owner in its group: the counts are
        # the answered members of each owner's group.
        worst = min(b_tab.least(), s_tab.least()) if needs_s else b_tab.least()
        if worst < self._t:
            raise AbortError(_state.UNMASK, needed=self._t, answered=worst)
        total = self._acc  # the accumulator is not needed afterwards: unmask in place
        exp = prg.MaskExpander(self._size, self._dtype)
        for b in self._secrets(b_tab, "self-mask seed", self._commitments_open, self._opens_commitment).values():
            exp.add(total, b, -1)
        keys: dict[int, kex.PrivateKey] = {}  # parsed once, when checked against the advertised key
        check_keys = functools.partial(self._keys_open, keys)
        for w, s_sk in self._secrets(s_tab, "mask key", check_keys, self._opens_mask_key).items():
            for seed, sign_ in self._pair_seeds(w, keys.get(w) or kex.private_from_bytes(s_sk), u3):
                exp.add(total, seed, sign_)
        result = total.astype(np.uint64)
        if self._bits < 64:
            result &= np.uint64(self._modulus - 1)
        self._result = result
        self._done = True
        self._i = len(self._phases) - 1

    def _secrets(
        self, table: _ShareTable, what: str, batch: _BatchCheck, check: Callable[[int], Callable[[bytes], bool]]
    ) -> dict[int, bytes]:
        """Each owner's secret, checked (``batch``: commitment / public key of every owner at once); the slow
        path (``check``: one owner's test) names liars or aborts."""
        fast = self._reconstruct(table) if table.owners else {}
        got = [fast[u] for u in table.owners]
        out: dict[int, bytes] = {}
        for u, secret, good in zip(table.owners, got, batch(table.owners, got), strict=True):
            if secret is None or not good:  # fast path failed its check: find t good shares
                secret = self._recover(u, what, table.shares(u), check(u), table.senders(u))
            out[u] = secret
        return out

    def _commitments_open(self, owners: Sequence[int], secrets: Sequence[bytes | None]) -> list[bool]:
        """Whether each reconstructed b opens its owner's advertised commitment (one batched call)."""
        return commit.matches_many(
            secrets,
            [self._adverts[u].b_commit for u in owners],
            label=B_COMMIT_LABEL,
            contexts=commit_contexts(self._session, self._round, owners),
        )

    def _keys_open(
        self, keys: dict[int, kex.PrivateKey], owners: Sequence[int], secrets: Sequence[bytes | None]
    ) -> list[bool]:
        """Whether each reconstructed s_sk belongs to its owner's advertised s_pk; the parsed keys go to ``keys``."""
        out = []
        for w, secret in zip(owners, secrets, strict=True):
            key = kex.private_matching(secret, self._adverts[w].s_pk)
            if key is not None:
                keys[w] = key
            out.append(key is not None)
        return out

    def _pair_seeds(self, w: int, s_sk: kex.PrivateKey, survivors: set[int]) -> list[tuple[bytes, int]]:
        """(seed, sign) removing each mask the dropped ``w`` shared with a surviving neighbour.

        A survivor v added +PRG(s_{v,w}) if v < w, -PRG otherwise: the server applies the opposite.
        """
        peers = sorted(self._graph.neighbours(w) & survivors)
        seeds = kex.agree_many(
            s_sk,
            [self._s_pub[v] for v in peers],
            label=PAIR_MASK_LABEL,
            contexts=pair_contexts(self._session, self._round, w, peers),
        )
        return [(seed, -1 if v < w else +1) for seed, v in zip(seeds, peers, strict=True)]


def _opens_key(secret: bytes, public: bytes) -> bool:
    try:
        return kex.public_from_private_bytes(secret) == public
    except ValueError:
        return False


def _reconstruct(
    shares: Sequence[tuple[int, int]], t: int, ok: Callable[[bytes], bool]
) -> tuple[bytes | None, set[int]]:
    """(secret, x of each share found wrong): the first t shares, else t of the others that pass ``ok``.

    Slow path only after a failed check: leave e = 1, 2, ... shares out (at most MAX_RECOVERY_TRIES
    subsets); once t shares give a secret that passes, each left-out share is checked against their
    polynomial, so exactly the wrong ones are named.
    """
    if len(shares) < t:
        return None, set()
    tries = 0
    for e in range(len(shares) - t + 1):
        for out in itertools.combinations(range(len(shares)), e):
            tries += 1
            if tries > MAX_RECOVERY_TRIES:
                return None, set()
            left = set(out)
            used = [s for i, s in enumerate(shares) if i not in left][:t]
            try:
                secret = shamir.combine(used, threshold=t)
            except ValueError:
                continue
            if ok(secret):
                return secret, {shares[i][0] for i in out if shamir.interpolate(used, shares[i][0]) != shares[i][1]}
    return None, set()


@dataclass(frozen=True, slots=True)
class _ShareTable:
    """The shares of one kind that came back, indexed by (owner, column in point order).

    ``at[i, c]`` is the index (into ``x``, ``sender``, ``raw``) of the share of ``owners[i]`` at the c-th
    possible point, or -1: built and searched with vectorised numpy, not a Python append per share, so
    the unmask step's cost stays with the masks.
    """

    owners: list[int]  # sorted
    at: NDArray[np.int32]
    x: NDArray[np.int64]
    sender: NDArray[np.int64]
    raw: NDArray[np.uint8]  # (shares, SHARE_BYTES): each share's value as sent (checked in receive)

    @classmethod
    def build(
        cls, owner: NDArray[np.int64], x: NDArray[np.int64], sender: NDArray[np.int64], col: NDArray[np.int64],
        width: int, raw: NDArray[np.uint8], owners: list[int], indices: _Indices,
    ) -> _ShareTable:
        """``owner``: each share's owner as a cohort index (``indices`` maps ids to them); ``owners``: the
        owner ids wanted (sorted); shares of others are left out."""
        wanted = indices(np.asarray(owners, dtype=np.int64))
        rows = np.full(int(max(owner.max(initial=-1), wanted.max(initial=-1))) + 1, -1, dtype=np.int64)
        rows[wanted] = np.arange(len(owners))
        row = rows[owner]
        keep = row >= 0
        at = np.full((len(owners), width), -1, dtype=np.int32)
        at[row[keep], col[keep]] = np.flatnonzero(keep)
        return cls(owners, at, x, sender, raw)

    def least(self) -> int:
        """The fewest shares any wanted owner has (0 if one has none)."""
        return int((self.at >= 0).sum(axis=1).min()) if self.owners else 0

    def lowest(self, t: int) -> NDArray[np.int32]:
        """(owners, t) indices of each owner's t shares at the lowest points (each owner has >= t)."""
        have = self.at >= 0
        pick = have & (np.cumsum(have, axis=1) <= t)
        return self.at[pick].reshape(len(self.owners), t)

    def _row(self, owner: int) -> list[int]:
        row = self.at[bisect.bisect_left(self.owners, owner)]
        return cast(list[int], row[row >= 0].tolist())

    def shares(self, owner: int) -> list[tuple[int, int]]:
        """All shares of ``owner`` as (point, value), lowest point first."""
        return [(int(self.x[i]), int.from_bytes(self.raw[i].tobytes(), "big")) for i in self._row(owner)]

    def senders(self, owner: int) -> dict[int, int]:
        """Evaluation point -> the client that sent that share (to name a liar)."""
        return {int(self.x[i]): int(self.sender[i]) for i in self._row(owner)}
