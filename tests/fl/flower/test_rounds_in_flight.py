"""Rounds in flight (:mod:`fl.runners.flower.pipeline`): a sum job's rounds share Flower exchanges.

Played against the real ServerApp (``serve``) and the real ClientApp over :class:`InProcessGrid`: R rounds
of SecAgg+ take R + 3 exchanges instead of 4R, every sum stays exact, a node that dies mid-pipeline costs
only the rounds the protocol cannot finish, and a malicious ServerApp cannot use a bundle to get more from a
node than R sequential rounds would give it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict

from fl.runners.flower import FlowerJob
from fl.runners.flower.job import BUNDLE, BUNDLE_RECORD, START, JobError, part_key
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from fl.runners.flower.state import slot
from tests.adversary.flower_harness import InProcessGrid, deliver, instruction, node_context, server_identity


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _job(tmp_path: Path, *, rounds: int, in_flight: int, protocol: str = "secagg+") -> FlowerJob:
    return FlowerJob(task="sum", out=str(tmp_path / f"out-{in_flight}"), clients=3, size=50, rounds=rounds,
                     protocol=protocol, threshold=0.6, join_timeout=5, start_timeout=60, phase_timeout=60,
                     poll_interval=0.0, rounds_in_flight=in_flight)


def _contexts(tmp_path: Path, job: FlowerJob) -> dict[int, Any]:
    return {100 + c: node_context(tmp_path, 100 + c, c, job.num_clients, job.to_json()) for c in range(3)}


class DyingGrid(InProcessGrid):
    """A node that stops answering (no reply at all: its SuperNode died) after ``after`` bundles to it."""

    def __init__(self, contexts: Any, *, node: int, after: int) -> None:
        super().__init__(contexts)
        self.node, self.after, self.seen = node, after, 0

    def push_messages(self, msgs: Iterable[Message]) -> list[str]:
        msgs = list(msgs)
        keep = []
        for m in msgs:
            if m.metadata.dst_node_id == self.node and m.metadata.message_type == BUNDLE:
                self.seen += 1
                if self.seen > self.after:
                    continue
            keep.append(m)
        ids = super().push_messages(keep)
        return ids + [f"lost{i}" for i in range(len(msgs) - len(keep))]


def _bundles(result: dict[str, Any]) -> int:
    return len({e["bundle"] for e in result["exchanges"]})


@pytest.mark.parametrize("rounds", [1, 2, 6])
def test_r_rounds_take_r_plus_3_exchanges_and_every_sum_is_exact(tmp_path: Path, rounds: int) -> None:
    job = _job(tmp_path, rounds=rounds, in_flight=4)
    grid = InProcessGrid(_contexts(tmp_path, job))
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert [r["round"] for r in result["rounds"]] == list(range(1, rounds + 1))
    assert all(r["exact"] and r["included"] == 3 for r in result["rounds"])
    assert _bundles(result) == rounds + 3
    assert grid.sent == 3 * (1 + rounds + 3)  # the hello, then one bundle per node per exchange
    assert len(result["exchanges"]) == 4 * rounds  # each round still ran its own four phases


def test_sequential_rounds_take_four_exchanges_each(tmp_path: Path) -> None:
    job = _job(tmp_path, rounds=3, in_flight=1)
    grid = InProcessGrid(_contexts(tmp_path, job))
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert all(r["exact"] for r in result["rounds"])
    assert grid.sent == 3 * (1 + 4 * 3)


@pytest.mark.parametrize("after", [1, 2, 3, 4, 5])
def test_a_node_dying_mid_pipeline_costs_only_what_the_protocol_cannot_finish(tmp_path: Path, after: int) -> None:
    """3 clients, t = 2; round r's phases ride bundles r..r+3 (keys, shares, masked input, unmask). A node
    that answers bundles 1..``after`` only is, per round, exactly what a sequential run makes of it: in the
    sum once it sent its masked input; dropped (the sum of the two others) if it advertised keys but sent no
    input; and a round it never joined aborts, because the honest nodes refuse a cohort below the planned 3."""
    job = _job(tmp_path, rounds=6, in_flight=4)
    grid = DyingGrid(_contexts(tmp_path, job), node=102, after=after)
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    for r in result["rounds"]:
        n = r["round"]
        if n + 2 <= after:
            assert r["exact"] and r["included_ids"] == [0, 1, 2], r
        elif n <= after:
            assert r["exact"] and r["included_ids"] == [0, 1], r
        else:
            assert "aborted" in r, r
    assert [r["round"] for r in result["rounds"]] == list(range(1, 7))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(2, 4), rounds=st.integers(1, 5), dying=st.integers(0, 2), after=st.integers(0, 9))
def test_any_death_in_any_pipeline_gives_exact_sums_of_exactly_who_sent_an_input(
        tmp_path_factory: pytest.TempPathFactory, depth: int, rounds: int, dying: int, after: int) -> None:
    """Property: whatever the depth, the rounds and when which node dies, every round is exact or aborted,
    and the dying node is in a round's sum exactly when it answered that round's masked-input exchange."""
    tmp = tmp_path_factory.mktemp("p")
    job = _job(tmp, rounds=rounds, in_flight=depth)
    result = serve(DyingGrid(_contexts(tmp, job), node=100 + dying, after=after), job,  # type: ignore[arg-type]
                   Progress(Path(job.out)))
    masked_at = {e["round"]: e["bundle"] for e in result["exchanges"] if e["phase"] == "masked"}
    assert [r["round"] for r in result["rounds"]] == list(range(1, rounds + 1))
    for r in result["rounds"]:
        assert r.get("exact") is True or "aborted" in r, r
        if r.get("exact"):
            assert (dying in r["included_ids"]) == (masked_at[r["round"]] <= after), (r, masked_at)


def test_jobs_that_cannot_pipeline_are_refused() -> None:
    with pytest.raises(JobError, match="training round"):
        FlowerJob(task="train", rounds_in_flight=3)
    with pytest.raises(JobError, match="SecAgg"):
        FlowerJob(task="sum", protocol="paillier", rounds_in_flight=2)
    for bad in (0, 5, True, 2.0):
        with pytest.raises(JobError, match="rounds_in_flight"):
            FlowerJob(task="sum", rounds_in_flight=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ a malicious ServerApp
def _bundle(node: int, parts: Sequence[tuple[str, dict[str, Any]]], *, rounds: Sequence[int] | None = None) -> Message:
    content = RecordDict({BUNDLE_RECORD: ConfigRecord({"kinds": [k for k, _ in parts],
                                                       "rounds": list(rounds or [p["round"] for _, p in parts])})})
    for i, (_, fields) in enumerate(parts):
        content[part_key(i)] = ConfigRecord(dict(fields))
    msg = Message(content, dst_node_id=node, message_type=BUNDLE, group_id="1")
    msg.metadata.__dict__["_message_id"] = "b1"
    return msg


def _start(r: int) -> tuple[str, dict[str, Any]]:
    return "start", {"round": r, "session": bytes([r]) * 16}


@pytest.mark.parametrize("case", ["too many parts", "one round twice", "index names another round"])
def test_a_malformed_bundle_is_refused_whole(tmp_path: Path, case: str) -> None:
    job = _job(tmp_path, rounds=8, in_flight=4)
    ctx = _contexts(tmp_path, job)[100]
    parts = {"too many parts": [_start(r) for r in range(1, 6)],
             "one round twice": [_start(1), ("step", {**_start(1)[1], "step": 1, "final": False})],
             "index names another round": [_start(1), _start(2)]}[case]
    rounds = [1, 3] if case == "index names another round" else None
    reply = deliver(_bundle(100, parts, rounds=rounds), ctx)
    assert reply.has_error() and "JobError" in str(reply.error.reason)
    assert slot(1) not in ctx.state, "the node started a round from a bundle it refused"


def test_a_bundle_cannot_replay_a_round_the_node_already_started(tmp_path: Path) -> None:
    job = _job(tmp_path, rounds=8, in_flight=4)
    ctx = _contexts(tmp_path, job)[100]
    first = deliver(_bundle(100, [_start(1), _start(2)]), ctx)
    assert not first.has_error()
    assert "error" not in first.content[part_key(0)] and "error" not in first.content[part_key(1)]
    again = deliver(_bundle(100, [_start(2), _start(3)]), ctx)
    assert "already contributed" in str(again.content[part_key(0)]["error"])
    assert "error" not in again.content[part_key(1)]  # round 3 is new: only the replayed part is refused
    lone = deliver(instruction(100, START, {"round": 3, "session": bytes(16)}), ctx)
    assert lone.has_error() and "already contributed" in str(lone.error.reason)


def test_a_round_four_later_takes_the_slot_and_the_old_round_cannot_continue(tmp_path: Path) -> None:
    """A node keeps at most four machines; a server that opens round r+4 while r is in flight loses r there."""
    job = _job(tmp_path, rounds=8, in_flight=4)
    ctx = _contexts(tmp_path, job)[100]
    deliver(_bundle(100, [_start(1)]), ctx)
    assert ctx.state[slot(1)]["round"] == 1
    deliver(_bundle(100, [_start(5)]), ctx)
    assert slot(5) == slot(1) and ctx.state[slot(1)]["round"] == 5
    step = ("step", {"round": 1, "session": bytes([1]) * 16, "step": 1, "final": False})
    reply = deliver(_bundle(100, [step]), ctx)
    assert "round 5" in str(reply.content[part_key(0)]["error"])


def _swap_rounds(node: int, msg: Message) -> Message:
    """A malicious ServerApp that delivers each round's protocol messages in ANOTHER round's part of node
    100's bundle (the parts' rounds, sessions and steps stay as they were)."""
    if node != 100 or msg.metadata.message_type != BUNDLE:
        return msg
    index: Any = msg.content[BUNDLE_RECORD]
    kinds = list(index["kinds"])
    if len(kinds) < 2:
        return msg
    parts: list[dict[str, Any]] = [dict(msg.content[part_key(i)]) for i in range(len(kinds))]
    msgs = [p.get("msgs") for p in parts]
    for i, p in enumerate(parts):
        moved = msgs[(i + 1) % len(parts)]
        if moved is None:
            p.pop("msgs", None)
        else:
            p["msgs"] = moved
        msg.content[part_key(i)] = ConfigRecord(p)
    return msg


def test_protocol_messages_moved_to_another_rounds_part_are_refused(tmp_path: Path) -> None:
    """Each round's machine is bound to its own session and round: another round's keys, shares or unmask
    request in its part are refused, the node drops from those rounds, and no sum is ever wrong."""
    job = _job(tmp_path, rounds=4, in_flight=4)
    grid = InProcessGrid(_contexts(tmp_path, job), rewrite=_swap_rounds)
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert len(result["rounds"]) == 4
    for r in result["rounds"]:
        assert r.get("exact") is True or "aborted" in r, r
        if r.get("exact"):
            assert 0 not in r["included_ids"], "client 0 took part in a round whose messages it was given wrongly"
