"""Packed Paillier through ``privagg_mod`` and ``SecureAggregation``: a user's own Flower app, a key-holder node.

Three parties, as in the privagg job path (:mod:`fl.runners.flower.keyholder`, whose key files, policy
fields and decryption rule this module reuses):

* The **key holder** is a SuperNode running the SAME ClientApp (with ``privagg_mod``) whose own node
  config says ``role="key-holder"`` and ``paillier-key-file="DIR/key.json"`` (made ONCE on its machine by
  ``privagg flower paillier-keygen --out DIR``; mode 0600). On that node the mod NEVER calls the user's
  ClientApp: it answers privagg's hello (its role and PUBLIC key) and decryption requests, and refuses
  everything else. It decrypts no aggregate that claims fewer clients than ITS policy's
  ``min_summands`` (``privagg flower policy --min-summands N``; at least 2), and at most one aggregate
  per round number, in increasing order (its own record in the node state).
* The **clients** encrypt their update to the key holder's public key the server names in the round's
  terms only if its fingerprint is the one THEIR OWN policy pins (``paillier_key_fingerprint``,
  ``privagg flower policy --paillier-key public.json``, which also adds ``paillier`` to the node's
  protocols). A node that pins no key refuses every Paillier round: otherwise a server could name a key
  pair it holds itself and decrypt each client's update.
* The **aggregator** (:class:`~fl.runners.flower.workflow.SecureAggregation` with ``protocol="paillier"``)
  multiplies ciphertexts and has only the public key. It finds the key holder once (each node's own
  hello: :class:`KeyHolderDirectory`) and pins it; :meth:`SecureGrid.get_node_ids` returns only nodes
  that said they are clients, so the strategy never samples the key holder (and the legacy
  ``DefaultWorkflow`` path unregisters it from the client manager).

The round: ``start`` (the strategy's train message plus the terms, the public key included) -> each client
trains, encrypts ``[w, w * update]`` (or the clipped, noised update with DP) and replies with its
ciphertexts; the server adds the included clients' ciphertexts and sends the aggregate to the key holder
(``stage="decrypt"``); the key holder replies with the decrypted sum, which the server decodes exactly
as it decodes a SecAgg+ sum (same :class:`~fl.pipeline.Pipeline`, same quantization).

What this does NOT stop (stated, not hidden; as in the job path): Paillier is malleable and the summand
count is the server's word, so a malicious server that pads one client's ciphertext with encryptions
of zero it made gets that update decrypted as a "sum"; and the ciphertexts carry no round binding, so
a server that replays old ciphertexts under new round numbers can have subsets of one round decrypted.
Both need authenticated (signed) client ciphertexts to stop; the guarantee is against an
honest-but-curious aggregator that does not collude with the key holder. With distributed DP noise, the
floor of summands a client's worst case assumes is enforced by the server's ``min_clients`` (t of the
cohort) and the key holder's ``min_summands``, not by the client itself (a SecAgg client refuses a round
with fewer members; a Paillier client has sent its ciphertexts before the round's members are known).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fl.runners.flower import keyholder
from fl.runners.flower.mod import RECORD, _error, _incoming, _int, _reply, _session
from fl.runners.flower.policy import NodePolicy, PolicyError
from secagg import wire
from secagg.errors import CodecError, ProtocolError, SecAggError
from secagg.machine import KEY_HOLDER
from secagg.machine import Message as ProtocolMessage
from secagg.paillier import PaillierPublicKey

if TYPE_CHECKING:
    from fl.runners.flower.mod import SecureTerms
    from fl.runners.flower.workflow import FlowerTransport
    from fl.sums.paillier import PaillierSum

__all__ = ["DECRYPT", "HELLO", "KeyHolder", "KeyHolderDirectory", "KeyHolderTransport", "check_pinned_key",
           "client_hello", "key_holder_mod", "paillier_sum"]

log = logging.getLogger(__name__)

HELLO = "hello"
"""The ``stage`` of privagg's hello: each node answers with its role (the key holder also with its public key)."""
DECRYPT = "decrypt"
"""The ``stage`` of a decryption request to the key holder (one ``PaillierAggregate``)."""
_CLIENT, _HOLDER, _OTHER = "client", keyholder.KEY_HOLDER_ROLE, "other"
_REFUSED = (PolicyError, ProtocolError, CodecError, SecAggError, ValueError, TypeError, KeyError, RuntimeError)


