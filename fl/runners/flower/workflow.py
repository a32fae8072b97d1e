"""``SecureAggregation``: privagg's SecAgg / SecAgg+ (optionally with client-level DP) for a Flower ServerApp.

The server half of :func:`fl.runners.flower.mod.privagg_mod`. One object, two ways in, as a Flower user
composes Flower's own ``SecAggPlusWorkflow``:

* Message API strategies (``flwr.serverapp.strategy.FedAvg`` & co.)::

      sa = SecureAggregation(protocol="secagg+", threshold=0.7)
      result = FedAvg().start(grid=sa.wrap(grid), initial_arrays=arrays, num_rounds=3)

  :meth:`SecureAggregation.wrap` returns a Grid whose ``send_and_receive`` of the strategy's train
  messages runs one secure round and answers with ONE reply: the new global model (``global +`` the
  weighted mean update) with ``num-examples`` the round's total weight, so the strategy's weighted
  average is exactly that model. Everything else (evaluate, queries) passes through unchanged.
* Legacy strategies (``flwr.server.strategy.FedAvg``) in ``DefaultWorkflow`` with a ``LegacyContext``,
  exactly where ``SecAggPlusWorkflow`` goes: ``DefaultWorkflow(fit_workflow=SecureAggregation(...))``.

The phases are driven by :func:`secagg.drive.drive` over :class:`FlowerTransport` (one Flower exchange per
delivery, the phase deadline as the dropout rule; a SuperNode that errs, sends garbage or speaks for
someone else is dropped). Only the sum is ever decoded; the server never sees one client's update.

Client-level DP (``clip=S, noise_multiplier=z``): each update is clipped to L2 norm ``S``; Gaussian noise
``z * S`` is added to the sum by the server (``placement="server"``) or split across the planned clients
(``"clients"``, so the server never sees a noiseless sum). Every round is accounted by
:class:`fl.privacy.accounting.DpFedAvgAccounting` (PLD) and written to :attr:`SecureAggregation.ledger`;
a round that would exceed ``epsilon`` is not run. Flower's strategy samples clients with Python's
``random`` (not a CSPRNG, and the server knows the sample), so no amplification by sampling is claimed:
each round is charged as if every client took part.

Authenticated SecAgg / SecAgg+ (active-server security: Ed25519-signed messages and the consistency
round)::

    sa = SecureAggregation(protocol="secagg+", threshold=0.7, authenticated=True, roster="roster.json")

``roster``: the consortium's :class:`~fl.runners.flower.identity.Roster` (``privagg flower identity`` at
each site, ``privagg flower roster`` once; a path, its JSON dict or the object), the same file every node
holds and pins. The server holds only public keys. Client ids are roster entries: before a node's first
round the workflow asks it (one ``identify`` message per node and run) and keeps only answers signed by
that entry's key; a node that does not prove an entry sits the round out (logged). Each node checks the
roster and its id against its own configuration (:mod:`fl.runners.flower.mod`). The threshold must be
above one half of each share group (``2t > m``), else the split-view attack works with no colluder.

Packed Paillier (``protocol="paillier"``; :mod:`fl.runners.flower.mod_paillier`): the clients encrypt to a
key-holder SuperNode's public key (pinned by each client's own policy), this workflow multiplies the
ciphertexts and sends only the aggregate to the key holder, which decrypts it (never fewer summands than
its own ``min_summands``, at most once per round). The workflow finds the key holder once by a hello and
pins it; the wrapped grid's ``get_node_ids`` offers only the nodes that said they are clients, so the
strategy never samples the key holder. The server never holds the private key.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fl.privacy.ledger import Ledger
from fl.runners.flower.identity import Roster
from fl.runners.flower.mod import IDENTIFY_LABEL, RECORD, SecureTerms, _only_arrays, flatten, unflatten
from fl.runners.flower.mod_paillier import KeyHolderDirectory, KeyHolderTransport
from fl.spec import RoundInfo
from secagg import wire
from secagg.errors import CodecError, ProtocolError
from secagg.machine import Message as ProtocolMessage
from secagg.paillier import PaillierPublicKey

__all__ = ["FlowerTransport", "RoundOutcome", "SecureAggregation", "SecureGrid"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    """One secure round: the new global model, its total weight, and who is in the sum (Flower node ids)."""

    arrays: ArrayRecord
    weight: float
    included: tuple[int, ...]
    planned: tuple[int, ...]
    mean_update: NDArray[np.float64]
    privacy: Mapping[str, Any] = field(default_factory=dict)


class FlowerTransport:
    """:class:`secagg.drive.Transport` over a Flower ``Grid``: one push and pull loop per delivery.

    ``nodes``: protocol client id -> Flower node id. Each client's messages of one delivery travel in one
    train message (step numbered per client, binding its sealed state); replies are yielded as they
    arrive. A reply that is an error, malformed, or holds a message whose sender is not the client that
    replied drops that client for the round (logged), as does silence until the deadline.
    """

    def __init__(self, grid: Grid, nodes: Mapping[int, int], *, session: bytes, round: int, last_phase: str,
                 poll_interval: float = 0.05, group_id: str = "", max_values: int = wire.MAX_STREAM_ITEMS) -> None:
        self.grid = grid
        self.max_values = max_values  # bound on one streamed array in a reply (8 words per value of the round)
        self.nodes = dict(nodes)
        self.session = session
        self.round = round
        self.last_phase = last_phase
        self.poll = poll_interval
        self.group_id = group_id
        self.alive = set(self.nodes)
        self.steps: dict[int, int] = {}

    def push_and_collect(self, msgs: Sequence[Message], *, deadline: float | None) -> Iterator[Message]:
        """Push ``msgs``; yield replies as they arrive until all answered or ``deadline`` (monotonic)."""
        ids = {i for i in self.grid.push_messages(msgs) if i}
        while ids:
            for reply in self.grid.pull_messages(ids):
                ids.discard(reply.metadata.reply_to_message_id)
                yield reply
            if not ids or (deadline is not None and time.monotonic() >= deadline):
                return
            time.sleep(self.poll)

    def decode(self, cid: int, reply: Message) -> list[ProtocolMessage]:
        """The protocol messages of ``cid``'s reply; ``ProtocolError`` for an error or anything malformed."""
        if reply.has_error():
            raise ProtocolError(f"error reply: {reply.error.reason}")
        rec = reply.content.get(RECORD) if hasattr(reply.content, "get") else None
        if not isinstance(rec, ConfigRecord):
            raise ProtocolError(f"no {RECORD!r} ConfigRecord in the reply")
        raw = rec.get("msgs", [])
        if not isinstance(raw, list) or not all(isinstance(b, bytes) for b in raw):
            raise ProtocolError("'msgs' must be a list of byte strings")
        frames = [b for b in raw if isinstance(b, bytes)]  # all are (checked above); narrows the type
        out = wire.decode_frames(frames, max_total=self.max_values)  # arrays above one frame stream
        for m in out:
            if m.sender != cid:
                raise ProtocolError(f"client {cid} sent a message claiming to be from {m.sender}")
        return out

    def collect(self, msgs: Sequence[Message], *, deadline: float | None) -> Iterator[ProtocolMessage]:
        """Push, then yield every authenticated protocol message of the replies; drop who fails or is silent."""
        by_node = {n: c for c, n in self.nodes.items()}
        waiting = {by_node[m.metadata.dst_node_id] for m in msgs}
        for reply in self.push_and_collect(msgs, deadline=deadline):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None or cid not in waiting:
                continue
            waiting.discard(cid)
            try:
                got = self.decode(cid, reply)
            except (ProtocolError, CodecError, KeyError, TypeError, ValueError) as exc:
                log.warning("round %d: dropping client %d, its reply was refused: %s", self.round, cid, exc)
                self.alive.discard(cid)
                continue
            yield from got
        if waiting:
            log.warning("round %d: client(s) %s did not answer in time (dropped)", self.round, sorted(waiting))
            self.alive -= waiting

    def exchange(self, phase: str, outbox: Sequence[ProtocolMessage], *,
                 deadline: float | None) -> Iterable[ProtocolMessage]:
        """Deliver one phase's messages to the live clients, one Flower message each; yield their replies."""
        batch: dict[int, list[ProtocolMessage]] = {}
        for m in outbox:
            if m.recipient in self.alive:
                batch.setdefault(m.recipient, []).append(m)
        msgs = []
        for cid, ms in sorted(batch.items()):
            self.steps[cid] = self.steps.get(cid, 0) + 1
            rec = ConfigRecord({"stage": "step", "session": self.session, "round": self.round,
                                "step": self.steps[cid], "final": phase == self.last_phase,
                                "msgs": wire.encode_frames(ms)})
            msgs.append(Message(RecordDict({RECORD: rec}), dst_node_id=self.nodes[cid],
                                message_type=MessageType.TRAIN, group_id=self.group_id, ttl=_ttl(deadline)))
        return self.collect(msgs, deadline=deadline)


