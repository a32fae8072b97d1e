"""Run privagg's own secure-sum protocols across machines on Flower (``pip install 'privagg[flower]'``).

Flower carries the bytes; our sans-IO machines do the protocol. The :data:`server_app` workflow drives
the aggregator's :class:`~secagg.machine.ServerMachine` phase by phase: every phase is one
``Grid`` exchange (push the phase's messages to the SuperNodes, collect the replies until the phase
timeout); a SuperNode that has not answered by then has dropped, exactly like a runner deadline. The
:data:`client_app` drives the client's :class:`~secagg.machine.ClientMachine`. Protocol messages travel
as :mod:`secagg.wire` bytes inside a ``ConfigRecord``; Flower's ``secaggplus_mod`` and
``SecAggPlusWorkflow`` are not used.

Flower starts a fresh ``flwr-clientapp`` process for every message, so a client's machine (its round
secrets) must survive between phases: it is pickled, sealed with AES-GCM under a per-SuperNode key that
only that node's ClientApps can read (``state-key-file`` in the node config), and kept in the node's
``Context.state``. Only blobs that authenticate under that key are ever unpickled.

Two jobs run on this transport. ``train`` drives :class:`fl.loop.Federation` on both sides (the server
samples, decodes, averages, evaluates and keeps the ledger; each SuperNode owns one partition and
trains/encodes with the same seeds), so the final model equals the in-memory runner's for the same
config. ``sum`` sums public pseudo-random ring vectors and checks the result exactly: the latency
benchmark and the dropout test.

Where the time goes: the protocol itself costs milliseconds per round (d = 1e5); a stock Flower round
costs tens of seconds because every phase waits for a SuperNode's fixed 3 s idle poll, a fresh
``flwr-clientapp`` interpreter per message, and (with ``Grid.send_and_receive``) 3 s server-side polls.
The ServerApp here pulls replies every ``poll_interval`` (50 ms), and :func:`supernode_main` (what
``privagg flower supernode`` starts) polls the SuperLink every 0.1 s and forks each ClientApp from a
warm process (:func:`superexec_main`). Stock ``flower-supernode`` processes work too, just slower.

Process helpers (:func:`superlink_command`, :func:`supernode_command`, :func:`flower_env`,
:func:`make_certificates`, :func:`write_app`, :func:`write_connection`, :class:`LocalCluster`) are shared
by ``privagg flower`` and the tests. Flower's config lives in ``FLWR_HOME`` (never ``~/.flwr``);
telemetry, update checks and runtime dependency installation are switched off.
"""

from __future__ import annotations

import contextlib
import copyreg
import datetime
import importlib
import ipaddress
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from numpy.typing import NDArray

from fl.spec import SecureSum, TrainResult, ValueSpec
from secagg.errors import AbortError, CodecError, ProtocolError
from secagg.machine import SERVER, ClientMachine, ServerMachine
from secagg.machine import Message as ProtocolMessage

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "CertPaths",
    "FlowerJob",
    "LocalCluster",
    "client_app",
    "flower_env",
    "make_certificates",
    "make_state_key",
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
_STATE = "privagg-state"
_HELLO = "query.privagg_hello"
_START = "train.privagg_start"
_STEP = "query.privagg_step"
_JOB_KEY = "job"
_STATE_KEY_FILE = "state-key-file"


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
    codec: str = "secagg.wire"
    join_timeout: float = 60.0
    start_timeout: float = 120.0
    phase_timeout: float = 30.0
    poll_interval: float = 0.05

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FlowerJob:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Flower job field(s) {unknown}; the app was written by another privagg version")
        return cls(**data)

    @property
    def num_clients(self) -> int:
        if self.task == "train":
            return int(self.config.get("clients", 0))
        return self.clients

    @property
    def num_rounds(self) -> int:
        return int(self.config.get("rounds", 0)) if self.task == "train" else self.rounds


def _job(context: Context) -> FlowerJob:
    text = context.run_config.get(_JOB_KEY)
    if not isinstance(text, str):
        raise ValueError("the Flower app has no privagg job in its run config; start runs with `privagg flower run`")
    return FlowerJob.from_json(text)


