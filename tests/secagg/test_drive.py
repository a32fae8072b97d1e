"""The one phase loop (:func:`secagg.drive.drive`) against toy machines and scripted transports.

Each test plays what a transport or a faulty machine can do to the loop -- stream replies, answer
mid-phase, relay party-to-party traffic, send a message the server refuses, never finish -- and checks
the loop's stated behaviour. No ``fl`` import: protocol driving is secagg's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from secagg.drive import DriveOutcome, StuckProtocolError, Transport, drive
from secagg.errors import AbortError, ProtocolError
from secagg.machine import SERVER, Message
from secagg.memory import DropoutSchedule, InMemoryTransport, run_in_memory
from secagg.plain import PlainClient, PlainInput, PlainServer

S = b"drive-test"


@dataclass(frozen=True, slots=True)
class Note:
    sender: int
    recipient: int
    text: str


@dataclass
class EchoServer:
    """Two phases. In ``ask`` each client's first note makes the server ask it once more, mid-phase."""

    cids: Sequence[int]
    log: list[str] = field(default_factory=list)
    _phase: int = 0
    _done: bool = False
    _got: dict[int, list[str]] = field(default_factory=dict)

    @property
    def phases(self) -> tuple[str, ...]:
        return ("ask", "finish")

    @property
    def phase(self) -> str:
        return self.phases[self._phase]

    @property
    def done(self) -> bool:
        return self._done

    @property
    def result(self) -> np.ndarray | None:
        return np.array([len(v) for _, v in sorted(self._got.items())], dtype=np.uint64) if self._done else None

    @property
    def included(self) -> tuple[int, ...]:
        return tuple(sorted(self._got))

    def start(self) -> list[Message]:
        return [Note(SERVER, c, "hello") for c in self.cids]

    def receive(self, msg: Message) -> list[Message]:
        assert isinstance(msg, Note)
        if msg.text == "bad":
            raise ProtocolError(f"client {msg.sender} sent a bad note")
        self.log.append(f"{self.phase}:{msg.sender}:{msg.text}")
        notes = self._got.setdefault(msg.sender, [])
        notes.append(msg.text)
        return [Note(SERVER, msg.sender, "again")] if self.phase == "ask" and len(notes) == 1 else []

    def end_phase(self) -> list[Message]:
        self.log.append(f"end:{self.phase}")
        if self._phase == 0:
            self._phase = 1
            return [Note(SERVER, c, "last") for c in self._got]
        self._done = True
        return []


@dataclass
class EchoClient:
    cid: int
    bad: bool = False

    def start(self) -> list[Message]:
        return []

    def receive(self, msg: Message) -> list[Message]:
        assert isinstance(msg, Note)
        return [Note(self.cid, SERVER, "bad" if self.bad else f"re-{msg.text}")]


class Scripted:
    """A transport that records each exchange (phase, recipients, deadline) and answers with echo clients."""

    def __init__(self, clients: dict[int, EchoClient]) -> None:
        self.clients = clients
        self.calls: list[tuple[str, tuple[int, ...], float | None]] = []

    def exchange(self, phase: str, outbox: Sequence[Message], *, deadline: float | None) -> Iterator[Message]:
        self.calls.append((phase, tuple(sorted(m.recipient for m in outbox)), deadline))
        for m in outbox:
            if m.recipient in self.clients:
                yield from self.clients[m.recipient].receive(m)


def test_mid_phase_server_messages_are_delivered_in_the_same_phase_before_it_ends() -> None:
    server = EchoServer([0, 1, 2])
    tr = Scripted({c: EchoClient(c) for c in range(3)})
    out = drive(server, tr)
    assert isinstance(out, DriveOutcome)
    # ask: hello to all, then the mid-phase "again" to all, both in phase "ask"; finish: "last"
    assert [c[0] for c in tr.calls] == ["ask", "ask", "finish"]
    assert server.log.index("end:ask") == 6, "the phase ended before its mid-phase replies arrived"
    assert out.total.tolist() == [3, 3, 3]
    assert [(p.phase, p.exchanges, p.sent, p.received) for p in out.phases] == [("ask", 2, 6, 6), ("finish", 1, 3, 3)]
    assert out.messages == 18


