"""Driving a protocol: the one phase loop, over a small transport contract.

The machines are sans-IO (:mod:`secagg.machine`); something must move their messages and decide when a
phase is over. That is :func:`drive`, and every runner (in memory, Flower, a future gRPC or Ray one)
only provides a :class:`Transport`: a way to hand one phase's messages to the parties and stream their
replies back until the phase's deadline. Nothing else re-implements the phase loop.

The loop, for one round:

1. the server's opening messages (``server.start()``) and the parties' opening messages (``opening``:
   what each party's ``start()`` sent, collected by the runner when it opened the round) are routed;
2. while the server is not done: every message the parties send to :data:`~secagg.machine.SERVER` goes
   to ``server.receive`` *as it arrives* (a transport yields replies one by one, so a masked input is
   folded into the running sum before the next arrives); anything the server sends back mid-phase, and
   any party-to-party message the transport hands back for relaying, is delivered by another exchange
   *in the same phase*;
3. once a phase is quiet (nothing left to deliver), ``server.end_phase()`` closes it: whoever did not
   answer by then has dropped. Its messages open the next phase.

A per-phase deadline (``phase_timeout`` seconds from the phase's first exchange, on ``clock``) is passed to
every exchange of that phase; a transport returns when everyone answered or the deadline passed. A
protocol that neither finishes nor aborts within ``max_steps`` exchanges and phase ends raises
:class:`StuckProtocolError` instead of looping forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from numpy.typing import NDArray

from secagg.errors import CodecError, ProtocolError, SecAggError
from secagg.machine import SERVER, Message, ServerMachine

__all__ = ["REFUSALS", "DriveOutcome", "OnRefused", "PhaseStats", "StuckProtocolError", "Transport", "drive"]


class Transport(Protocol):
    """What a runner provides to :func:`drive`: one phase's delivery, with replies streamed back.

    ``exchange`` delivers ``outbox`` (messages from the server, or relayed between parties; each names
    its ``recipient``) to the live parties and yields what they send in reply, as it arrives, until all
    answered or ``deadline`` (an absolute time on the clock :func:`drive` was given; ``None``: no limit)
    passed. Replies addressed to :data:`~secagg.machine.SERVER` go to the server; any other reply is
    relayed by :func:`drive` in the same phase. Messages to a party the transport knows to have dropped
    are discarded; a party that refused or sent garbage is the transport's to drop (and log). A transport
    must never yield a message whose ``sender`` it has not authenticated as the party that sent it.
    """

    def exchange(self, phase: str, outbox: Sequence[Message], *, deadline: float | None) -> Iterable[Message]:
        """Deliver ``outbox`` in ``phase``; yield the parties' replies until quiet or ``deadline``."""
        ...


class StuckProtocolError(SecAggError, RuntimeError):
    """The protocol neither finished nor aborted within the step limit: a machine is not advancing.

    This is a bug in a machine (or a transport that keeps replaying messages), never a dropout; raise
    ``max_steps`` only if a protocol legitimately needs more exchanges per phase.
    """


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """What happened in one phase: exchanges made, messages each way, server compute seconds."""

    phase: str
    exchanges: int = 0
    sent: int = 0
    received: int = 0
    server_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DriveOutcome:
    """The result of a driven round: the sum, who is in it, and per-phase traffic."""

    total: NDArray[Any]
    included: tuple[int, ...]
    phases: tuple[PhaseStats, ...]

    @property
    def sent(self) -> int:
        """Messages handed to the transport (from the server, and relayed between parties)."""
        return sum(p.sent for p in self.phases)

    @property
    def received(self) -> int:
        """Messages the transport yielded back (addressed to the server or relayed)."""
        return sum(p.received for p in self.phases)

    @property
    def messages(self) -> int:
        return self.sent + self.received