# ------------------------------------------------------------------------------------------ the terms
def _terms_key(terms: SecureTerms) -> PaillierPublicKey:
    if not terms.paillier_public_key:
        raise ProtocolError("a paillier round must carry the key holder's public key (paillier_public_key)")
    try:
        return keyholder.public_key_from_json(terms.paillier_public_key, "the round's paillier_public_key")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


def paillier_sum(terms: SecureTerms) -> PaillierSum:
    """The round's Paillier sum: the key holder's public key only, ``min_clients`` t of the cohort (>= 2)."""
    from fl.sums.paillier import PaillierSum

    public = _terms_key(terms)
    least = max(2, math.ceil(terms.threshold * terms.cohort))
    return PaillierSum(key_bits=public.bits, min_clients=least).adopt_public_key(public)


def check_pinned_key(terms: SecureTerms, policy: NodePolicy) -> None:
    """A client encrypts only to the key its OWN policy pins (``PolicyError`` otherwise, naming the fix)."""
    keyholder.check_key_pin(policy.paillier_key_fingerprint, _terms_key(terms), what="the server's")


# ------------------------------------------------------------------------------------- the node side
def client_hello(msg: Message) -> Message:
    """A client node's hello: its role only (the ClientApp is not called)."""
    return Message(RecordDict({RECORD: ConfigRecord({"role": _CLIENT})}), reply_to=msg)


def key_holder_mod(msg: Message, context: Context) -> Message:
    """``privagg_mod`` on the key-holder node: hello and decryption only; the ClientApp is never called."""
    try:
        rec = msg.content.get(RECORD, None)
        stage = rec.get("stage") if isinstance(rec, ConfigRecord) else None
        if stage == HELLO:
            return _holder_hello(msg, context)
        if stage == DECRYPT:
            return _decrypt(msg, context, rec)
        raise PolicyError(f"this SuperNode is the Paillier key holder: it answers only privagg's hello and "
                          f"decryption requests and never runs the ClientApp (got {msg.metadata.message_type} "
                          f"stage {stage!r}); do not sample it")
    except _REFUSED as exc:
        return _error(msg, exc)


def _holder_hello(msg: Message, context: Context) -> Message:
    private = keyholder.own_private_key(context)  # refuses a missing or world-readable key file now
    least = NodePolicy.from_node_config(context.node_config).min_summands
    rec = ConfigRecord({"role": _HOLDER, "public-key": private.public.to_json(),
                        "fingerprint": private.public.fingerprint.hex(), "min-summands": least})
    return Message(RecordDict({RECORD: rec}), reply_to=msg)


def _decrypt(msg: Message, context: Context, rec: Any) -> Message:
    private = keyholder.own_private_key(context)
    out = keyholder.decrypt_aggregate(context, private, _incoming(rec), session=_session(rec),
                                      round=_int(rec, "round"), planned=None)
    return _reply(msg, out)


# ----------------------------------------------------------------------------------- the server side
@dataclass(frozen=True)
class KeyHolder:
    """The pinned key-holder node: its Flower node id, public key and ``min_summands`` (from its hello)."""

    node: int
    public: PaillierPublicKey
    min_summands: int

    @property
    def public_json(self) -> str:
        return self.public.to_json()