def test_each_phase_gets_one_deadline_from_its_first_exchange() -> None:
    now = [100.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    tr = Scripted({c: EchoClient(c) for c in range(2)})
    drive(EchoServer([0, 1]), tr, phase_timeout={"ask": 10.0, "finish": 3.0}, clock=clock)
    (p1, _, d1), (p2, _, d2), (p3, _, d3) = tr.calls
    assert (p1, p2, p3) == ("ask", "ask", "finish")
    assert d1 == d2, "a later exchange of the same phase got a fresh deadline"
    assert d1 is not None and d3 is not None and d3 > d1
    assert d3 - d1 < 10.0, "the finish phase must use its own, shorter timeout"
    tr2 = Scripted({c: EchoClient(c) for c in range(2)})
    drive(EchoServer([0, 1]), tr2)
    assert {d for *_, d in tr2.calls} == {None}


def test_replies_are_streamed_into_the_server_before_the_next_one_is_produced() -> None:
    server = EchoServer([0, 1, 2])

    class Streaming:
        def exchange(self, phase: str, outbox: Sequence[Message], *, deadline: float | None) -> Iterator[Message]:
            before = len(server.log)
            for k, m in enumerate(outbox):
                assert len(server.log) == before + k, "drive buffered a reply instead of folding it in at once"
                yield Note(m.recipient, SERVER, "re")

    drive(server, Streaming())
    plain = PlainServer([0, 1, 2], size=2, session=S, round=0)

    def opening() -> Iterator[Message]:  # the opening is consumed the same way, one message at a time
        for c in range(3):
            assert len(plain._values) == c
            yield PlainInput(c, SERVER, S, 0, np.full(2, float(c)))

    assert drive(plain, Streaming(), opening=opening()).total.tolist() == [3.0, 3.0]


def test_party_to_party_replies_are_relayed_in_the_same_phase() -> None:
    class Relay:
        def __init__(self) -> None:
            self.calls: list[tuple[str, list[int]]] = []

        def exchange(self, phase: str, outbox: Sequence[Message], *, deadline: float | None) -> Iterator[Message]:
            self.calls.append((phase, [m.recipient for m in outbox]))
            for m in outbox:
                if m.recipient == 0 and isinstance(m, Note) and m.text == "hello":
                    yield Note(0, 1, "peer")  # client 0 writes to client 1; drive must relay it
                elif m.recipient == 1 and isinstance(m, Note) and m.text == "peer":
                    yield Note(1, SERVER, "from-peer")
                elif isinstance(m, Note) and m.recipient in (0, 1):
                    yield Note(m.recipient, SERVER, "re")

    server = EchoServer([0, 1])
    tr = Relay()
    drive(server, tr)
    assert tr.calls[0] == ("ask", [0, 1])
    assert tr.calls[1] == ("ask", [1, 1]), "the relayed note must go out with the same phase's next exchange"
    assert "ask:1:from-peer" in server.log
    assert server.log.index("ask:1:from-peer") < server.log.index("end:ask")


def test_a_refused_message_drops_its_sender_with_on_refused_and_raises_without() -> None:
    clients = {0: EchoClient(0), 1: EchoClient(1, bad=True), 2: EchoClient(2)}
    with pytest.raises(ProtocolError, match="client 1 sent a bad note"):
        drive(EchoServer([0, 1, 2]), Scripted(clients))
    refused: list[tuple[int, str]] = []
    out = drive(EchoServer([0, 1, 2]), Scripted(clients), on_refused=lambda m, e: refused.append((m.sender, str(e))))
    assert refused and {s for s, _ in refused} == {1}
    assert out.included == (0, 2)


def test_a_protocol_that_never_finishes_raises_instead_of_looping() -> None:
    class Forever(EchoServer):
        def end_phase(self) -> list[Message]:
            return [Note(SERVER, c, "more") for c in self.cids]  # never done

    tr = Scripted({0: EchoClient(0)})
    with pytest.raises(StuckProtocolError, match="did not finish after 12 steps"):
        drive(Forever([0]), tr, max_steps=12)
    assert len(tr.calls) <= 12
    with pytest.raises(RuntimeError):  # StuckProtocolError is a RuntimeError, as the old loops raised
        drive(Forever([0]), Scripted({0: EchoClient(0)}))


def test_an_abort_below_threshold_propagates() -> None:
    server = PlainServer([0, 1, 2], size=1, session=S, round=0, min_clients=3)
    parties = {c: PlainClient(c, np.ones(1), S, 0) for c in range(3)}
    with pytest.raises(AbortError):
        run_in_memory(server, parties, dropouts=DropoutSchedule({2: 0}))


def test_in_memory_transport_satisfies_the_contract_and_sums() -> None:
    parties = {c: PlainClient(c, np.full(3, float(c)), S, 0) for c in range(4)}
    server = PlainServer(list(range(4)), size=3, session=S, round=0)
    tr: Transport = InMemoryTransport(parties, server.phases)
    assert isinstance(tr, InMemoryTransport)
    out = run_in_memory(PlainServer(list(range(4)), size=3, session=S, round=0), parties,
                        reorder=np.random.default_rng(3), dropouts=DropoutSchedule({3: 0}))
    assert out.total.tolist() == [3.0, 3.0, 3.0]
    assert out.included == (0, 1, 2)
