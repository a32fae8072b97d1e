"""Flower as a :class:`secagg.drive.Transport`: one ``Grid`` exchange per protocol phase.

:class:`GridTransport` pushes one message per client and pulls replies every ``poll_interval`` (Flower's own
``send_and_receive`` sleeps 3 s between pulls) until the phase timeout, which is the dropout deadline.
:class:`PhaseLink` adapts it to :func:`secagg.drive.drive` for one round and checks every reply's sender
and recipients before the server machine sees it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl.runners.flower.job import (
    KEYHOLDER,
    RECORD,
    STEP,
    BadReplyError,
    FlowerJob,
    compute_s,
    decode_msgs,
    encode_msgs,
    reply_record,
)
from secagg import wire
from secagg.errors import CodecError, ProtocolError
from secagg.machine import KEY_HOLDER, SERVER
from secagg.machine import Message as ProtocolMessage

log = logging.getLogger(__name__)


@dataclass
class Exchange:
    """Timing of one phase's exchange, for the round-latency breakdown."""

    round: int
    phase: str
    sent: int
    answered: int
    wall_s: float
    client_max_s: float
    server_s: float = 0.0
    bundle: int = 0  # the Flower exchange that carried it when rounds share exchanges (0: its own)


class GridTransport:
    """One Flower ``Grid`` exchange per protocol phase, with the phase timeout as the dropout deadline."""

    def __init__(self, grid: Grid, job: FlowerJob, nodes: Mapping[int, int]) -> None:
        self.grid = grid
        self.job = job
        self.nodes = dict(nodes)  # cid -> node id
        self.cids = {n: c for c, n in self.nodes.items()}
        self.log: list[Exchange] = []
        self.progress: Progress | None = None

    def exchange(
        self, round: int, phase: str, payloads: Mapping[int, dict[str, Any]], *, kind: str, timeout: float
    ) -> tuple[dict[int, Any], set[int]]:
        """Send one message per client; return the replies by client id and who failed (error reply)."""
        msgs = [
            Message(RecordDict({RECORD: ConfigRecord(p)}), dst_node_id=self.nodes[cid],
                    message_type=KEYHOLDER if cid == KEY_HOLDER else kind, group_id=str(round), ttl=timeout + 60.0)
            for cid, p in payloads.items()
        ]
        t0 = time.perf_counter()
        replies = send_and_receive(self.grid, msgs, timeout=timeout, poll=self.job.poll_interval)
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
                got[cid] = reply_record(r)
            except BadReplyError as exc:
                log.warning("round %d: dropping client %d, its %s reply was refused: %s", round, cid, phase, exc)
                failed.add(cid)
        client_s = max((compute_s(v) for v in got.values()), default=0.0)
        self.log.append(Exchange(round, phase, len(msgs), len(got), wall, client_s))
        if self.progress is not None:
            self.progress(event="phase", round=round, phase=phase, sent=sorted(payloads), answered=sorted(got))
        return got, failed


def send_and_receive(grid: Grid, msgs: Sequence[Message], *, timeout: float, poll: float) -> list[Message]:
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


class PhaseLink:
    """:class:`secagg.drive.Transport` over Flower for one round: one ``Grid`` exchange per call.

    It groups the outbox by client, numbers each client's protocol steps (binding its sealed state),
    turns the phase's deadline into the exchange timeout, and checks every reply before it reaches the
    server: a message must come from the client that sent the reply and go to the server or a member.
    A bad reply counts as no reply: its client is dropped, as at a missed deadline. ``extra``: other
    roles the transport has a node for (the Paillier key holder at ``KEY_HOLDER``): the server's messages
    to them go to that node (``query.privagg_keyholder``), and their replies are checked the same way.
    """

    def __init__(self, tr: GridTransport, *, round: int, session: bytes, final_phase: str,
                 planned: Sequence[int], members: Sequence[int], extra: Sequence[int] = (),
                 max_values: int = wire.MAX_STREAM_ITEMS) -> None:
        self.tr, self.round, self.session, self.final_phase = tr, round, session, final_phase
        self.planned = frozenset(planned)
        self.members = frozenset(members)
        self.alive = set(members) | set(extra)
        self.steps: dict[int, int] = {}  # protocol steps sent to each client this round
        self.sent = 0
        self.max_values = max_values  # bound on a streamed array in a reply (job.stream_bound of the spec)
        # a training round whose keys were agreed ahead: the masked-input phase also carries the model
        # (``extra[phase]()``, which may wait for the previous round) and its replies the training results
        self.extra: dict[str, Callable[[], Mapping[str, Any]]] = {}
        self.on_replies: Callable[[str, Mapping[int, Any]], None] | None = None

    def exchange(
        self, phase: str, outbox: Sequence[ProtocolMessage], *, deadline: float | None
    ) -> list[ProtocolMessage]:
        batch: dict[int, list[ProtocolMessage]] = {}
        for m in outbox:
            if m.recipient in self.alive:
                batch.setdefault(m.recipient, []).append(m)
            elif m.recipient != SERVER and m.recipient not in self.planned:
                raise ProtocolError(f"message for unknown party {m.recipient}: no SuperNode has that role")
        if not batch:
            return []
        extra = dict(self.extra[phase]()) if phase in self.extra else {}
        for cid in batch:
            self.steps[cid] = self.steps.get(cid, 0) + 1
        final = phase == self.final_phase
        payloads = {
            cid: {"round": self.round, "session": self.session, "final": final, "step": self.steps[cid],
                  **extra, **encode_msgs(ms)}
            for cid, ms in batch.items()
        }
        self.sent += sum(len(ms) for ms in batch.values())
        timeout = self.tr.job.phase_timeout if deadline is None else max(0.0, deadline - time.monotonic())
        if extra:  # the clients train in this phase
            timeout = max(timeout, self.tr.job.start_timeout)
        replies, _failed = self.tr.exchange(self.round, phase, payloads, kind=STEP, timeout=timeout)
        if self.on_replies is not None:
            self.on_replies(phase, replies)
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
                msgs = decode_msgs(rec, max_values=self.max_values)
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


class Progress:
    """Append-only JSON-lines log the ServerApp writes into ``out`` (tests and the CLI follow it)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "progress.jsonl"
        self.lock = threading.Lock()  # rounds in flight log from their own threads

    def __call__(self, **event: Any) -> None:
        line = json.dumps({"t": time.time(), **event}, default=str) + "\n"
        with self.lock, self.path.open("a") as fh:
            fh.write(line)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