def _codec(name: str) -> ModuleType:
    """The message codec module (``dumps(msg) -> bytes`` / ``loads(bytes) -> msg``)."""
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(f"cannot import the wire codec {name!r}: {exc}; install privagg on every machine") from exc
    if not (callable(getattr(mod, "dumps", None)) and callable(getattr(mod, "loads", None))):
        raise RuntimeError(f"{name!r} is not a wire codec: it needs dumps(msg) -> bytes and loads(bytes) -> msg")
    return mod


# ---------------------------------------------------------------------------------------------- sum task
def _sum_protocol(job: FlowerJob) -> tuple[SecureSum, ValueSpec]:
    """The secure sum and ring spec of a ``sum`` job (values of ``ring_bits - log2(cohort)`` bits)."""
    vbits = job.ring_bits - max(0, math.ceil(math.log2(max(1, job.clients))))
    spec = ValueSpec(size=job.size, cohort=job.clients, domain="ring", modulus=1 << job.ring_bits, value_bits=vbits)
    ssum: SecureSum
    if job.protocol in ("secagg", "secagg+"):
        from fl.sums_secagg import SecAgg, SecAggPlus

        ssum = SecAgg(threshold=job.threshold) if job.protocol == "secagg" else SecAggPlus(threshold=job.threshold)
    elif job.protocol == "plain":
        from fl.sums import PlainSum

        ssum = PlainSum(min_clients=max(1, math.ceil(job.threshold * job.clients)))
    else:
        raise ValueError(f"unknown protocol {job.protocol!r}: choose secagg+, secagg or plain")
    return ssum, ssum.bind(spec)


def _sum_value(job: FlowerJob, round: int, cid: int) -> NDArray[np.uint64]:
    """Client ``cid``'s public test vector for ``round`` (non-negative, below 2^(value_bits-1))."""
    from dp.rng import SecureRandom

    _, spec = _sum_protocol(job)
    assert spec.value_bits is not None
    words = SecureRandom.for_testing(f"flower-sum:{job.seed}:{round}:{cid}").uint64(job.size)
    return words >> np.uint64(64 - (spec.value_bits - 1))


# ---------------------------------------------------------------------------------------------- sealing
def _reduce_x25519(key: x25519.X25519PrivateKey) -> tuple[Any, tuple[bytes]]:
    return x25519.X25519PrivateKey.from_private_bytes, (key.private_bytes_raw(),)


def _reduce_x25519_pub(key: x25519.X25519PublicKey) -> tuple[Any, tuple[bytes]]:
    return x25519.X25519PublicKey.from_public_bytes, (key.public_bytes_raw(),)


def _reduce_ed25519(key: ed25519.Ed25519PrivateKey) -> tuple[Any, tuple[bytes]]:
    return ed25519.Ed25519PrivateKey.from_private_bytes, (key.private_bytes_raw(),)


def _reduce_ed25519_pub(key: ed25519.Ed25519PublicKey) -> tuple[Any, tuple[bytes]]:
    return ed25519.Ed25519PublicKey.from_public_bytes, (key.public_bytes_raw(),)


_sample_x = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
_sample_e = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
copyreg.pickle(type(_sample_x), _reduce_x25519)
copyreg.pickle(type(_sample_x.public_key()), _reduce_x25519_pub)
copyreg.pickle(type(_sample_e), _reduce_ed25519)
copyreg.pickle(type(_sample_e.public_key()), _reduce_ed25519_pub)
del _sample_x, _sample_e