class KeyHolderDirectory:
    """Which SuperNodes are clients, and the one key holder: each node's own hello, asked once per node.

    ``public_key``: the key holder's public key as the operator has it (``public.json`` path, its JSON,
    or the key); the key holder's hello must name it. Without it the server takes the key holder's key
    (the clients pin it anyway). Nodes that did not answer are asked again on the next call; a node
    whose hello failed (no ``privagg_mod``) is never offered to the strategy.
    """

    def __init__(self, *, public_key: str | Path | PaillierPublicKey | None = None, timeout: float = 30.0,
                 poll_interval: float = 0.05) -> None:
        self.expected = _operator_key(public_key)
        self.timeout = timeout
        self.poll = poll_interval
        self.roles: dict[int, str] = {}
        self.refused: dict[int, str] = {}  # why a node's hello failed (a key holder without a usable key, ...)
        self.holder: KeyHolder | None = None

    def refresh(self, grid: Any) -> None:
        """Ask every node not yet classified for its hello; classify the replies; pin the key holder."""
        unknown = [n for n in grid.get_node_ids() if n not in self.roles]
        if not unknown:
            return
        for node, reply in _ask_hello(grid, unknown, timeout=self.timeout, poll=self.poll).items():
            self.roles[node] = self._classify(node, reply)

    def _classify(self, node: int, reply: Message) -> str:
        rec = None if reply.has_error() else reply.content.get(RECORD)
        role = rec.get("role") if isinstance(rec, ConfigRecord) else None
        if role == _CLIENT:
            return _CLIENT
        if role != _HOLDER:
            why = str(reply.error.reason) if reply.has_error() else f"role {role!r}"
            self.refused[node] = why
            log.warning("node %d is not a privagg_mod client or key holder (%s); it is never sampled", node, why)
            return _OTHER
        self._pin(node, rec)
        return _HOLDER

    def _pin(self, node: int, rec: Any) -> None:
        if self.holder is not None and self.holder.node != node:
            raise RuntimeError(f"a paillier run needs exactly one key-holder SuperNode, found {self.holder.node} and "
                               f"{node}: give only one node role=\"key-holder\"")
        text, least = rec.get("public-key"), rec.get("min-summands")
        if not isinstance(text, str) or isinstance(least, bool) or not isinstance(least, int):
            raise ProtocolError(f"key-holder node {node} sent a malformed hello")
        public = keyholder.public_key_from_json(text, f"key-holder node {node}'s public key")
        if self.expected is not None and public != self.expected:
            raise RuntimeError(f"key-holder node {node} holds key {public.fingerprint.hex()}, not the key "
                               f"{self.expected.fingerprint.hex()} this server was given: check its paillier-key-file")
        self.holder = KeyHolder(node, public, least)
        log.info("key holder pinned: node %d, key %s, min_summands %d", node, public.fingerprint.hex(), least)

    def clients(self, grid: Any) -> list[int]:
        """The node ids the strategy may sample: nodes whose own hello said ``client``."""
        self.refresh(grid)
        return [n for n in grid.get_node_ids() if self.roles.get(n) == _CLIENT]

    def key_holder(self, grid: Any) -> KeyHolder:
        """The pinned key holder (found now if not yet); an error naming the fix if there is none."""
        if self.holder is None:
            self.refresh(grid)
        if self.holder is None:
            failed = f"; nodes whose hello failed: {self.refused}" if self.refused else ""
            raise ProtocolError("no key-holder SuperNode answered: start one running this ClientApp with "
                                "--node-config 'role=\"key-holder\" paillier-key-file=\"DIR/key.json\"' (the key "
                                f"pair from `privagg flower paillier-keygen --out DIR`){failed}")
        return self.holder

    def prepare(self, grid: Any, instructions: Sequence[Message]) -> tuple[KeyHolder, list[Message]]:
        """The round's key holder, and the strategy's instructions without any to it (it never trains)."""
        holder = self.key_holder(grid)
        kept = [m for m in instructions if m.metadata.dst_node_id != holder.node]
        if len(kept) != len(instructions):
            log.warning("the strategy sampled the key-holder node %d; it is left out of the round", holder.node)
        if len({m.metadata.dst_node_id for m in kept}) < holder.min_summands:  # refused before anyone trains
            raise ProtocolError(f"the key holder decrypts sums of at least {holder.min_summands} clients; the "
                                f"strategy sampled {len(kept)}: sample more clients per round")
        return holder, kept

    def hide_from(self, client_manager: Any, grid: Any) -> None:
        """Legacy ``DefaultWorkflow``: unregister the key holder from the client manager (never sampled)."""
        holder = self.key_holder(grid)
        for proxy in list(client_manager.all().values()):
            if getattr(proxy, "node_id", None) == holder.node:
                client_manager.unregister(proxy)