def _ttl(deadline: float | None) -> float:
    left = 3600.0 if deadline is None else max(1.0, deadline - time.monotonic())
    return left + 60.0


class SecureAggregation:
    """privagg's secure aggregation as a Flower server workflow (see the module doc).

    ``protocol``, ``threshold``, ``bits``, ``clipping_range``, ``max_weight``, ``clip``,
    ``noise_multiplier``, ``placement``: the round's :class:`~fl.runners.flower.mod.SecureTerms` (the
    cohort is the number of nodes the strategy sampled). ``epsilon``/``delta``: the client-level DP
    budget (with ``clip`` and ``noise_multiplier``). ``start_timeout``: seconds for the first phase (local
    training); ``phase_timeout``: every later phase (a node that misses it has dropped).
    ``weight_key``: the strategy's weight metric (FedAvg's ``weighted_by_key``). ``authenticated`` and
    ``roster``: authenticated SecAgg / SecAgg+ with the consortium's roster (see the module doc).
    ``weight_key``: the strategy's weight metric (FedAvg's ``weighted_by_key``).
    ``paillier_public_key`` (``protocol="paillier"``): the key holder's ``public.json`` (a path, its JSON
    or the key); if given, the key holder's hello must name it. ``hello_timeout``: seconds a node has to
    answer the hello that tells clients from the key holder.
    """

    def __init__(self, *, protocol: str = "secagg+", threshold: float = 0.7, bits: int = 40,
                 clipping_range: float = 8.0, max_weight: float = 1000.0, clip: float | None = None,
                 noise_multiplier: float | None = None, placement: str = "server", epsilon: float | None = None,
                 delta: float = 1e-5, start_timeout: float = 300.0, phase_timeout: float = 60.0,
                 poll_interval: float = 0.05, weight_key: str = "num-examples", authenticated: bool = False,
                 roster: Roster | Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 paillier_public_key: str | Path | PaillierPublicKey | None = None,
                 hello_timeout: float = 30.0) -> None:
        self.terms = SecureTerms(protocol=protocol, threshold=threshold, cohort=2, bits=bits,
                                 clipping_range=clipping_range, max_weight=max_weight, clip=clip,
                                 noise_multiplier=noise_multiplier, placement=placement, epsilon=epsilon,
                                 authenticated=authenticated)
        self.roster = _roster(authenticated, roster)
        self._cids: dict[int, int] = {}  # Flower node id -> roster client id, from each node's signed answer
        if epsilon is not None and noise_multiplier is None:
            raise ValueError("epsilon needs DP noise: give clip=... and noise_multiplier=...")
        self.delta = delta
        self.start_timeout = start_timeout
        self.phase_timeout = phase_timeout
        self.poll_interval = poll_interval
        self.weight_key = weight_key
        self.ledger = Ledger()
        self.accounting: Any = None
        self.rounds = 0
        self.history: list[RoundOutcome] = []
        self.key_holders = None if protocol != "paillier" else KeyHolderDirectory(
            public_key=paillier_public_key, timeout=hello_timeout, poll_interval=poll_interval)

    # ------------------------------------------------------------------------------------ the round
    def aggregate(self, grid: Grid, instructions: Sequence[Message], *, round: int | None = None) -> RoundOutcome:
        """One secure round over the strategy's train ``instructions`` (one per sampled node)."""
        from secagg.drive import drive

        if round is None:
            round = self.rounds + 1
        if round <= self.rounds:
            raise ValueError(f"round {round} after round {self.rounds}: nodes accept each round number once")
        holder = None
        if self.key_holders is not None:  # Paillier: the pinned key holder, never one of the round's clients
            holder, instructions = self.key_holders.prepare(grid, instructions)
        self.rounds = round
        nodes = self._client_ids(grid, instructions)
        instructions = [m for m in instructions if m.metadata.dst_node_id in set(nodes.values())]
        terms = self.terms.with_cohort(len(nodes))
        if holder is not None:
            terms = replace(terms, paillier_public_key=holder.public_json)
        glob_record = _only_arrays(instructions[0].content, "strategy's train message")
        glob = flatten(glob_record)
        bound = terms.pipeline(glob.size)
        info = self._info(round, tuple(nodes), tuple(nodes))
        self._check_budget(terms, bound, info)
        session = os.urandom(16)
        ssum = self._server_sum(bound.pipeline.sum)
        phases = ssum.server(list(nodes), spec=bound.sum_spec, session=session, round=round).phases
        tr = FlowerTransport(grid, nodes, session=session, round=round, last_phase=phases[-1],
                             poll_interval=self.poll_interval, group_id=str(round),
                             max_values=8 * max(1, bound.sum_spec.size) + 4096)
        start = self._start_messages(instructions, nodes, terms, session, round)
        opening = list(tr.collect(start, deadline=time.monotonic() + self.start_timeout))
        members = sorted(tr.alive)
        if len(members) < 2:
            raise ProtocolError(f"round {round}: {len(members)} of {len(nodes)} nodes started; no secure sum")
        server = ssum.server(members, spec=bound.sum_spec, session=session, round=round)
        transport = tr if holder is None else KeyHolderTransport(tr, holder)
        outcome = drive(server, transport, opening=opening, phase_timeout=self.phase_timeout)
        return self._finish(round, nodes, terms, bound, glob, glob_record, outcome)

    def _info(self, round: int, planned: tuple[int, ...], included: tuple[int, ...]) -> RoundInfo:
        """Public facts of the round; no amplification by sampling is claimed (Flower samples with ``random``)."""
        return RoundInfo(round=round, planned=planned, included=included, population=len(planned), sample_rate=1.0)

    def _check_budget(self, terms: SecureTerms, bound: Any, info: RoundInfo) -> None:
        if terms.noise_multiplier is None:
            return
        if self.accounting is None:
            self.accounting = _accounting(terms, bound, self.delta)
        ok, why = self.accounting.can_run(info)
        if not ok:
            raise BudgetExhaustedError(why)

    def _start_messages(self, instructions: Sequence[Message], nodes: Mapping[int, int], terms: SecureTerms,
                        session: bytes, round: int) -> list[Message]:
        cid_of = {n: c for c, n in nodes.items()}
        out = []
        for ins in instructions:
            content = RecordDict(dict(ins.content.items()))
            cid = cid_of[ins.metadata.dst_node_id]
            content[RECORD] = ConfigRecord({**terms.to_record(), "stage": "start", "session": session,
                                            "round": round, "cid": cid, **self._roster_fields()})
            out.append(Message(content, dst_node_id=ins.metadata.dst_node_id, message_type=ins.metadata.message_type,
                               group_id=str(round), ttl=self.start_timeout + 60.0))
        return out

    # ------------------------------------------------------------------------------------ identities
    def _roster_fields(self) -> dict[str, str]:
        """The roster's SHA-256 for the nodes to compare with their own (authenticated rounds only)."""
        return {} if self.roster is None else {"roster": self.roster.fingerprint()}

    def _server_sum(self, ssum: Any) -> Any:
        """The round's secure sum; authenticated: the roster's public keys (the server holds no private key)."""
        from fl.sums.secagg import FixedIdentities, with_identities

        return ssum if self.roster is None else with_identities(ssum, FixedIdentities(self.roster.publics()))

    def _client_ids(self, grid: Grid, instructions: Sequence[Message]) -> dict[int, int]:
        """Client id -> Flower node id. Unauthenticated: by sorted node id. Authenticated: each node's roster
        entry, from its signed answer to :meth:`_identify` (asked once per node; unidentified nodes sit out)."""
        node_ids = sorted({m.metadata.dst_node_id for m in instructions})
        if self.roster is None:
            return dict(enumerate(node_ids))
        self._identify(grid, [n for n in node_ids if n not in self._cids])
        nodes = dict(sorted((self._cids[n], n) for n in node_ids if n in self._cids))
        if len(nodes) < 2:
            raise ProtocolError(f"{len(nodes)} of {len(node_ids)} sampled nodes proved a roster identity; no secure "
                                "sum (their refusals are logged)")
        return nodes

    def _identify(self, grid: Grid, node_ids: Sequence[int]) -> None:
        """Ask ``node_ids`` which roster entry each is; keep the answers whose signature verifies."""
        if not node_ids:
            return
        assert self.roster is not None
        nonce, fp = os.urandom(16), self.roster.fingerprint()
        msgs = [Message(RecordDict({RECORD: ConfigRecord({"stage": "identify", "nonce": nonce, "roster": fp})}),
                        dst_node_id=n, message_type=MessageType.TRAIN, group_id="identify",
                        ttl=self.phase_timeout + 60.0) for n in node_ids]
        tr = FlowerTransport(grid, {}, session=nonce, round=0, last_phase="", poll_interval=self.poll_interval)
        claims: dict[int, list[int]] = {}
        for reply in tr.push_and_collect(msgs, deadline=time.monotonic() + self.phase_timeout):
            node = reply.metadata.src_node_id
            try:
                claims.setdefault(_verified_cid(reply, node, nonce, self.roster), []).append(node)
            except ProtocolError as exc:
                log.warning("node %d is not in this round: its identity was refused: %s", node, exc)
        for cid, claimants in claims.items():
            if len(claimants) > 1:
                log.warning("nodes %s all hold the identity key of client %d: none takes part", claimants, cid)
                continue
            self._cids = {n: c for n, c in self._cids.items() if c != cid}  # a restarted node's new node id
            self._cids[claimants[0]] = cid

    def _finish(self, round: int, nodes: Mapping[int, int], terms: SecureTerms, bound: Any,
                glob: NDArray[np.float64], like: ArrayRecord, outcome: Any) -> RoundOutcome:
        """Decode the sum, average it, apply it to the global model, account and record the round."""
        from dp.rng import SecureRandom

        info = self._info(round, tuple(nodes), tuple(outcome.included))
        total = bound.decode(outcome.total, info, SecureRandom())
        if terms.dp:
            weight = float(info.n_included)
            mean = total / weight
        else:
            w = float(total[0])
            if not w > 0:
                raise ProtocolError(f"round {round}: the included clients' total weight is {w}, nothing to average")
            weight, mean = w * terms.max_weight, total[1:] / w
        privacy: dict[str, Any] = {}
        if self.accounting is not None:
            privacy = self.accounting.record(info, {})
        self.ledger.record(round, bound.guarantees(info), **privacy)
        included = tuple(nodes[c] for c in outcome.included)
        result = RoundOutcome(unflatten(glob + mean, like), weight, included, tuple(nodes.values()), mean, privacy)
        self.history.append(result)
        log.info("round %d: secure sum of %d/%d nodes (%s)", round, len(included), len(nodes), terms.protocol)
        return result

    def report(self) -> dict[str, Any]:
        """The ledger and, with DP, the accountant's report (epsilon per observer, events as JSON)."""
        out: dict[str, Any] = {"ledger": self.ledger.as_list(), "rounds": self.rounds}
        if self.accounting is not None:
            out["privacy"] = self.accounting.report()
        return out

    # ------------------------------------------------------------------------------------ the fronts
    def wrap(self, grid: Grid) -> SecureGrid:
        """A Grid for Message API strategies: their train round goes through secure aggregation."""
        return SecureGrid(grid, self)

    def __call__(self, grid: Grid, context: Context) -> None:
        """``DefaultWorkflow(fit_workflow=SecureAggregation(...))`` with a ``LegacyContext`` and legacy strategy."""
        _legacy_fit_round(self, grid, context)