def make_state_key(path: Path) -> Path:
    """Write a fresh 32-byte key (hex, mode 0600) that seals this SuperNode's protocol state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex())
    return path


def _state_key(context: Context) -> bytes:
    path = context.node_config.get(_STATE_KEY_FILE)
    if not isinstance(path, str) or not path:
        raise RuntimeError(
            f"this SuperNode has no {_STATE_KEY_FILE!r} in its --node-config; start it with "
            f"`privagg flower supernode` (or make a key with `privagg flower certs` and pass "
            f"--node-config '{_STATE_KEY_FILE}=\"/path/state.key\"')"
        )
    key = bytes.fromhex(Path(path).read_text().strip())
    if len(key) != 32:
        raise RuntimeError(f"{path} must hold a 32-byte key in hex; recreate it with `privagg flower supernode`")
    return key


def _aad(context: Context) -> bytes:
    return f"privagg-flower-state|{context.run_id}|{context.node_id}".encode()


def _seal(context: Context, obj: object) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(_state_key(context)).encrypt(nonce, pickle.dumps(obj), _aad(context))


def _unseal(context: Context, blob: bytes) -> Any:
    from cryptography.exceptions import InvalidTag

    try:
        raw = AESGCM(_state_key(context)).decrypt(blob[:12], blob[12:], _aad(context))
    except InvalidTag as exc:
        raise ProtocolError("the stored protocol state does not authenticate under this node's key") from exc
    return pickle.loads(raw)  # authenticated: written by this node's own ClientApp


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


def _incoming(msg: Message, codec: ModuleType) -> list[ProtocolMessage]:
    return _decode(_rec(msg.content), codec)


def _outgoing(msgs: Iterable[ProtocolMessage], codec: ModuleType) -> dict[str, Any]:
    data = [codec.dumps(m) for m in msgs]
    return {"msgs": data} if data else {}


@client_app.query("privagg_hello")
def _hello(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client id) this SuperNode owns."""
    _state_key(context)  # fail at join time, not mid-round, when the node cannot keep state
    n = context.node_config.get("num-partitions", -1)
    return _reply(msg, {"cid": _partition(context), "num": int(n) if isinstance(n, int) else -1})


@client_app.train("privagg_start")
def _start(msg: Message, context: Context) -> Message:
    """Round opens: train (``train``) or draw the vector (``sum``), start our client machine."""
    t0 = time.perf_counter()
    job = _job(context)
    codec = _codec(job.codec)
    rec = _rec(msg.content)
    cid = _partition(context)
    rnd = int(rec["round"])
    session = bytes(rec["session"])
    ssum: SecureSum
    extra: dict[str, Any] = {}
    if job.task == "train":
        import torch

        from fl.loop import Federation, NonFiniteUpdateError

        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        fed = Federation(_train_config(job))
        params = np.frombuffer(bytes(rec["params"]), dtype=np.float64).copy()
        try:
            value, result = fed.client_update(cid, rnd, params)
        except NonFiniteUpdateError as exc:
            log.warning("%s", exc)
            return _reply(msg, {"rejected": str(exc)})
        extra["result"] = json.dumps(asdict(result), default=str)
        ssum, spec = fed.plan.pipeline.sum, fed.bound.sum_spec
    else:
        ssum, spec = _sum_protocol(job)
        value = _sum_value(job, rnd, cid)
    if dict(ssum.parties(spec=spec, session=session, round=rnd)):
        raise ProtocolError(f"{ssum.name} needs an extra party (a key holder); the Flower runner does not host one")
    machine = ssum.client(cid, value, spec=spec, session=session, round=rnd)
    out = machine.start()
    for m in _incoming(msg, codec):
        out += machine.receive(m)
    context.state[_STATE] = ConfigRecord({"machine": _seal(context, machine), "round": rnd, "session": session})
    extra["compute_s"] = time.perf_counter() - t0
    return _reply(msg, {**_outgoing(out, codec), **extra})