class _Phases:
    """Per-phase counters, kept mutable while driving and frozen into :class:`PhaseStats` at the end."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = {}

    def add(self, phase: str, **counts: float) -> None:
        row = self.stats.setdefault(phase, {"exchanges": 0, "sent": 0, "received": 0, "server_s": 0.0})
        for k, v in counts.items():
            row[k] += v

    def frozen(self) -> tuple[PhaseStats, ...]:
        return tuple(
            PhaseStats(p, int(r["exchanges"]), int(r["sent"]), int(r["received"]), float(r["server_s"]))
            for p, r in self.stats.items()
        )


def _timeout_of(phase_timeout: float | Mapping[str, float] | None, phase: str) -> float | None:
    if phase_timeout is None or isinstance(phase_timeout, (int, float)):
        return phase_timeout
    return phase_timeout.get(phase)


REFUSALS: tuple[type[Exception], ...] = (ProtocolError, CodecError, KeyError, TypeError, ValueError)
"""What ``server.receive`` raises for a bad message; with ``on_refused`` these drop the sender, not the round."""

OnRefused = Callable[[Message, Exception], None]


def _receive(server: ServerMachine, msg: Message, on_refused: OnRefused | None) -> list[Message]:
    if on_refused is None:
        return server.receive(msg)
    try:
        return server.receive(msg)
    except REFUSALS as exc:
        on_refused(msg, exc)
        return []


def _route(server: ServerMachine, inbox: Iterable[Message], outbox: list[Message], stats: _Phases,
           clock: Callable[[], float], on_refused: OnRefused | None) -> None:
    """Feed each arriving message to the server (or queue it for relaying); collect what the server sends."""
    phase = server.phase
    received, busy = 0, 0.0
    for msg in inbox:  # consumed lazily: the transport may still be delivering the rest
        received += 1
        if msg.recipient == SERVER:
            t0 = clock()
            outbox.extend(_receive(server, msg, on_refused))
            busy += clock() - t0
        else:
            outbox.append(msg)
    stats.add(phase, received=received, server_s=busy)


def drive(
    server: ServerMachine,
    transport: Transport,
    *,
    opening: Iterable[Message] = (),
    phase_timeout: float | Mapping[str, float] | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_steps: int | None = None,
    on_refused: OnRefused | None = None,
) -> DriveOutcome:
    """Run ``server``'s round to the end over ``transport``; return the sum and who is in it.

    ``opening``: the messages the parties sent when the round opened (their ``start()``), already
    collected by the runner. ``phase_timeout``: seconds each phase may take (one number, or per phase
    name; ``None``: no deadline). ``max_steps`` bounds exchanges plus phase ends (default
    ``10 * (len(phases) + 2)``). ``on_refused``: where a message the server refuses (one of
    :data:`REFUSALS`) goes -- a network transport drops its sender there, as at a missed deadline; ``None``
    (in memory, tests): the error propagates. Raises ``AbortError`` from the server when too few parties answer a
    phase, and :class:`StuckProtocolError` when the server neither finishes nor aborts.
    """
    limit = max_steps if max_steps is not None else 10 * (len(server.phases) + 2)
    stats = _Phases()
    outbox: list[Message] = []
    t0 = clock()
    outbox.extend(server.start())
    stats.add(server.phase, server_s=clock() - t0)
    _route(server, opening, outbox, stats, clock, on_refused)
    deadline_of: dict[str, float | None] = {}
    steps = 0
    while not server.done:
        steps += 1
        if steps > limit:
            raise StuckProtocolError(
                f"protocol did not finish after {steps - 1} steps (stuck in phase {server.phase!r}); "
                "a machine is not advancing, or raise max_steps if it legitimately needs more exchanges"
            )
        phase = server.phase
        if not outbox:  # quiet: the phase is over, whoever has not answered has dropped
            t0 = clock()
            outbox.extend(server.end_phase())
            stats.add(phase, server_s=clock() - t0)
            continue
        if phase not in deadline_of:
            timeout = _timeout_of(phase_timeout, phase)
            deadline_of[phase] = None if timeout is None else clock() + timeout
        batch, outbox = outbox, []
        stats.add(phase, exchanges=1, sent=len(batch))
        _route(server, transport.exchange(phase, batch, deadline=deadline_of[phase]), outbox, stats, clock,
               on_refused)
    result = server.result
    if result is None:
        raise StuckProtocolError(f"server reports done but has no result (phase {server.phase!r})")
    return DriveOutcome(result, tuple(server.included), stats.frozen())
