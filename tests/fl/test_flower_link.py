"""The Flower runner's secagg.drive transport (``PhaseLink``) against a scripted grid: no Flower processes.

It plays a client whose reply claims to come from someone else, or addresses a party outside the round,
and checks that the link drops that client (as at a missed deadline) instead of passing the message on;
and that steps, the final flag and the phase deadline reach the exchange as the client side expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl.runners.flower.link import PhaseLink
from secagg import wire
from secagg.drive import drive
from secagg.machine import SERVER
from secagg.plain import PlainInput, PlainServer

S = b"link-test"


@dataclass
class _Job:
    phase_timeout: float = 30.0


@dataclass
class FakeTransport:
    """Stands in for ``_Transport``: records each exchange, answers from a script of reply records."""

    replies: Mapping[int, dict[str, Any]]
    job: _Job = field(default_factory=_Job)
    calls: list[tuple[str, dict[int, dict[str, Any]], float]] = field(default_factory=list)

    def exchange(self, round: int, phase: str, payloads: Mapping[int, dict[str, Any]], *, kind: str,
                 timeout: float) -> tuple[dict[int, Any], set[int]]:
        self.calls.append((phase, dict(payloads), timeout))
        return {c: self.replies[c] for c in payloads if c in self.replies}, set()


def _rec(*msgs: Any) -> dict[str, Any]:
    return {"msgs": [wire.dumps(m) for m in msgs]}


def _input(sender: int, value: float) -> PlainInput:
    return PlainInput(sender, SERVER, S, 1, np.full(2, value))


def test_a_reply_claiming_another_sender_drops_the_client() -> None:
    tr = FakeTransport({})
    link = PhaseLink(tr, round=1, session=S, final_phase="input", planned=[0, 1, 2], members=[0, 1, 2])  # type: ignore[arg-type]
    opened = {0: _rec(_input(0, 1.0)), 1: _rec(_input(2, 5.0)), 2: _rec(_input(2, 2.0))}
    msgs = link.checked(opened)
    assert [m.sender for m in msgs] == [0, 2], "client 1's forged message reached the server"
    assert link.alive == {0, 2}
    out = drive(PlainServer([0, 1, 2], size=2, session=S, round=1), link, opening=msgs)
    assert out.included == (0, 2) and out.total.tolist() == [3.0, 3.0]


def test_a_message_for_a_party_outside_the_round_drops_its_sender() -> None:
    tr = FakeTransport({})
    link = PhaseLink(tr, round=1, session=S, final_phase="input", planned=[0, 1], members=[0, 1])  # type: ignore[arg-type]
    stray = PlainInput(1, 7, S, 1, np.zeros(2))
    assert [m.sender for m in link.checked({0: _rec(_input(0, 1.0)), 1: _rec(stray)})] == [0]
    assert link.alive == {0}
    with pytest.raises(Exception, match="unknown party 9"):
        link.exchange("input", [PlainInput(SERVER, 9, S, 1, np.zeros(2))], deadline=None)


def test_steps_final_flag_and_deadline_reach_the_clients() -> None:
    import time

    tr = FakeTransport({0: _rec(), 1: {"msgs": "not a list"}})
    link = PhaseLink(tr, round=4, session=S, final_phase="unmask", planned=[0, 1], members=[0, 1])  # type: ignore[arg-type]
    ask = [PlainInput(SERVER, c, S, 4, np.zeros(1)) for c in (0, 1)]
    assert link.exchange("share", ask, deadline=time.monotonic() + 5.0) == []
    assert link.alive == {0}, "a garbled reply must drop its client"
    link.exchange("unmask", ask[:1], deadline=None)
    (p1, pay1, t1), (p2, pay2, t2) = tr.calls
    assert (p1, p2) == ("share", "unmask")
    assert pay1[0]["step"] == 1 and pay2[0]["step"] == 2 and set(pay2) == {0}
    assert pay1[0]["final"] is False and pay2[0]["final"] is True
    assert 0 < t1 <= 5.0 and t2 == 30.0