def _roster(authenticated: bool, roster: Any) -> Roster | None:
    """The consortium's roster for an authenticated workflow (a :class:`Roster`, its JSON dict, or a path)."""
    if not authenticated:
        if roster is not None:
            raise ValueError("roster=... is for authenticated rounds: add authenticated=True, or drop the roster")
        return None
    if roster is None:
        raise ValueError("authenticated=True needs roster=roster.json: the consortium's public identity keys "
                         "(`privagg flower identity` at each site, then `privagg flower roster`)")
    if isinstance(roster, Roster):
        return roster
    if isinstance(roster, Mapping):
        return Roster.from_dict(roster)
    return Roster.load(Path(roster))


def _verified_cid(reply: Message, node: int, nonce: bytes, roster: Roster) -> int:
    """The client id ``node`` claims in its identify reply, once its signature verifies under that entry's key."""
    from fl.runners.flower.mod import identify_payload
    from secagg._hazmat import sign

    if reply.has_error():
        raise ProtocolError(f"error reply: {reply.error.reason}")
    rec = reply.content.get(RECORD) if hasattr(reply.content, "get") else None
    cid = rec.get("cid") if isinstance(rec, ConfigRecord) else None
    sig = rec.get("signature") if isinstance(rec, ConfigRecord) else None
    if isinstance(cid, bool) or not isinstance(cid, int) or not isinstance(sig, bytes):
        raise ProtocolError("the identify reply needs an integer cid and a signature")
    entry = roster.clients.get(cid)
    if entry is None:
        raise ProtocolError(f"client id {cid} is not in the roster")
    if not sign.verify(entry.public_key, sig, label=IDENTIFY_LABEL,
                       payload=identify_payload(nonce, node, cid, roster.fingerprint())):
        raise ProtocolError(f"its claim to be client {cid} ({entry.site!r}) is not signed by that client's key")
    return cid