@client_app.query("privagg_step")
def _step(msg: Message, context: Context) -> Message:
    """One later phase: feed the server's messages to our stored machine, send back its replies."""
    t0 = time.perf_counter()
    job = _job(context)
    codec = _codec(job.codec)
    rec = _rec(msg.content)
    if _STATE not in context.state:
        raise ProtocolError("no protocol state for this round on this node (restarted mid-round?)")
    st = _rec(context.state, _STATE)
    if int(st["round"]) != int(rec["round"]) or bytes(st["session"]) != bytes(rec["session"]):
        raise ProtocolError("the server's message belongs to another round or session than this node's state")
    machine: ClientMachine = _unseal(context, bytes(st["machine"]))
    out: list[ProtocolMessage] = []
    for m in _incoming(msg, codec):
        out += machine.receive(m)
    if bool(rec["final"]):
        del context.state[_STATE]  # the round's secrets are no longer needed
    else:
        context.state[_STATE] = ConfigRecord(
            {"machine": _seal(context, machine), "round": int(rec["round"]), "session": bytes(rec["session"])}
        )
    return _reply(msg, {**_outgoing(out, codec), "compute_s": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------- server side
def _train_config(job: FlowerJob) -> Any:
    from fl.config import PrivacyConfig, TrainConfig

    data = dict(job.config)
    privacy = PrivacyConfig(**data.pop("privacy", {}))
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
        self.codec = _codec(job.codec)
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
            else:
                got[cid] = _rec(r.content)
        client_s = max((float(v["compute_s"]) for v in got.values() if "compute_s" in v), default=0.0)
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
    """Drive one round of our server machine over Flower, as :func:`fl.runners.local.run_secure_sum` does.

    Phase 0 asks every sampled client to train (or draw its vector) and start its machine; the server
    machine is then built over the clients that answered with an update (a client that rejected its own
    update is left out, as in memory; one that did not answer in time has dropped).
    """
    phases = ssum.server(list(planned), spec=spec, session=session, round=round).phases
    payloads = {cid: {**start_fields, "round": round, "session": session} for cid in planned}
    replies, failed = tr.exchange(round, phases[0], payloads, kind=_START, timeout=tr.job.start_timeout)
    results: dict[int, TrainResult] = {}
    rejected: list[int] = []
    for cid, rec in replies.items():
        if "rejected" in rec:
            rejected.append(cid)
        elif "result" in rec:
            results[cid] = TrainResult(**json.loads(str(rec["result"])))
    alive = set(replies) - set(rejected) - failed
    if not alive:
        if rejected and not (set(planned) - set(rejected)):
            raise _NoUpdatesError("no client update this round")
        raise AbortError(phases[0], needed=1, answered=0)
    members = sorted(alive)
    t0 = time.perf_counter()
    server: ServerMachine = ssum.server(members, spec=spec, session=session, round=round)
    to_parties: list[ProtocolMessage] = list(server.start())
    server_s = time.perf_counter() - t0
    count = 0

    def grouped(msgs: Iterable[ProtocolMessage]) -> dict[int, list[ProtocolMessage]]:
        out: dict[int, list[ProtocolMessage]] = {}
        for m in msgs:
            if m.recipient in alive:
                out.setdefault(m.recipient, []).append(m)
            elif m.recipient != SERVER and m.recipient not in planned:
                raise ProtocolError(f"message for unknown party {m.recipient}: the Flower runner hosts no extra roles")
        return out

    to_server = [(cid, rec) for cid, rec in replies.items() if cid in alive]
    guard = 0
    while not server.done:
        guard += 1
        if guard > 10 * (len(phases) + 2):
            raise RuntimeError(f"protocol did not finish after {guard} steps (stuck in {server.phase!r})")
        t1 = time.perf_counter()
        for cid, rec in sorted(to_server, key=lambda x: x[0]):
            try:
                for m in _decode(rec, tr.codec):
                    count += 1
                    if m.sender != cid:
                        raise ProtocolError(f"client {cid} sent a message claiming to be from {m.sender}")
                    if m.recipient == SERVER:
                        to_parties += server.receive(m)
                    else:
                        to_parties.append(m)  # client-to-client traffic is relayed with the next phase
            except (CodecError, ProtocolError) as exc:
                # A bad reply counts as no reply: the client is dropped, as at a missed deadline.
                log.warning("round %d: dropping client %d, its reply was refused: %s", round, cid, exc)
                alive.discard(cid)
        to_server = []
        if not any(m.recipient in alive for m in to_parties):
            to_parties += server.end_phase()  # AbortError below the threshold
        server_s += time.perf_counter() - t1
        if tr.log:
            tr.log[-1].server_s += server_s
        server_s = 0.0
        batch = grouped(to_parties)
        to_parties = []
        if not batch:
            continue
        final = server.phase == phases[-1]
        payloads = {
            cid: {"round": round, "session": session, "final": final, **_outgoing(ms, tr.codec)}
            for cid, ms in batch.items()
        }
        count += sum(len(ms) for ms in batch.values())
        replies, failed = tr.exchange(round, server.phase, payloads, kind=_STEP, timeout=tr.job.phase_timeout)
        dropped = set(batch) - set(replies)
        if dropped:
            log.warning("round %d, phase %s: client(s) %s dropped", round, server.phase, sorted(dropped))
        alive -= dropped
        to_server = [(cid, rec) for cid, rec in replies.items() if cid in alive]
    assert server.result is not None
    return _RoundResult(server.result, tuple(server.included), count, results, rejected)


def _rec(content: RecordDict, key: str = _RECORD) -> Any:
    """Our ``ConfigRecord`` in a message or state, typed loosely: each value is checked where it is used."""
    return content[key]


def _decode(rec: Any, codec: ModuleType) -> list[ProtocolMessage]:
    return [codec.loads(bytes(b)) for b in rec.get("msgs", [])]


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
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"SuperNode {r.metadata.src_node_id} cannot take part: {r.error.reason}")
        cid = int(_rec(r.content)["cid"])
        if cid in mapping:
            raise RuntimeError(f"two SuperNodes claim partition {cid}; give each a distinct --partition I/{want}")
        if not 0 <= cid < want:
            raise RuntimeError(f"a SuperNode owns partition {cid}, outside 0..{want - 1}; check --partition I/{want}")
        mapping[cid] = r.metadata.src_node_id
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
    out = Path(job.out)
    t_join = time.perf_counter()
    nodes = _discover(grid, job)
    tr = _Transport(grid, job, nodes)
    tr.progress = progress
    progress(event="joined", nodes={str(c): n for c, n in nodes.items()}, seconds=time.perf_counter() - t_join)
    rounds: list[dict[str, Any]] = []
    fed: Any = None
    if job.task == "train":
        import torch

        from fl.loop import BudgetExhaustedError, Federation

        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        fed = Federation(_train_config(job))
        if fed.config.dropout > 0:
            log.warning("--dropout simulates dropouts in memory; over Flower, real dropouts are used instead")
    stopped = None
    for r in range(1, job.num_rounds + 1):
        t_round = time.perf_counter()
        progress(event="round", round=r)
        if job.task == "train":
            planned = fed.sample(r)
            if fed.plan.accounting is not None:
                ok, why = fed.plan.accounting.can_run(fed.round_info(r, planned, planned))
                if not ok:
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
            log.warning("round %d: %s", r, exc)
            record.update(included=0)
            record["aborted" if isinstance(exc, AbortError) else "skipped"] = str(exc)
            if fed is not None:
                record.update(fed.evaluate())
                fed.history.append(record)
            rounds.append(record)
            progress(event="round_done", **record)
            continue
        if job.task == "train":
            from fl.runners.local import SumOutcome

            outcome = SumOutcome(rr.total, rr.included, rr.messages)
            record = fed.finish_round(r, planned, outcome, rr.results, rejected=rr.rejected)
        else:
            assert spec.modulus is not None
            expect = np.zeros(job.size, dtype=np.uint64)
            for cid in rr.included:
                expect += _sum_value(job, r, cid)
            expect &= np.uint64(spec.modulus - 1)
            exact = bool(np.array_equal(np.asarray(rr.total, dtype=np.uint64), expect))
            if not exact:
                raise RuntimeError(f"round {r}: the secure sum differs from the sum of the included inputs")
            record.update(included=len(rr.included), exact=exact)
        record = {**record, "included_ids": list(rr.included), "seconds": time.perf_counter() - t_round}
        rounds.append(record)
        progress(event="round_done", **record)
    result: dict[str, Any] = {
        "job": asdict(job),
        "nodes": {str(c): n for c, n in nodes.items()},
        "rounds": rounds,
        "exchanges": [asdict(e) for e in tr.log],
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
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privagg throw-away test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertPaths(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return paths


def superlink_command(*, host: str = "127.0.0.1", port: int = DEFAULT_SUPERLINK_PORT,
                      certs: CertPaths | None = None) -> list[str]:
    """``flower-superlink`` with TLS (``certs``) or ``--insecure``, runtime installs off."""
    cmd = [_exe("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
            "--ssl-ca-certfile", str(certs.ca)]


def supernode_command(
    *, superlink: str, partition: tuple[int, int], state_key: Path, port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1", certs: CertPaths | None = None, ca: Path | None = None, fleet_poll: float = 0.0,
) -> list[str]:
    """``flower-supernode`` for client ``partition = (i, n)``.

    ``ca``: the CA that signed the SuperLink's certificate (TLS); ``certs`` also puts the node's local
    Runtime API (``host:port``) under TLS. Neither: ``--insecure``. ``fleet_poll > 0`` starts the
    SuperNode through :func:`supernode_main`, which polls the SuperLink every ``fleet_poll`` seconds
    when idle instead of Flower's fixed 3 s (and waits for replies in steps of that size, not 0.5 s).
    """
    i, n = partition
    if not 0 <= i < n:
        raise ValueError(f"--partition I/N needs 0 <= I < N, got {i}/{n}")
    node_config = f'partition-id={i} num-partitions={n} {_STATE_KEY_FILE}="{state_key}"'
    head = [sys.executable, "-m", "fl.runners.flower", "supernode", str(fleet_poll)] if fleet_poll > 0 else [
        _exe("flower-supernode")]
    cmd = [*head, "--superlink", superlink, "--host", host, "--port", str(port), "--node-config", node_config]
    root = ca if ca is not None else (certs.ca if certs is not None else None)
    if root is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(root)]
    if certs is not None:
        cmd += ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key), "--ssl-ca-certfile", str(certs.ca)]
    return cmd


def write_connection(home: Path, address: str, *, ca: Path | None) -> Path:
    """Write ``home/config.toml`` with one SuperLink connection named ``privagg`` (TLS when ``ca``)."""
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
                 fleet_poll: float = 0.0) -> None:
        self.workdir = workdir
        self.n = n
        self.tls = tls
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self.node_ports = list(node_ports) if node_ports is not None else [_free_port(host) for _ in range(n)]
        if len(self.node_ports) != n:
            raise ValueError(f"need {n} SuperNode ports, got {len(self.node_ports)}")
        self.home = workdir / "flwr-home"
        self.env = flower_env(self.home, task_poll=task_poll)
        self.fleet_poll = fleet_poll
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
        self.superlink = self._spawn("superlink", superlink_command(host=self.host, port=self.port, certs=self.certs))
        _wait_port(self.host, self.port, timeout, self.superlink, self.logs / "superlink.log")
        for i in range(self.n):
            self.start_node(i)
        for i in range(self.n):
            _wait_port(self.host, self.node_ports[i], timeout, self.nodes[i], self.logs / f"supernode{i}.log")
        return self

    def start_node(self, i: int) -> Any:
        key = make_state_key(self.workdir / "keys" / f"node{i}.key")
        cmd = supernode_command(superlink=self.address, partition=(i, self.n), state_key=key, port=self.node_ports[i],
                                host=self.host, certs=self.certs, fleet_poll=self.fleet_poll)
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


