"""The in-memory runner: routes messages between protocol machines, with dropouts and reordering.

Time does not exist here: a phase ends when every live party has answered, and a client that "drops at
phase p" simply stops sending from phase p on (its messages of that phase are lost, and messages to it
are not delivered). This is how tests drive every dropout pattern deterministically.

Replies to the server are delivered as soon as a party sends them (streaming): a masked input goes into
the server's running sum before the next client masks, so a round holds O(d) of masked data, not O(n d)
(delivery order within a phase is shuffled by ``reorder`` through the order the parties answer in).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.spec import SecureSum, ValueSpec
from secagg.errors import ProtocolError
from secagg.machine import ClientMachine, Message

__all__ = ["DropoutSchedule", "SumOutcome", "run_secure_sum"]

log = logging.getLogger(__name__)


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
        cls, cids: Sequence[int], rate: float, rng: np.random.Generator, *, phases: int | None = None
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


def _shuffled(msgs: list[Message], rng: np.random.Generator | None) -> list[Message]:
    if rng is None or len(msgs) < 2:
        return msgs
    return [msgs[i] for i in rng.permutation(len(msgs))]


def run_secure_sum(
    ssum: SecureSum,
    values: Mapping[int, NDArray[Any]],
    *,
    spec: ValueSpec,
    session: bytes,
    round: int = 0,
    dropouts: DropoutSchedule | None = None,
    reorder: np.random.Generator | None = None,
) -> SumOutcome:
    """Run one round of ``ssum`` over ``values`` (client id -> encoded vector) entirely in memory.

    ``reorder`` shuffles message delivery within each phase (order must never matter). A client that
    refuses a request (raises ``ProtocolError``) is logged and treated as dropped from then on.
    Raises ``AbortError`` (from the server machine) when too few clients survive a phase.
    """
    dropouts = dropouts or DropoutSchedule.none()
    cids = sorted(values)
    server = ssum.server(cids, spec=spec, session=session, round=round)
    parties: dict[int, ClientMachine] = {
        cid: ssum.client(cid, values[cid], spec=spec, session=session, round=round) for cid in cids
    }
    extra = dict(ssum.parties(spec=spec, session=session, round=round))
    parties.update(extra)
    phases = server.phases
    refused: set[int] = set()
    count = 0

    def alive(pid: int) -> bool:
        if pid in extra:
            return True
        idx = phases.index(server.phase) if server.phase in phases else len(phases)
        return pid not in refused and dropouts.alive(pid, idx, phases)

    to_parties: list[Message] = list(server.start())
    to_server: list[Message] = []
    for pid in sorted(parties):
        if alive(pid):
            to_server += parties[pid].start()

    guard = 0
    while not server.done:
        guard += 1
        if guard > 10 * (len(phases) + 2):
            raise RuntimeError(f"protocol did not finish after {guard} steps (stuck in {server.phase!r})")
        # Messages between parties (e.g. to a key holder) and from the server are delivered until quiet.
        while to_parties:
            batch, to_parties = _shuffled(to_parties, reorder), []
            for msg in batch:
                count += 1
                if msg.recipient not in parties or not alive(msg.recipient):
                    continue
                try:
                    replies = parties[msg.recipient].receive(msg)
                except ProtocolError as exc:
                    log.warning("party %d refused a message: %s", msg.recipient, exc)
                    refused.add(msg.recipient)
                    continue
                for r in replies:
                    if r.recipient in parties:
                        to_parties.append(r)
                    else:  # streamed: the server folds a masked input into its running sum at once
                        count += 1
                        if alive(r.sender):
                            to_parties += server.receive(r)
        for msg in _shuffled(to_server, reorder):
            count += 1
            if msg.sender in parties and not alive(msg.sender):
                continue
            to_parties += server.receive(msg)
        to_server = []
        if not to_parties or not any(alive(m.recipient) for m in to_parties if m.recipient in parties):
            to_parties += server.end_phase()
    assert server.result is not None
    return SumOutcome(server.result, tuple(server.included), count, tuple(sorted(refused)))