class BudgetExhaustedError(RuntimeError):
    """The next round would spend more client-level epsilon than the budget."""


def _accounting(terms: SecureTerms, bound: Any, delta: float) -> Any:
    from fl.layers.noise import GaussianNoise
    from fl.privacy.accounting import DpFedAvgAccounting, SurvivorFloor

    noise = next(layer for layer in bound.pipeline.layers if isinstance(layer, GaussianNoise))
    ssum = bound.pipeline.sum
    if hasattr(ssum, "_graph"):
        floor = SurvivorFloor(threshold=terms.threshold, graph=ssum._graph())
    else:  # Paillier: the round aborts below min_clients, and the key holder decrypts no fewer
        floor = SurvivorFloor(min_clients=ssum.min_clients)
    return DpFedAvgAccounting(noise=noise, clip=float(terms.clip or 0.0), size=bound.specs[0].size, delta=delta,
                              epsilon=terms.epsilon, floor=floor)


class SecureGrid(Grid):
    """A Flower ``Grid`` that routes a strategy's train round through :class:`SecureAggregation`.

    ``send_and_receive`` of train messages returns one reply (the new global model, weighted by the
    round's total weight); every other call goes to the wrapped grid unchanged.
    """

    def __init__(self, grid: Grid, aggregation: SecureAggregation) -> None:
        self.grid = grid
        self.aggregation = aggregation

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        if self.aggregation.key_holders is not None:  # Paillier: only nodes whose own hello said "client"
            return self.aggregation.key_holders.clients(self.grid)
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        if not msgs or any(m.metadata.message_type.split(".")[0] != MessageType.TRAIN for m in msgs):
            return self.grid.send_and_receive(msgs, timeout=timeout)
        from secagg.errors import AbortError

        try:
            out = self.aggregation.aggregate(self.grid, msgs)
        except (AbortError, ProtocolError) as exc:
            log.error("secure aggregation round failed: %s", exc)
            return []
        key = next(iter(msgs[0].content.array_records))
        metrics = MetricRecord({self.aggregation.weight_key: out.weight})
        return [Message(RecordDict({key: out.arrays, "metrics": metrics}), reply_to=msgs[0])]