def _operator_key(key: str | Path | PaillierPublicKey | None) -> PaillierPublicKey | None:
    if key is None or isinstance(key, PaillierPublicKey):
        return key
    if isinstance(key, Path) or not key.lstrip().startswith("{"):
        return keyholder.read_public_key(Path(key))
    return keyholder.public_key_from_json(key, "SecureAggregation(paillier_public_key=...)")


def _ask_hello(grid: Any, nodes: Iterable[int], *, timeout: float, poll: float) -> dict[int, Message]:
    """Push a hello to each of ``nodes``; the replies that arrive within ``timeout`` seconds, by node."""
    msgs = [Message(RecordDict({RECORD: ConfigRecord({"stage": HELLO})}), dst_node_id=n,
                    message_type=MessageType.TRAIN, group_id="privagg-hello", ttl=timeout + 60.0) for n in nodes]
    ids = {i for i in grid.push_messages(msgs) if i}
    deadline = time.monotonic() + timeout
    out: dict[int, Message] = {}
    while ids:
        for reply in grid.pull_messages(ids):
            ids.discard(reply.metadata.reply_to_message_id)
            out[reply.metadata.src_node_id] = reply
        if not ids or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return out


class KeyHolderTransport:
    """The round's transport: client phases through ``inner``; messages to ``KEY_HOLDER`` to the key-holder node."""

    def __init__(self, inner: FlowerTransport, holder: KeyHolder) -> None:
        self.inner = inner
        self.holder = holder

    def exchange(self, phase: str, outbox: Sequence[ProtocolMessage], *,
                 deadline: float | None) -> Iterable[ProtocolMessage]:
        """Deliver one phase; a decryption request goes to the key holder (``stage="decrypt"``), alone."""
        ours = [m for m in outbox if m.recipient == KEY_HOLDER]
        if not ours:
            return self.inner.exchange(phase, outbox, deadline=deadline)
        if len(ours) != len(outbox):
            raise ProtocolError("a Paillier phase mixes key-holder and client messages")
        return self._decrypt(ours, deadline)

    def _decrypt(self, msgs: Sequence[ProtocolMessage], deadline: float | None) -> list[ProtocolMessage]:
        from fl.runners.flower.workflow import _ttl

        tr = self.inner
        rec = ConfigRecord({"stage": DECRYPT, "session": tr.session, "round": tr.round,
                            "msgs": wire.encode_frames(list(msgs))})
        request = Message(RecordDict({RECORD: rec}), dst_node_id=self.holder.node, message_type=MessageType.TRAIN,
                          group_id=tr.group_id, ttl=_ttl(deadline))
        for reply in tr.push_and_collect([request], deadline=deadline):
            if reply.metadata.src_node_id == self.holder.node:
                try:
                    return tr.decode(KEY_HOLDER, reply)  # its messages must come from KEY_HOLDER
                except (ProtocolError, CodecError) as exc:
                    raise ProtocolError(f"round {tr.round}: the key holder did not decrypt: {exc}") from exc
        raise ProtocolError(f"round {tr.round}: the key-holder node {self.holder.node} did not answer in time")

