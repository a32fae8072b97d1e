"""Run privagg's own secure-sum protocols across machines on Flower (``pip install 'privagg[flower]'``).

Flower carries the bytes; our sans-IO machines do the protocol. The :data:`server_app` workflow drives
the aggregator's :class:`~secagg.machine.ServerMachine` phase by phase: every phase is one
``Grid`` exchange (push the phase's messages to the SuperNodes, collect the replies until the phase
timeout); a SuperNode that has not answered by then has dropped, exactly like a runner deadline. The
:data:`client_app` drives the client's :class:`~secagg.machine.ClientMachine`. Protocol messages travel
as :mod:`secagg.wire` bytes inside a ``ConfigRecord``; Flower's ``secaggplus_mod`` and
``SecAggPlusWorkflow`` are not used.

Flower starts a fresh ``flwr-clientapp`` process for every message, so a client's machine (its round
secrets) must survive between phases: its versioned snapshot (no pickle) is sealed with AES-GCM under a
per-SuperNode key, bound to run, node, session, round, step and phase (:mod:`fl.runners.flower.state`).

Nothing a remote party sends selects code or weakens privacy: protocol messages are always
:mod:`secagg.wire`, and each node's own :class:`~fl.runners.flower.policy.NodePolicy` decides which
jobs it runs (:mod:`fl.runners.flower.policy`) and which app code (:mod:`fl.runners.flower.pin`).
A malformed SuperNode reply drops that client for the round, never the run.

Two jobs run on this transport. ``train``: the server drives :class:`fl.training.loop.Federation`'s server
side (it samples, decodes, averages, evaluates and keeps the ledger); each SuperNode holds one
:class:`fl.training.client.ClientSide` for the whole run (one partition; it trains and encodes with the
same seeds), so the final model equals the in-memory runner's for the same
config. ``sum`` sums public pseudo-random ring vectors and checks the result exactly: the latency
benchmark and the dropout test.

Where the time goes: the protocol itself costs milliseconds per round (d = 1e5); a stock Flower round
costs tens of seconds because every phase waits for a SuperNode's fixed 3 s idle poll, a fresh
``flwr-clientapp`` interpreter per message, and (with ``Grid.send_and_receive``) 3 s server-side polls.
The ServerApp here pulls replies every ``poll_interval`` (50 ms), and :func:`supernode_main` (what
``privagg flower supernode`` starts) polls the SuperLink every 0.1 s and forks each ClientApp from a
warm process (:func:`superexec_main`). A stock ``flower-supernode`` works too, slower and WITHOUT the app pin.

Process helpers (:func:`superlink_command`, :func:`supernode_command`, :func:`flower_env`,
:func:`make_certificates`, :func:`write_app`, :func:`write_connection`, :class:`LocalCluster`) are shared
by ``privagg flower`` and the tests. Flower's config lives in ``FLWR_HOME`` (never ``~/.flwr``);
telemetry, update checks and runtime dependency installation are switched off.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from numpy.typing import NDArray

from fl.runners.flower import state as _state
from fl.runners.flower.policy import POLICY_FILE_KEY, NodePolicy, PolicyError, sum_terms, train_terms
from fl.runners.flower.state import make_state_key
from fl.spec import SecureSum, TrainResult, ValueSpec
from secagg import wire
from secagg.drive import PhaseStats, drive
from secagg.errors import AbortError, CodecError, ProtocolError
from secagg.machine import SERVER, ClientMachine, ServerMachine
from secagg.machine import Message as ProtocolMessage
from secagg.plain import PlainClient
from secagg.ring import value_bits_for

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "CertPaths",
    "FlowerJob",
    "InsecureTransportError",
    "JobError",
    "LocalCluster",
    "NodePolicy",
    "PolicyError",
    "client_app",
    "flower_env",
    "is_loopback",
    "make_certificates",
    "make_node_keys",
    "make_state_key",
    "refuse_insecure_remote",
    "register_node",
    "server_app",
    "superexec_main",
    "superlink_command",
    "supernode_command",
    "supernode_main",
    "wait_result",
    "write_app",
    "write_connection",
]

log = logging.getLogger(__name__)

DEFAULT_SUPERLINK_PORT = 8000
"""Flower 1.41 serves Fleet, Control and Runtime APIs over HTTP(S) on this one SuperLink port."""
DEFAULT_SUPERNODE_PORT = 9094
"""Each SuperNode opens its local Runtime API here; several nodes on one host need distinct ports."""

CONNECTION = "privagg"
"""Name of the SuperLink connection that :func:`write_connection` puts in ``FLWR_HOME/config.toml``."""

_RECORD = "privagg"
_HELLO = "query.privagg_hello"
_START = "train.privagg_start"
_STEP = "query.privagg_step"
_JOB_KEY = "job"
_STATE_KEY_FILE = _state.STATE_KEY_FILE


# ---------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class FlowerJob:
    """What a Flower run does; travels to every process as JSON in the app's run config.

    ``task="train"``: ``config`` is a :class:`fl.config.TrainConfig` as a dict. ``task="sum"``: each of
    ``clients`` SuperNodes contributes a public pseudo-random vector of ``size`` words for ``rounds``
    rounds through ``protocol`` (``secagg+``, ``secagg`` or ``plain``) and the server checks the sum.
    ``out``: directory where the ServerApp writes ``progress.jsonl``, ``result.json`` (or
    ``error.json``) and ``params.npy``. Timeouts are seconds: ``join_timeout`` to wait for the
    SuperNodes, ``start_timeout`` for the first phase of a round (local training), ``phase_timeout`` for
    every other phase (a SuperNode that misses it has dropped). ``poll_interval``: seconds between
    pulls of replies; ``0`` uses Flower's own ``Grid.send_and_receive`` (which polls every 3 s).
    """

    task: Literal["train", "sum"] = "train"
    out: str = "out/flower"
    config: Mapping[str, Any] = field(default_factory=dict)
    clients: int = 3
    size: int = 100_000
    rounds: int = 1
    seed: int = 0
    protocol: str = "secagg+"
    threshold: float = 0.7
    ring_bits: int = 32
    join_timeout: float = 60.0
    start_timeout: float = 120.0
    phase_timeout: float = 30.0
    poll_interval: float = 0.05
    # the preprocessing release (fl.data.stats.FederatedStats.to_json), made ONCE when the job is written:
    # the ServerApp and every node standardize with it, so the statistics are released (and charged) once
    stats: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FlowerJob:
        """Parse a job; unknown fields (e.g. a ``codec`` naming a module) and wrong types are refused."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise JobError(f"the Flower job is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise JobError("the Flower job must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobError(f"unknown Flower job field(s) {unknown}; the app was written by another privagg version "
                           "(nothing in a job selects code: the wire codec is always secagg.wire)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise JobError(f"bad Flower job: {exc}") from exc

    def __post_init__(self) -> None:
        if self.task not in ("train", "sum"):
            raise JobError(f"unknown Flower job task {self.task!r}: train or sum")
        if not isinstance(self.config, Mapping):
            raise JobError("the Flower job's config must be an object")
        if self.stats is not None and not isinstance(self.stats, Mapping):
            raise JobError("the Flower job's stats must be an object (the preprocessing release)")

    @property
    def num_clients(self) -> int:
        if self.task == "train":
            return int(self.config.get("clients", 0))
        return self.clients

    @property
    def num_rounds(self) -> int:
        return int(self.config.get("rounds", 0)) if self.task == "train" else self.rounds


class JobError(ValueError):
    """A Flower job this process cannot parse (malformed, unknown fields, wrong types)."""


def _job(context: Context) -> FlowerJob:
    text = context.run_config.get(_JOB_KEY)
    if not isinstance(text, str):
        raise JobError("the Flower app has no privagg job in its run config; start runs with `privagg flower run`")
    return FlowerJob.from_json(text)


def _policy(context: Context) -> NodePolicy:
    """This node's own policy, from its ``--node-config`` (never from the job)."""
    try:
        return NodePolicy.from_node_config(context.node_config)
    except ValueError as exc:
        raise PolicyError(f"this node's policy is unusable: {exc}") from exc


def _refuse_weaker(context: Context, job: FlowerJob, cid: int) -> None:
    """Raise :class:`PolicyError` if ``job`` asks this node for less than its policy allows."""
    if job.task == "train":
        terms = train_terms(_client_side(context, job, cid), cid)
    else:
        terms = sum_terms(_sum_of(job), job.clients)  # before binding: the policy's refusal is the one reported
    _policy(context).check(terms)


_CLIENT_SIDES: dict[tuple[int, str, int], Any] = {}
"""This process's client side per (run id, job text, partition): built once, kept for the whole run."""


def _client_side(context: Context, job: FlowerJob, cid: int) -> Any:
    """This node's :class:`~fl.training.client.ClientSide` for the run (one site: its data, model, trainer).

    Built once per process and run, keyed by run id and the job's exact text (a different job under the
    same run id builds a new one); a cold process (Flower may start one per message) rebuilds it
    deterministically from the job's config alone, reusing the noise calibrations this node memoised in
    its own state (:mod:`fl.runners.flower.calibrations`). Only the latest run is kept.
    """
    key = (int(context.run_id), job.to_json(), cid)
    side = _CLIENT_SIDES.get(key)
    if side is None:
        from fl.runners.flower.calibrations import NodeCalibrations
        from fl.training.client import ClientSide

        _CLIENT_SIDES.clear()
        side = ClientSide.for_site(_train_config(job), cid, calibrate=NodeCalibrations(context),
                                   stats=_job_stats(job))
        _CLIENT_SIDES[key] = side
    return side


def _job_stats(job: FlowerJob) -> Any:
    """The job's one preprocessing release (``None``: an older job; each process would then compute its own)."""
    if job.stats is None:
        return None
    from fl.data.stats import FederatedStats

    return FederatedStats.from_json(job.stats)


def _guarded(fn: Any) -> Any:
    """Turn a :class:`PolicyError` (or a job this node cannot parse) into a logged error reply."""

    @functools.wraps(fn)
    def run(msg: Message, context: Context) -> Message:
        try:
            return cast(Message, fn(msg, context))
        except (PolicyError, JobError) as exc:
            log.error("refusing %s: %s", msg.metadata.message_type, exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                           reply_to=msg)

    return run


# ---------------------------------------------------------------------------------------------- sum task
def _sum_protocol(job: FlowerJob) -> tuple[SecureSum, ValueSpec]:
    """The secure sum and ring spec of a ``sum`` job (values of ``ring_bits - log2(cohort)`` bits)."""
    vbits = value_bits_for(job.ring_bits, max(1, job.clients))
    spec = ValueSpec(size=job.size, cohort=job.clients, domain="ring", modulus=1 << job.ring_bits, value_bits=vbits)
    ssum = _sum_of(job)
    return ssum, ssum.bind(spec)


def _sum_of(job: FlowerJob) -> SecureSum:
    """The (unbound) secure sum a ``sum`` job names."""
    ssum: SecureSum
    if job.protocol in ("secagg", "secagg+"):
        from fl.sums.secagg import SecAgg, SecAggPlus

        ssum = SecAgg(threshold=job.threshold) if job.protocol == "secagg" else SecAggPlus(threshold=job.threshold)
    elif job.protocol == "plain":
        from fl.sums.plain import PlainSum

        ssum = PlainSum(min_clients=max(1, math.ceil(job.threshold * job.clients)))
    else:
        raise JobError(f"unknown protocol {job.protocol!r}: choose secagg+, secagg or plain")
    return ssum


def _sum_value(job: FlowerJob, round: int, cid: int) -> NDArray[np.uint64]:
    """Client ``cid``'s public test vector for ``round`` (non-negative, below 2^(value_bits-1))."""
    from dp.rng import SecureRandom

    _, spec = _sum_protocol(job)
    assert spec.value_bits is not None
    words = SecureRandom.for_testing(f"flower-sum:{job.seed}:{round}:{cid}").uint64(job.size)
    return words >> np.uint64(64 - (spec.value_bits - 1))


# ---------------------------------------------------------------------------------------------- state
def _state_key(context: Context) -> bytes:
    """This node's state-sealing key (see :mod:`fl.runners.flower.state`)."""
    return _state.state_key(context)


# ---------------------------------------------------------------------------------------------- client side
client_app = ClientApp()


def _partition(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise RuntimeError(
            "this SuperNode has no integer partition-id; start it with `privagg flower supernode --partition I/N`"
        )
    return pid


def _reply(msg: Message, fields: dict[str, Any]) -> Message:
    return Message(RecordDict({_RECORD: ConfigRecord(fields)}), reply_to=msg)


def _incoming(msg: Message) -> list[ProtocolMessage]:
    return _decode(_rec(msg.content))


def _outgoing(msgs: Iterable[ProtocolMessage]) -> dict[str, Any]:
    data = [wire.dumps(m) for m in msgs]
    return {"msgs": data} if data else {}


_ROUNDS = "privagg-rounds"


def _claim_round(context: Context, rnd: int, planned: int) -> None:
    """Contribute to each planned round at most once, in increasing order (the node's own record).

    The DP noise of a job is calibrated for its planned rounds; a server that opened a round twice, or
    more rounds than planned, would get more releases of this node's data than the budget covers.
    """
    if not 1 <= rnd <= planned:
        raise PolicyError(f"round {rnd} is outside the job's planned rounds 1..{planned}")
    last = int(context.state[_ROUNDS]["last"]) if _ROUNDS in context.state else 0  # type: ignore[arg-type]
    if rnd <= last:
        raise PolicyError(f"this node already contributed to round {last}; round {rnd} again would release its "
                          "data more often than the job's DP budget covers")
    context.state[_ROUNDS] = ConfigRecord({"last": rnd})


@client_app.query("privagg_hello")
@_guarded
def _hello(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client id) this SuperNode owns, once the job meets its policy."""
    _state_key(context)  # fail at join time, not mid-round, when the node cannot keep state
    cid = _partition(context)
    job = _job(context)
    own = _own_data(context, job)  # first: the policy check of a train job builds (loads) its data set
    _refuse_weaker(context, job, cid)
    n = context.node_config.get("num-partitions", -1)
    return _reply(msg, {"cid": cid, "num": int(n) if isinstance(n, int) else -1, **own})


def _own_data(context: Context, job: FlowerJob) -> dict[str, Any]:
    """This node's site and columns for the hello (:mod:`fl.runners.flower.site`); never the bundled set."""
    from fl.runners.flower import site

    try:
        fields = site.hello_fields(context.node_config)
    except ValueError as exc:
        raise PolicyError(f"this node's own data is unusable: {exc}") from exc
    if fields and job.task == "train":
        raise PolicyError(
            f"this SuperNode holds site {fields['site']!r}'s own data and never loads the data set the job names "
            f"({job.config.get('dataset', 'breast_cancer')!r}); the privagg ClientApp cannot train on a node's own "
            "CSV yet: use your own ClientApp with privagg_mod (examples/flower_app reads data-path), or start "
            "the node without --data"
        )
    return fields


@client_app.train("privagg_start")
@_guarded
def _start(msg: Message, context: Context) -> Message:
    """Round opens: check the job against this node's policy, train or draw the vector, start the machine."""
    t0 = time.perf_counter()
    job = _job(context)
    rec = _rec(msg.content)
    cid = _partition(context)
    rnd = int(rec["round"])
    session = bytes(rec["session"])
    ssum: SecureSum
    extra: dict[str, Any] = {}
    if job.task == "train":
        import torch

        from fl.errors import NonFiniteUpdateError

        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        side = _client_side(context, job, cid)
        _refuse_weaker(context, job, cid)
        _claim_round(context, rnd, job.num_rounds)
        params = np.frombuffer(bytes(rec["params"]), dtype=np.float64).copy()
        try:
            value, result = side.update(params, rnd)
        except NonFiniteUpdateError as exc:
            log.warning("%s", exc)
            return _reply(msg, {"rejected": str(exc)})
        extra["result"] = json.dumps(asdict(result), default=str)
        ssum, spec = side.plan.pipeline.sum, side.bound.sum_spec
    else:
        _refuse_weaker(context, job, cid)
        _claim_round(context, rnd, job.num_rounds)
        ssum, spec = _sum_protocol(job)
        value = _sum_value(job, rnd, cid)
    if dict(ssum.parties(spec=spec, session=session, round=rnd)):
        raise ProtocolError(f"{ssum.name} needs an extra party (a key holder); the Flower runner does not host one")
    machine = ssum.client(cid, value, spec=spec, session=session, round=rnd)
    out = machine.start()
    for m in _incoming(msg):
        out += machine.receive(m)
    _state.clear(context)
    if not isinstance(machine, PlainClient):  # a plain client is done once it has sent its value
        _state.store(context, machine, session=session, round=rnd, step=0)
    extra["compute_s"] = time.perf_counter() - t0
    return _reply(msg, {**_outgoing(out), **extra})


@client_app.query("privagg_step")
@_guarded
def _step(msg: Message, context: Context) -> Message:
    """One later phase: feed the server's messages to our stored machine, send back its replies."""
    t0 = time.perf_counter()
    rec = _rec(msg.content)
    session, rnd, step = bytes(rec["session"]), int(rec["round"]), int(rec["step"])
    if step < 1:
        raise ProtocolError(f"protocol steps are numbered from 1, got {step}")
    machine: ClientMachine = _state.load(context, session=session, round=rnd, step=step - 1)
    out: list[ProtocolMessage] = []
    for m in _incoming(msg):
        out += machine.receive(m)
    if bool(rec["final"]):
        _state.clear(context)  # the round's secrets are no longer needed
    else:
        _state.store(context, machine, session=session, round=rnd, step=step)
    return _reply(msg, {**_outgoing(out), "compute_s": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------- server side
def _train_config(job: FlowerJob) -> Any:
    from fl.config import PrivacyConfig, TrainConfig

    data = dict(job.config)
    privacy = PrivacyConfig(**data.pop("privacy", {}))
    if "aclip" in privacy.tokens():  # its state (the round's clip norm) is not yet sent to the nodes
        raise JobError("aclip (adaptive clipping) runs in memory only for now; over Flower use clip")
    return TrainConfig(**data, privacy=privacy)


@dataclass
class _Exchange:
    """Timing of one phase's exchange, for the round-latency breakdown."""

    round: int
    phase: str
    sent: int
    answered: int
    wall_s: float
    client_max_s: float
    server_s: float = 0.0


class _Transport:
    """One Flower ``Grid`` exchange per protocol phase, with the phase timeout as the dropout deadline."""

    def __init__(self, grid: Grid, job: FlowerJob, nodes: Mapping[int, int]) -> None:
        self.grid = grid
        self.job = job
        self.nodes = dict(nodes)  # cid -> node id
        self.cids = {n: c for c, n in self.nodes.items()}
        self.log: list[_Exchange] = []
        self.progress: _Progress | None = None

    def exchange(
        self, round: int, phase: str, payloads: Mapping[int, dict[str, Any]], *, kind: str, timeout: float
    ) -> tuple[dict[int, Any], set[int]]:
        """Send one message per client; return the replies by client id and who failed (error reply)."""
        msgs = [
            Message(RecordDict({_RECORD: ConfigRecord(p)}), dst_node_id=self.nodes[cid], message_type=kind,
                    group_id=str(round), ttl=timeout + 60.0)
            for cid, p in payloads.items()
        ]
        t0 = time.perf_counter()
        replies = _send_and_receive(self.grid, msgs, timeout=timeout, poll=self.job.poll_interval)
        wall = time.perf_counter() - t0
        got: dict[int, Any] = {}
        failed: set[int] = set()
        for r in replies:
            cid = self.cids.get(r.metadata.src_node_id)
            if cid is None or cid not in payloads:
                continue
            if r.has_error():
                log.warning("client %d refused %s of round %d: %s", cid, phase, round, r.error.reason)
                failed.add(cid)
                continue
            try:
                got[cid] = _reply_record(r)
            except BadReplyError as exc:
                log.warning("round %d: dropping client %d, its %s reply was refused: %s", round, cid, phase, exc)
                failed.add(cid)
        client_s = max((_compute_s(v) for v in got.values()), default=0.0)
        self.log.append(_Exchange(round, phase, len(msgs), len(got), wall, client_s))
        if self.progress is not None:
            self.progress(event="phase", round=round, phase=phase, sent=sorted(payloads), answered=sorted(got))
        return got, failed


def _send_and_receive(grid: Grid, msgs: Sequence[Message], *, timeout: float, poll: float) -> list[Message]:
    """``Grid.send_and_receive`` with a shorter poll: push everything, pull until all answered or timeout.

    Flower's own ``send_and_receive`` sleeps 3 s between pulls; ``poll=0`` uses it unchanged.
    """
    if not msgs:
        return []
    if poll <= 0:
        return list(grid.send_and_receive(msgs, timeout=timeout))
    ids = {i for i in grid.push_messages(msgs) if i}
    if len(ids) < len(msgs):
        log.warning("Flower could not push %d of %d messages", len(msgs) - len(ids), len(msgs))
    deadline = time.monotonic() + timeout
    out: list[Message] = []
    while ids:
        for m in grid.pull_messages(ids):
            out.append(m)
            ids.discard(m.metadata.reply_to_message_id)
        if not ids or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return out


class _NoUpdatesError(Exception):
    """Every sampled client rejected its own update (NaN/Inf), or none was sampled: the round is skipped."""


@dataclass
class _RoundResult:
    total: NDArray[Any]
    included: tuple[int, ...]
    messages: int
    results: dict[int, TrainResult]
    rejected: list[int]


class _PhaseLink:
    """:class:`secagg.drive.Transport` over Flower for one round: one ``Grid`` exchange per call.

    It groups the outbox by client, numbers each client's protocol steps (binding its sealed state),
    turns the phase's deadline into the exchange timeout, and checks every reply before it reaches the
    server: a message must come from the client that sent the reply and go to the server or a member.
    A bad reply counts as no reply: its client is dropped, as at a missed deadline.
    """

    def __init__(self, tr: _Transport, *, round: int, session: bytes, final_phase: str,
                 planned: Sequence[int], members: Sequence[int]) -> None:
        self.tr, self.round, self.session, self.final_phase = tr, round, session, final_phase
        self.planned = frozenset(planned)
        self.members = frozenset(members)
        self.alive = set(members)
        self.steps: dict[int, int] = {}  # protocol steps sent to each client this round
        self.sent = 0

    def exchange(
        self, phase: str, outbox: Sequence[ProtocolMessage], *, deadline: float | None
    ) -> list[ProtocolMessage]:
        batch: dict[int, list[ProtocolMessage]] = {}
        for m in outbox:
            if m.recipient in self.alive:
                batch.setdefault(m.recipient, []).append(m)
            elif m.recipient != SERVER and m.recipient not in self.planned:
                raise ProtocolError(f"message for unknown party {m.recipient}: the Flower runner hosts no extra roles")
        if not batch:
            return []
        for cid in batch:
            self.steps[cid] = self.steps.get(cid, 0) + 1
        final = phase == self.final_phase
        payloads = {
            cid: {"round": self.round, "session": self.session, "final": final, "step": self.steps[cid],
                  **_outgoing(ms)}
            for cid, ms in batch.items()
        }
        self.sent += sum(len(ms) for ms in batch.values())
        timeout = self.tr.job.phase_timeout if deadline is None else max(0.0, deadline - time.monotonic())
        replies, _failed = self.tr.exchange(self.round, phase, payloads, kind=_STEP, timeout=timeout)
        dropped = set(batch) - set(replies)
        if dropped:
            log.warning("round %d, phase %s: client(s) %s dropped", self.round, phase, sorted(dropped))
        self.alive -= dropped
        return self.checked(replies)

    def checked(self, replies: Mapping[int, Any]) -> list[ProtocolMessage]:
        """The protocol messages in ``replies`` of live clients, each checked against its reply's sender."""
        out: list[ProtocolMessage] = []
        for cid, rec in sorted(replies.items()):
            if cid not in self.alive:
                continue
            try:
                msgs = _decode(rec)
                for m in msgs:
                    if m.sender != cid:
                        raise ProtocolError(f"client {cid} sent a message claiming to be from {m.sender}")
                    if m.recipient != SERVER and m.recipient not in self.members:
                        raise ProtocolError(f"client {cid} sent a message for {m.recipient}, not in this round")
            except (BadReplyError, CodecError, ProtocolError, KeyError, TypeError, ValueError) as exc:
                self.refuse(cid, exc)
                continue
            out += msgs
        return out

    def refuse(self, cid: int, exc: Exception) -> None:
        log.warning("round %d: dropping client %d, its reply was refused: %s", self.round, cid, exc)
        self.alive.discard(cid)


def _open_round(tr: _Transport, phase: str, *, round: int, planned: Sequence[int], session: bytes,
                start_fields: Mapping[str, Any]) -> tuple[dict[int, Any], dict[int, TrainResult], list[int]]:
    """Phase 0: ask every sampled client to train (or draw its vector) and start its machine."""
    payloads = {cid: {**start_fields, "round": round, "session": session} for cid in planned}
    replies, failed = tr.exchange(round, phase, payloads, kind=_START, timeout=tr.job.start_timeout)
    results: dict[int, TrainResult] = {}
    rejected: list[int] = []
    for cid, rec in replies.items():
        try:
            if "rejected" in rec:
                rejected.append(cid)
            elif "result" in rec:
                results[cid] = _train_result(rec["result"])
            elif "params" in start_fields:
                raise BadReplyError("a training reply without its training result")
        except BadReplyError as exc:
            log.warning("round %d: dropping client %d, its %s reply was refused: %s", round, cid, phase, exc)
            failed.add(cid)
    opened = {cid: rec for cid, rec in replies.items() if cid not in failed and cid not in rejected}
    return opened, results, rejected


def _run_round(
    tr: _Transport,
    ssum: SecureSum,
    spec: ValueSpec,
    *,
    round: int,
    planned: Sequence[int],
    session: bytes,
    start_fields: Mapping[str, Any],
) -> _RoundResult:
    """Drive one round of our server machine over Flower with :func:`secagg.drive.drive`.

    Phase 0 asks every sampled client to train (or draw its vector) and start its machine; the server
    machine is then built over the clients that answered with an update (a client that rejected its own
    update is left out, as in memory; one that did not answer in time has dropped).
    """
    phases = ssum.server(list(planned), spec=spec, session=session, round=round).phases
    opened, results, rejected = _open_round(tr, phases[0], round=round, planned=planned, session=session,
                                            start_fields=start_fields)
    if not opened:
        if rejected and not (set(planned) - set(rejected)):
            raise _NoUpdatesError("no client update this round")
        raise AbortError(phases[0], needed=1, answered=0)
    members = sorted(opened)
    start_log = len(tr.log)
    t0 = time.perf_counter()
    server: ServerMachine = ssum.server(members, spec=spec, session=session, round=round)
    build_s = time.perf_counter() - t0
    link = _PhaseLink(tr, round=round, session=session, final_phase=phases[-1], planned=planned, members=members)
    opening = link.checked(opened)
    outcome = drive(server, link, opening=opening, phase_timeout=tr.job.phase_timeout,
                    on_refused=lambda m, exc: link.refuse(m.sender, exc))
    _add_server_time(tr.log[start_log - 1:], outcome.phases, build_s)
    count = len(opening) + outcome.received + link.sent
    return _RoundResult(outcome.total, outcome.included, count, results, rejected)


def _add_server_time(entries: Sequence[_Exchange], phases: Sequence[PhaseStats], build_s: float) -> None:
    """Attribute the server's compute time in each phase to that phase's last exchange of the round."""
    if not entries:
        return
    entries[0].server_s += build_s
    for p in phases:
        mine = [e for e in entries if e.phase == p.phase]
        (mine or list(entries))[-1].server_s += p.server_s


def _rec(content: RecordDict, key: str = _RECORD) -> Any:
    """Our ``ConfigRecord`` in a message or state, typed loosely: each value is checked where it is used."""
    return content[key]


class BadReplyError(ValueError):
    """A SuperNode's reply that does not have the shape of ours: that client is dropped for the round."""


def _reply_record(reply: Message) -> Any:
    """The ``privagg`` record of a reply, or :class:`BadReplyError` (missing, or not a ConfigRecord)."""
    try:
        rec = reply.content[_RECORD]
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadReplyError(f"no {_RECORD!r} record in the reply") from exc
    if not isinstance(rec, ConfigRecord):
        raise BadReplyError(f"the {_RECORD!r} record is a {type(rec).__name__}, not a ConfigRecord")
    return rec


def _compute_s(rec: Any) -> float:
    """The client's reported compute seconds (timing only; anything malformed counts as 0)."""
    v = rec.get("compute_s", 0.0)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else 0.0


_TRAIN_RESULT_TYPES: dict[str, tuple[type, ...]] = {"num_samples": (int,), "steps": (int,), "loss": (int, float),
                                                    "extra": (dict,)}


def _train_result(raw: Any) -> TrainResult:
    """Parse a client's training result strictly: a JSON object with exactly TrainResult's typed fields."""
    if not isinstance(raw, str):
        raise BadReplyError("the training result is not a JSON string")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadReplyError(f"the training result is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadReplyError("the training result is not a JSON object")
    missing = {"num_samples", "steps", "loss"} - set(data)
    unknown = set(data) - set(_TRAIN_RESULT_TYPES)
    if missing or unknown:
        raise BadReplyError(f"training result fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
    for key, types in _TRAIN_RESULT_TYPES.items():
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], types)):
            raise BadReplyError(f"training result {key} has type {type(data[key]).__name__}")
    if data["num_samples"] < 0 or data["steps"] < 0:
        raise BadReplyError("training result counts must be >= 0")
    return TrainResult(**data)


def _decode(rec: Any) -> list[ProtocolMessage]:
    """The protocol messages in a record (``msgs``: a list of :mod:`secagg.wire` byte strings)."""
    raw = rec.get("msgs", [])
    if not isinstance(raw, list) or not all(isinstance(b, bytes) for b in raw):
        raise BadReplyError("'msgs' must be a list of byte strings")
    return [wire.loads(b) for b in raw]


def _discover(grid: Grid, job: FlowerJob) -> dict[int, int]:
    """Wait for the SuperNodes, ask each for its partition; return ``{client id: node id}``."""
    want = job.num_clients
    deadline = time.monotonic() + job.join_timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            break
        time.sleep(0.2)
    if len(nodes) < want:
        raise RuntimeError(
            f"only {len(nodes)} of {want} SuperNodes connected within {job.join_timeout:g}s; start one "
            f"`privagg flower supernode --partition I/{want}` per client"
        )
    msgs = [
        Message(RecordDict({_RECORD: ConfigRecord({"hello": 1})}), dst_node_id=n, message_type=_HELLO,
                ttl=job.join_timeout + 60.0)
        for n in nodes
    ]
    replies = _send_and_receive(grid, msgs, timeout=job.join_timeout, poll=job.poll_interval or 0.2)
    mapping: dict[int, int] = {}
    hellos: dict[int, Any] = {}
    for r in replies:
        if r.has_error():
            log.error("SuperNode %s refused the job: %s", r.metadata.src_node_id, r.error.reason)
            raise RuntimeError(f"SuperNode {r.metadata.src_node_id} cannot take part: {r.error.reason}")
        try:
            cid = _reply_record(r).get("cid")
        except BadReplyError as exc:
            log.warning("SuperNode %s sent a malformed hello (%s); ignoring it", r.metadata.src_node_id, exc)
            continue
        if isinstance(cid, bool) or not isinstance(cid, int):
            log.warning("SuperNode %s sent a hello without an integer cid; ignoring it", r.metadata.src_node_id)
            continue
        if cid in mapping:
            raise RuntimeError(f"two SuperNodes claim partition {cid}; give each a distinct --partition I/{want}")
        if not 0 <= cid < want:
            raise RuntimeError(f"a SuperNode owns partition {cid}, outside 0..{want - 1}; check --partition I/{want}")
        mapping[cid] = r.metadata.src_node_id
        hellos[r.metadata.src_node_id] = dict(_reply_record(r))
    from fl.runners.flower.site import check_sites

    check_sites(hellos)  # the sites' columns must agree before any round (SiteMismatchError names them)
    if len(mapping) < want:
        missing = sorted(set(range(want)) - set(mapping))
        raise RuntimeError(f"no SuperNode answered for partition(s) {missing} within {job.join_timeout:g}s")
    return mapping


class _Progress:
    """Append-only JSON-lines log the ServerApp writes into ``out`` (tests and the CLI follow it)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "progress.jsonl"

    def __call__(self, **event: Any) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({"t": time.time(), **event}, default=str) + "\n")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """The ServerApp: discover the SuperNodes, then run every round of the job; write the results."""
    job = _job(context)
    out = Path(job.out)
    progress = _Progress(out)
    try:
        result = _serve(grid, job, progress)
    except BaseException as exc:
        _write_json(out / "error.json", {"error": f"{type(exc).__name__}: {exc}"})
        progress(event="error", error=str(exc))
        raise
    _write_json(out / "result.json", result)
    progress(event="done")


def _serve(grid: Grid, job: FlowerJob, progress: _Progress) -> dict[str, Any]:
    """Discover the SuperNodes, run the job's rounds over them; return the result (``result.json``)."""
    t_join = time.perf_counter()
    nodes = _discover(grid, job)
    tr = _Transport(grid, job, nodes)
    tr.progress = progress
    progress(event="joined", nodes={str(c): n for c, n in nodes.items()}, seconds=time.perf_counter() - t_join)
    rounds: list[dict[str, Any]] = []
    fed: Any = _start_federation(job) if job.task == "train" else None
    stopped = None
    for r in range(1, job.num_rounds + 1):
        t_round = time.perf_counter()
        progress(event="round", round=r)
        if job.task == "train":
            planned = fed.sample(r)
            if fed.plan.accounting is not None:
                ok, why = fed.plan.accounting.can_run(fed.round_info(r, planned, planned))
                if not ok:
                    from fl.training.loop import BudgetExhaustedError

                    stopped = f"stopped before round {r}: {BudgetExhaustedError(why)}"
                    break
            ssum, spec, session = fed.plan.pipeline.sum, fed.bound.sum_spec, fed.session(r)
            start = {"params": np.ascontiguousarray(fed.params, dtype=np.float64).tobytes()}
        else:
            planned = tuple(range(job.clients))
            ssum, spec = _sum_protocol(job)
            session, start = os.urandom(16), {}
        record: dict[str, Any] = {"round": r, "planned": len(planned)}
        try:
            if not planned:
                raise _NoUpdatesError("no client was sampled this round")
            rr = _run_round(tr, ssum, spec, round=r, planned=planned, session=session, start_fields=start)
        except (AbortError, _NoUpdatesError) as exc:
            _record_failed_round(record, exc, r=r, fed=fed)
            rounds.append(record)
            progress(event="round_done", **record)
            continue
        if job.task == "train":
            from fl.runners.local import SumOutcome

            outcome = SumOutcome(rr.total, rr.included, rr.messages)
            record = fed.finish_round(r, planned, outcome, rr.results, rejected=rr.rejected)
        else:
            record.update(_checked_sum(job, r, rr.total, rr.included, spec))
        record = {**record, "included_ids": list(rr.included), "seconds": time.perf_counter() - t_round}
        rounds.append(record)
        progress(event="round_done", **record)
    return _result(job, nodes=nodes, rounds=rounds, exchanges=tr.log, fed=fed, stopped=stopped)


def _start_federation(job: FlowerJob) -> Any:
    """The server's :class:`~fl.training.loop.Federation` for a ``train`` job (torch limited to 2 threads)."""
    import torch

    from fl.training.loop import Federation

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    fed = Federation(_train_config(job), stats=_job_stats(job))
    if fed.config.dropout > 0:
        log.warning("--dropout simulates dropouts in memory; over Flower, real dropouts are used instead")
    return fed


def _record_failed_round(record: dict[str, Any], exc: Exception, *, r: int, fed: Any) -> None:
    """Fill ``record`` for a round that aborted or had no client; a training job also evaluates and logs it."""
    log.warning("round %d: %s", r, exc)
    record.update(included=0)
    record["aborted" if isinstance(exc, AbortError) else "skipped"] = str(exc)
    if fed is not None:
        record.update(fed.evaluate())
        fed.history.append(record)


def _checked_sum(
    job: FlowerJob, r: int, total: NDArray[Any], included: Sequence[int], spec: ValueSpec
) -> dict[str, Any]:
    """Check a ``sum`` job's secure sum against the sum of the included clients' public test words.

    Raises RuntimeError when they differ; else returns the record fields ``included`` and ``exact``.
    """
    assert spec.modulus is not None
    expect = np.zeros(job.size, dtype=np.uint64)
    for cid in included:
        expect += _sum_value(job, r, cid)
    expect &= np.uint64(spec.modulus - 1)
    exact = bool(np.array_equal(np.asarray(total, dtype=np.uint64), expect))
    if not exact:
        raise RuntimeError(f"round {r}: the secure sum differs from the sum of the included inputs")
    return {"included": len(included), "exact": exact}


def _result(
    job: FlowerJob, *, nodes: Mapping[int, int], rounds: list[dict[str, Any]], exchanges: Sequence[Any], fed: Any,
    stopped: str | None,
) -> dict[str, Any]:
    """The job's result: job, nodes, rounds and exchanges; a training job's report and saved ``params.npy``."""
    out = Path(job.out)
    result: dict[str, Any] = {
        "job": asdict(job),
        "nodes": {str(c): n for c, n in nodes.items()},
        "rounds": rounds,
        "exchanges": [asdict(e) for e in exchanges],
    }
    if fed is not None:
        np.save(out / "params.npy", fed.params)
        result["report"] = fed.report(baseline=None, stopped=stopped)
        result["params_file"] = str(out / "params.npy")
    return result


# ---------------------------------------------------------------------------------------------- processes
def flower_env(home: Path, base: Mapping[str, str] | None = None, *, task_poll: float = 0.1) -> dict[str, str]:
    """Environment for Flower processes: config in ``home``, no telemetry, update check or installs.

    ``task_poll``: how often a SuperNode's SuperExec looks for a new task (Flower's default is 1 s).
    """
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(task_poll),
    )
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install Flower with `pip install 'privagg[flower]'`")
    return found


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


def register_node(env: Mapping[str, str], public_key: Path, *, name: str | None = None) -> int:
    """``flwr supernode register``: let the SuperNode holding ``public_key``'s private key join; its node id.

    Runs against the connection :func:`write_connection` put in ``env["FLWR_HOME"]`` (the SuperLink's
    Control API). Only registered keys can connect to a SuperLink started with SuperNode authentication.
    """
    import subprocess

    cmd = [_exe("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    if name:
        cmd += ["--name", name]
    cp = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(cp.stdout.strip() or "{}")
    except ValueError:
        out = {}
    if cp.returncode != 0 or not out.get("success"):
        raise RuntimeError(f"registering {public_key} failed ({cp.returncode}): {cp.stdout.strip()} "
                           f"{cp.stderr.strip()}")
    return int(out["node-id"])


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


def superlink_command(*, host: str = "127.0.0.1", port: int = DEFAULT_SUPERLINK_PORT,
                      certs: CertPaths | None = None, allow_insecure_remote: bool = False,
                      supernode_auth: bool = False) -> list[str]:
    """``flower-superlink`` with TLS (``certs``) or ``--insecure`` (loopback only unless ``allow_insecure_remote``).

    ``supernode_auth``: only SuperNodes whose public keys were registered (``privagg flower register``)
    may connect (Flower's ``--enable-supernode-auth``).
    """
    cmd = [_exe("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if certs is None:
        refuse_insecure_remote(host, what="serving on", allow=allow_insecure_remote)
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
            "--ssl-ca-certfile", str(certs.ca)]


def supernode_command(
    *, superlink: str, partition: tuple[int, int], state_key: Path, port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1", certs: CertPaths | None = None, ca: Path | None = None, fleet_poll: float = 0.0,
    policy: Path | None = None, auth_key: Path | None = None, allow_insecure_remote: bool = False,
    data: Path | None = None, site: str | None = None,
) -> list[str]:
    """``flower-supernode`` for client ``partition = (i, n)``.

    ``ca``: the CA that signed the SuperLink's certificate (TLS); ``certs`` also puts the node's local
    Runtime API (``host:port``) under TLS. Neither: ``--insecure``. The SuperNode always starts through
    :func:`supernode_main`, which pins the app it runs; ``fleet_poll > 0`` also polls the SuperLink
    every ``fleet_poll`` seconds when idle instead of Flower's fixed 3 s (and forks ClientApps from a
    warm process); ``fleet_poll = 0`` keeps Flower's stock loop.
    ``policy``: this node's policy file (:class:`NodePolicy`; the safe defaults without one).
    ``auth_key``: this node's private key for SuperNode authentication (``privagg flower register``).
    ``data``/``site``: this node's own CSV and site name (:mod:`fl.runners.flower.site`).
    Without TLS, a SuperLink or Runtime API address outside loopback is refused unless
    ``allow_insecure_remote``.
    """
    i, n = partition
    if not 0 <= i < n:
        raise ValueError(f"--partition I/N needs 0 <= I < N, got {i}/{n}")
    node_config = f'partition-id={i} num-partitions={n} {_STATE_KEY_FILE}="{state_key}"'
    if policy is not None:
        node_config += f' {POLICY_FILE_KEY}="{policy}"'
    if data is not None:
        node_config += f' data-path="{data}" site-name="{site or data.stem}"'
    head = [sys.executable, "-m", "fl.runners.flower", "supernode", str(max(0.0, fleet_poll))]
    cmd = [*head, "--superlink", superlink, "--host", host, "--port", str(port), "--node-config", node_config]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    root = ca if ca is not None else (certs.ca if certs is not None else None)
    if root is None:
        refuse_insecure_remote(superlink, what="connecting to the SuperLink at", allow=allow_insecure_remote)
    if certs is None:
        refuse_insecure_remote(host, what="serving the local Runtime API on", allow=allow_insecure_remote)
    if root is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(root)]
    if certs is not None:
        cmd += ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key), "--ssl-ca-certfile", str(certs.ca)]
    return cmd


def write_connection(home: Path, address: str, *, ca: Path | None, allow_insecure_remote: bool = False) -> Path:
    """Write ``home/config.toml`` with one SuperLink connection named ``privagg`` (TLS when ``ca``).

    Without ``ca`` (plaintext) an address outside loopback is refused unless ``allow_insecure_remote``.
    """
    if ca is None:
        refuse_insecure_remote(address, what="submitting to the SuperLink at", allow=allow_insecure_remote)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca}"' if ca is not None else "insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_app(directory: Path, job: FlowerJob) -> Path:
    """Write a Flower App (``pyproject.toml`` only) whose components are this module's apps."""
    directory.mkdir(parents=True, exist_ok=True)
    job_toml = json.dumps(job.to_json())  # a JSON string is a valid TOML basic string
    (directory / "pyproject.toml").write_text(
        "\n".join([
            "[build-system]",
            'requires = ["hatchling"]',
            'build-backend = "hatchling.build"',
            "",
            "[project]",
            'name = "privagg-flower"',
            'version = "1.0.0"',
            'description = "privagg secure aggregation over Flower"',
            'license = "Apache-2.0"',
            "dependencies = []",
            "",
            "[tool.flwr.app]",
            'publisher = "privagg"',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "fl.runners.flower:server_app"',
            'clientapp = "fl.runners.flower:client_app"',
            "",
            "[tool.flwr.app.config]",
            f"{_JOB_KEY} = {job_toml}",
            "",
        ])
    )
    return directory


class LocalCluster:
    """A SuperLink and ``n`` SuperNodes as processes on one host (tests, benchmarks, ``privagg flower local``).

    Each process is started in its own session (process group); :meth:`stop` signals exactly those
    groups, by the PIDs it started (SIGTERM, then SIGKILL after ``grace`` seconds), so Flower's helper
    processes (SuperExec, ServerApp, ClientApps) go with them. Use it as a context manager so the
    processes are stopped also when the body fails.
    """

    def __init__(self, workdir: Path, n: int, *, tls: bool = True, host: str = "127.0.0.1",
                 port: int | None = None, node_ports: Sequence[int] | None = None, task_poll: float = 0.1,
                 fleet_poll: float = 0.0, policy: NodePolicy | None = None, supernode_auth: bool = False,
                 sites: Sequence[tuple[str, Path]] | None = None) -> None:
        if supernode_auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        self.workdir = workdir
        self.n = n
        self.tls = tls
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self.node_ports = list(node_ports) if node_ports is not None else [_free_port(host) for _ in range(n)]
        if len(self.node_ports) != n:
            raise ValueError(f"need {n} SuperNode ports, got {len(self.node_ports)}")
        self.sites = list(sites) if sites is not None else None  # (site name, CSV) of node i
        self.home = workdir / "flwr-home"
        self.env = flower_env(self.home, task_poll=task_poll)
        self.fleet_poll = fleet_poll
        self.policy = policy
        self.supernode_auth = supernode_auth
        self.certs: CertPaths | None = None
        self.superlink: Any = None
        self.nodes: dict[int, Any] = {}
        self.logs = workdir / "logs"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> Any:
        import subprocess

        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as fh:
            return subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.workdir)

    def start(self, *, timeout: float = 30.0) -> LocalCluster:
        """Start everything and wait until the SuperLink and each SuperNode's local port accept connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs", hosts=(self.host, "localhost"))
        write_connection(self.home, self.address, ca=self.certs.ca if self.certs else None)
        self.superlink = self._spawn("superlink", superlink_command(host=self.host, port=self.port, certs=self.certs,
                                                                    supernode_auth=self.supernode_auth))
        _wait_port(self.host, self.port, timeout, self.superlink, self.logs / "superlink.log")
        for i in range(self.n):
            self.start_node(i)
        for i in range(self.n):
            _wait_port(self.host, self.node_ports[i], timeout, self.nodes[i], self.logs / f"supernode{i}.log")
        return self

    def start_node(self, i: int, *, register: bool = True) -> Any:
        """Start SuperNode ``i`` (partition i of n); with SuperNode auth, register its fresh key first
        unless ``register=False`` (an intruder: its key is unknown to the SuperLink)."""
        key = make_state_key(self.workdir / "keys" / f"node{i}.key")
        policy = self.policy.save(self.workdir / "policy.json") if self.policy is not None else None
        while len(self.node_ports) <= i:
            self.node_ports.append(_free_port(self.host))
        auth_key = None
        if self.supernode_auth:
            auth_key, public = make_node_keys(self.workdir / "auth", f"node{i}")
            if register:
                register_node(self.env, public, name=f"node{i}")
        cmd = supernode_command(superlink=self.address, partition=(i, max(self.n, i + 1)), state_key=key,
                                port=self.node_ports[i], host=self.host, certs=self.certs, fleet_poll=self.fleet_poll,
                                policy=policy, auth_key=auth_key, site=self.sites[i][0] if self.sites else None,
                                data=self.sites[i][1] if self.sites else None)
        self.nodes[i] = self._spawn(f"supernode{i}", cmd)
        return self.nodes[i]

    def kill_node(self, i: int) -> None:
        """Kill SuperNode ``i`` and its helpers at once (SIGKILL to its process group): a crash."""
        import signal

        proc = self.nodes[i]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def run(self, job: FlowerJob, *, timeout: float) -> dict[str, Any]:
        """``flwr run`` the job, wait for the ServerApp's ``result.json``; raise with its error otherwise."""
        self.submit(job)
        return wait_result(Path(job.out), timeout=timeout, processes=[self.superlink])

    def submit(self, job: FlowerJob) -> Path:
        """``flwr run`` the job (returns at once); the ServerApp writes into ``job.out``."""
        out = Path(job.out)
        for name in ("result.json", "error.json", "progress.jsonl"):
            (out / name).unlink(missing_ok=True)
        self.submit_app(write_app(self.workdir / "app", job))
        return out

    def submit_app(self, app: Path) -> None:
        """``flwr run APP privagg`` against this cluster's SuperLink."""
        import subprocess

        cp = subprocess.run([_exe("flwr"), "run", str(app), CONNECTION], env=self.env, capture_output=True,
                            text=True, timeout=60, cwd=self.workdir)
        if cp.returncode != 0:
            raise RuntimeError(f"flwr run failed ({cp.returncode}): {cp.stdout}\n{cp.stderr}")

    def stop(self, grace: float = 3.0) -> None:
        """Stop exactly the process groups this cluster started (SIGTERM, then SIGKILL)."""
        import signal
        import subprocess

        procs = [p for p in [*self.nodes.values(), self.superlink] if p is not None]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:  # the group may outlive its leader (helpers): kill whatever is left of it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.poll() is None:
                p.wait(timeout=10)
        deadline = time.monotonic() + 10
        for p in procs:  # wait until every member of every group is gone (reaped)
            while _group_alive(p.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_result(out: Path, *, timeout: float, processes: Sequence[Any] = ()) -> dict[str, Any]:
    """Wait for the ServerApp's ``result.json`` in ``out``; raise on ``error.json``, a dead process or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "result.json").is_file():
            return dict(json.loads((out / "result.json").read_text()))
        if (out / "error.json").is_file():
            raise RuntimeError(f"the ServerApp failed: {json.loads((out / 'error.json').read_text())['error']}")
        for p in processes:
            if p.poll() is not None:
                raise RuntimeError(f"Flower process {p.pid} exited with {p.returncode} before the run finished")
        time.sleep(0.2)
    raise TimeoutError(f"no result in {out} after {timeout:g}s; see progress.jsonl there and the Flower logs")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float, proc: Any, logfile: Path) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text()[-2000:] if logfile.is_file() else ""
            raise RuntimeError(f"Flower process exited with {proc.returncode} before opening {host}:{port}:\n{tail}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s; see {logfile}")


class _FastClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: sleeps at most ``poll`` seconds."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll))


def _runtime_address(argv: Sequence[str]) -> tuple[str, bool, str | None]:
    """The SuperNode's local Runtime API address and TLS settings, read from its command line."""
    def opt(name: str, default: str | None) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else default

    host, port = opt("--host", "127.0.0.1"), opt("--port", str(DEFAULT_SUPERNODE_PORT))
    ca = opt("--ssl-ca-certfile", None)
    tls = "--ssl-certfile" in argv
    return f"{host}:{port}", not tls, ca if tls else None


def _node_policy_from_argv(argv: Sequence[str]) -> NodePolicy:
    """The node policy named in ``--node-config`` of a SuperNode command line (the defaults if none)."""
    from flwr.common.config import parse_config_args

    config = parse_config_args([argv[argv.index("--node-config") + 1]]) if "--node-config" in argv else {}
    return NodePolicy.from_node_config(config)


def supernode_main(poll: float, argv: Sequence[str], *, fork: bool = True) -> int:
    """``flower-supernode ARGV`` with the app pin, tuned for short protocol phases when ``poll > 0``.

    * App pin (always): the node runs only the installed privagg ClientApp, or apps its policy trusts
      (:mod:`fl.runners.flower.pin`). If this Flower version has no hook for it, the node refuses to
      start (:class:`~fl.runners.flower.pin.PinUnavailableError`) rather than run unpinned.
    * ``poll <= 0``: nothing else changes (Flower's stock loop and one interpreter per message).

    * Idle poll: Flower's SuperNode sleeps a fixed 3 s whenever the SuperLink has no message for it, so
      each phase waits on average 1.5 s (the slowest of n nodes up to 3 s) before a node sees its
      message. Its loop reads ``time.sleep`` from its module; that is swapped for one capped at
      ``poll`` seconds.
    * ``fork``: Flower starts a fresh ``flwr-clientapp`` interpreter per message (imports of Flower,
      numpy, torch: seconds each time). Here the SuperNode runs with ``--isolation process`` next to
      :func:`superexec_main`, a SuperExec that forks each ClientApp from a process that has already
      imported everything, then runs Flower's own ``flwr-clientapp`` code in the child.

    If a Flower release moves the poll or executor internals, the SuperNode runs them unchanged, with
    a warning.
    """
    import subprocess

    from fl.runners.flower.pin import install_app_pin

    argv = list(argv)
    install_app_pin(_node_policy_from_argv(argv))
    if poll <= 0:
        fork = False
    try:
        import flwr.supernode.start_client_internal as sci

        if poll <= 0:
            pass
        elif getattr(sci, "time", None) is time:
            sci.__dict__["time"] = _FastClock(poll)
        else:
            log.warning("this Flower version has no SuperNode poll loop to shorten; running it unchanged")
    except ImportError:
        log.warning("this Flower version has no flwr.supernode.start_client_internal; running it unchanged")
    if fork and "--isolation" not in argv:
        address, insecure, ca = _runtime_address(argv)
        cmd = [sys.executable, "-m", "fl.runners.flower", "superexec", "--runtime-api-address", address,
               "--parent-pid", str(os.getpid())]
        cmd += ["--insecure"] if insecure else (["--root-certificates", ca] if ca else [])
        subprocess.Popen(cmd)  # same process group: stopped with the SuperNode
        argv += ["--isolation", "process"]
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


class _ForkExecutor:
    """A SuperExec executor that forks a warm process per ClientApp task instead of exec'ing a new one."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self._children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: Any, **kw: Any) -> Any:
        return self._fallback.get_eligible_capacity(supported_task_types, **kw)

    def wait_for_capacity(self, *a: Any, **kw: Any) -> None:
        self._fallback.wait_for_capacity(*a, **kw)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        args = ["flwr-clientapp", "--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child: Flower's own ClientApp runner, then leave without touching the parent's state
            code = 1
            try:
                from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

                sys.argv = args
                flwr_clientapp()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("ClientApp task failed")
            finally:
                log.info("forked ClientApp task finished in %.3fs (exit %s)", time.perf_counter() - t0, code)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def superexec_main(argv: Sequence[str]) -> int:
    """``flower-superexec ARGV`` with :class:`_ForkExecutor`: warm imports, one fork per ClientApp task."""
    import flwr.supercore.superexec.run_superexec as rs

    # Warm imports, done once: Flower's ClientApp runner, the protocol, and for training torch + the loop.
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    from flwr.supercore.cli.flower_superexec import flower_superexec

    import fl.sums.secagg
    import secagg.masking.client
    import secagg.wire  # noqa: F401

    try:
        import fl.training.client  # noqa: F401  (torch)
    except ImportError as exc:
        log.warning("cannot pre-import fl.training.client (%s); tasks will import it themselves", exc)
    rs.__dict__["get_executor"] = lambda *a, **kw: _ForkExecutor()
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()
    return 0