def _legacy_fit_round(sa: SecureAggregation, grid: Grid, context: Any) -> None:
    """The fit step of ``DefaultWorkflow`` (as ``SecAggPlusWorkflow`` does it): configure, secure round, aggregate."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    if not isinstance(context, LegacyContext):
        raise TypeError(f"SecureAggregation as a fit workflow needs a LegacyContext, got {type(context).__name__}")
    rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])  # type: ignore[arg-type]
    if sa.key_holders is not None:  # Paillier: the key holder is never sampled
        sa.key_holders.hide_from(context.client_manager, grid)
    params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    sampled = context.strategy.configure_fit(rnd, params, context.client_manager)
    if not sampled:
        log.info("configure_fit: no clients selected, cancel")
        return
    proxies = {proxy.node_id: proxy for proxy, _ in sampled}
    instructions = [Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=proxy.node_id,
                            message_type=MessageType.TRAIN, group_id=str(rnd)) for proxy, fitins in sampled]
    out = sa.aggregate(grid, instructions, round=rnd)
    arrays = out.arrays.to_numpy_ndarrays()
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                    num_examples=max(1, round(out.weight)), metrics={})
    aggregated, metrics = context.strategy.aggregate_fit(rnd, [(proxies[out.included[0]], fitres)], [])
    if aggregated is not None:
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(aggregated, True)
        context.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)