def supernode_main(poll: float, argv: Sequence[str], *, fork: bool = True) -> int:
    """``flower-supernode ARGV`` tuned for short protocol phases (what ``fleet_poll > 0`` starts).

    * Idle poll: Flower's SuperNode sleeps a fixed 3 s whenever the SuperLink has no message for it, so
      each phase waits on average 1.5 s (the slowest of n nodes up to 3 s) before a node sees its
      message. Its loop reads ``time.sleep`` from its module; that is swapped for one capped at
      ``poll`` seconds.
    * ``fork``: Flower starts a fresh ``flwr-clientapp`` interpreter per message (imports of Flower,
      numpy, torch: seconds each time). Here the SuperNode runs with ``--isolation process`` next to
      :func:`superexec_main`, a SuperExec that forks each ClientApp from a process that has already
      imported everything, then runs Flower's own ``flwr-clientapp`` code in the child.

    If a Flower release moves these internals, the SuperNode runs unchanged, with a warning.
    """
    import subprocess

    argv = list(argv)
    try:
        import flwr.supernode.start_client_internal as sci

        if getattr(sci, "time", None) is time:
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
    from flwr.supercore.cli.flower_superexec import flower_superexec

    # Warm imports, done once: Flower's ClientApp runner, the protocol, and for training torch + the loop.
    for name in ("flwr.supernode.cli.flwr_clientapp", "secagg.client", "secagg.wire", "fl.sums_secagg", "fl.loop"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("cannot pre-import %s (%s); tasks will import it themselves", name, exc)
    rs.__dict__["get_executor"] = lambda *a, **kw: _ForkExecutor()
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "supernode":
        sys.exit(supernode_main(float(sys.argv[2]), sys.argv[3:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "superexec":
        sys.exit(superexec_main(sys.argv[2:]))
    sys.exit("usage: python -m fl.runners.flower (supernode POLL_SECONDS | superexec) [Flower arguments]")
