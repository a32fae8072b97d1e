"""The in-memory transport: routes messages between machines in one process, with dropouts and reordering.

Time does not exist here: a phase ends when every live party has answered, and a client that "drops at
phase p" simply stops sending from phase p on (its messages of that phase are lost, and messages to it
are not delivered). This is how tests drive every dropout pattern deterministically.

Replies to the server are yielded as soon as a party sends them (streaming): :func:`secagg.drive.drive`
folds a masked input into the server's running sum before the next client masks, so a round holds O(d)
of masked data, not O(n d). ``reorder`` shuffles delivery within each phase (order must never matter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from numpy.typing import NDArray

from secagg.drive import drive
from secagg.errors import ProtocolError
from secagg.machine import SERVER, ClientMachine, Message, ServerMachine

__all__ = ["DropoutSchedule", "InMemoryTransport", "Shuffler", "SumOutcome", "run_in_memory"]

log = logging.getLogger(__name__)


class Shuffler(Protocol):
    """A test seam for delivery order and dropout draws (e.g. a seeded ``numpy`` Generator).

    Order and dropouts are the adversary's to choose, never secrets, so any source will do here;
    keys, masks and noise never come from it.
    """

    def permutation(self, n: int, /) -> Any: ...

    def random(self) -> float: ...

    def integers(self, high: int, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class DropoutSchedule:
    """Which client goes silent at which phase: ``{cid: phase}``, the phase as a name or an index.

    A client dropping at phase ``p`` sends nothing from phase ``p`` on. Phase 0 is the first phase, so
    ``{3: 0}`` means client 3 never takes part; dropping at the last phase means after sending its input.
    """

    drops: Mapping[int, str | int] = field(default_factory=dict)

    @classmethod
    def none(cls) -> DropoutSchedule:
        return cls({})

    @classmethod
    def random(
        cls, cids: Sequence[int], rate: float, rng: Shuffler, *, phases: int | None = None
    ) -> DropoutSchedule:
        """Each client drops with probability ``rate``, at a uniformly chosen phase (or phase 0)."""
        drops: dict[int, str | int] = {}
        for cid in cids:
            if rng.random() < rate:
                drops[cid] = int(rng.integers(phases)) if phases else 0
        return cls(drops)

    def alive(self, cid: int, phase_index: int, phases: Sequence[str]) -> bool:
        at = self.drops.get(cid)
        if at is None:
            return True
        idx = phases.index(at) if isinstance(at, str) else min(int(at), len(phases) - 1)
        return phase_index < idx


@dataclass(frozen=True, slots=True)
class SumOutcome:
    """The result of one secure sum: the total, who is in it, and traffic counts."""

    total: NDArray[Any]
    included: tuple[int, ...]
    messages: int
    refused: tuple[int, ...] = ()


def _shuffled(msgs: Sequence[Message], rng: Shuffler | None) -> list[Message]:
    if rng is None or len(msgs) < 2:
        return list(msgs)
    return [msgs[i] for i in rng.permutation(len(msgs))]


class InMemoryTransport:
    """A :class:`secagg.drive.Transport` over machines in this process.

    A party that refuses a message (raises ``ProtocolError``) is logged and treated as dropped from then
    on. Party-to-party messages (e.g. to a key holder) are delivered here, within the exchange, until
    quiet; only replies addressed to the server are yielded.
    """

    def __init__(
        self,
        parties: Mapping[int, ClientMachine],
        phases: Sequence[str],
        *,
        dropouts: DropoutSchedule | None = None,
        reorder: Shuffler | None = None,
    ) -> None:
        self.parties = dict(parties)
        self.phases = tuple(phases)
        self.dropouts = dropouts or DropoutSchedule.none()
        self.reorder = reorder
        self.refused: set[int] = set()
        self.delivered = 0  # every message handed to a party or yielded to the server, dropped ones too

    def alive(self, pid: int, phase: str) -> bool:
        """Whether ``pid`` still takes part in ``phase`` (not refused, not dropped by the schedule)."""
        idx = self.phases.index(phase) if phase in self.phases else len(self.phases)
        return pid not in self.refused and self.dropouts.alive(pid, idx, self.phases)

    def open(self, phase: str) -> list[Message]:
        """Start every live party's machine; return their opening messages, shuffled by ``reorder``."""
        out: list[Message] = []
        for pid in sorted(self.parties):
            if self.alive(pid, phase):
                out += self.parties[pid].start()
        self.delivered += len(out)
        return _shuffled(out, self.reorder)

    def exchange(self, phase: str, outbox: Sequence[Message], *, deadline: float | None) -> Iterator[Message]:
        """Deliver ``outbox`` to live parties; yield each reply to the server as it is sent."""
        del deadline  # no clock in memory: a phase ends when every live party has answered
        pending = list(outbox)
        while pending:
            batch, pending = _shuffled(pending, self.reorder), []
            for msg in batch:
                for reply in self._deliver(msg, phase):
                    if reply.recipient in self.parties and reply.recipient != SERVER:
                        pending.append(reply)
                    else:
                        self.delivered += 1
                        if self.alive(reply.sender, phase):
                            yield reply

    def _deliver(self, msg: Message, phase: str) -> list[Message]:
        self.delivered += 1
        if msg.recipient not in self.parties or not self.alive(msg.recipient, phase):
            return []
        try:
            return self.parties[msg.recipient].receive(msg)
        except ProtocolError as exc:
            log.warning("party %d refused a message: %s", msg.recipient, exc)
            self.refused.add(msg.recipient)
            return []


def run_in_memory(
    server: ServerMachine,
    parties: Mapping[int, ClientMachine],
    *,
    dropouts: DropoutSchedule | None = None,
    reorder: Shuffler | None = None,
) -> SumOutcome:
    """Run one round of ``server`` with ``parties`` (clients and any extra roles, by address) in memory.

    ``dropouts`` silences clients from a phase on; ``reorder`` shuffles delivery within each phase. A
    party that refuses a request is logged and treated as dropped from then on. Raises ``AbortError``
    (from the server machine) when too few clients survive a phase.
    """
    transport = InMemoryTransport(parties, server.phases, dropouts=dropouts, reorder=reorder)
    opening = transport.open(server.phase)
    outcome = drive(server, transport, opening=opening)
    return SumOutcome(outcome.total, outcome.included, transport.delivered, tuple(sorted(transport.refused)))
