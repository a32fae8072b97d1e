"""Training rounds whose key agreement runs ahead (:mod:`fl.runners.flower.ahead`): 2 exchanges per round.

The real ServerApp (``serve``) and ClientApps in one process (``InProcessGrid``). With
``rounds_in_flight=2`` round r+1's keys and shares travel with round r's masked inputs and unmask; the
clients train only when round r+1's masked-input phase brings them the model. The run ends bit for bit
as the sequential one does, in 2R + 2 exchanges instead of 4R, and a node releases nothing earlier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, JobError, NodePolicy
from fl.runners.flower import state as node_state
from fl.runners.flower.job import BUNDLE, BUNDLE_RECORD, START
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from secagg import wire
from secagg.masking.messages import AdvertiseKeys
from tests.adversary.flower_harness import InProcessGrid, deliver, instruction, node_context, server_identity

ROUNDS = 3


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _job(out: Path, in_flight: int, spec: str = "clip,dnoise,secagg+") -> FlowerJob:
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=ROUNDS, seed=3, model="logreg",
                         insecure_seeded_randomness=True,
                         privacy=PrivacyConfig(spec=spec, clip=1.0, noise_multiplier=1.0, threshold=0.6))
    return FlowerJob(task="train", out=str(out / "out"), config=config.as_dict(), join_timeout=5, start_timeout=60,
                     phase_timeout=60, poll_interval=0.0, rounds_in_flight=in_flight)


def _grid(nodes: Path, job: FlowerJob) -> InProcessGrid:
    nodes.mkdir(parents=True, exist_ok=True)
    policy = NodePolicy(allow_insecure_seeded_randomness=True).save(nodes / "policy.json")
    return InProcessGrid({100 + c: node_context(nodes, 100 + c, c, 3, job.to_json(), policy=policy)
                          for c in range(3)})


def test_key_agreement_ahead_ends_bit_for_bit_as_sequential_rounds_in_half_the_exchanges(tmp_path: Path) -> None:
    seq_job, ahead_job = _job(tmp_path / "a", 1), _job(tmp_path / "b", 2)
    seq_grid, ahead_grid = _grid(tmp_path / "a", seq_job), _grid(tmp_path / "b", ahead_job)
    seq = serve(seq_grid, seq_job, Progress(Path(seq_job.out)))  # type: ignore[arg-type]
    ahead = serve(ahead_grid, ahead_job, Progress(Path(ahead_job.out)))  # type: ignore[arg-type]
    assert [r["round"] for r in ahead["rounds"]] == list(range(1, ROUNDS + 1))
    assert [r["included_ids"] for r in ahead["rounds"]] == [[0, 1, 2]] * ROUNDS
    assert np.array_equal(np.load(seq["params_file"]), np.load(ahead["params_file"]))
    assert ahead["report"]["privacy"] == seq["report"]["privacy"]
    assert seq_grid.sent == 3 * (1 + 4 * ROUNDS)
    assert ahead_grid.sent == 3 * (1 + 2 * ROUNDS + 2)  # the hello, then one bundle per node per exchange


def test_opening_a_round_ahead_releases_nothing(tmp_path: Path) -> None:
    """An open (a start without the model) makes only fresh keys: no training result, no released round."""
    job = _job(tmp_path, 2)
    ctx = _grid(tmp_path / "n", job).contexts[100]
    reply = deliver(instruction(100, START, {"round": 1, "session": bytes(16)}), ctx)
    assert not reply.has_error(), reply.error.reason
    rec = reply.content["privagg"]
    assert "result" not in rec and "rejected" not in rec
    assert [type(m) for m in wire.decode_frames(rec["msgs"])] == [AdvertiseKeys]
    assert node_state.last_released(ctx, job.releases_id()) == 0
    assert "privagg-rounds" not in ctx.state  # the round is claimed when the node trains, not before


def test_a_model_in_a_step_of_a_sequential_job_is_refused(tmp_path: Path) -> None:
    job = _job(tmp_path, 1)
    ctx = _grid(tmp_path / "n", job).contexts[100]
    step = {"round": 1, "session": bytes(16), "step": 1, "final": False, "params": np.zeros(4).tobytes()}
    reply = deliver(instruction(100, "query.privagg_step", step), ctx)
    assert reply.has_error() and "key agreement runs ahead" in str(reply.error.reason)


def test_only_secagg_training_runs_its_key_agreement_ahead() -> None:
    with pytest.raises(JobError, match="at most its key agreement"):
        _job(Path("/tmp"), 3)


@pytest.mark.parametrize("after", [1, 2, 3, 5])
def test_a_node_dying_in_any_exchange_costs_only_what_a_sequential_run_would(tmp_path: Path, after: int) -> None:
    """3 clients, t = 2: the node that stops answering after ``after`` bundles is dropped from the rounds in
    flight; each round completes with the two others (or aborts cleanly), the run goes on, and the model
    and the accounted epsilon stay finite."""
    from tests.fl.flower.test_rounds_in_flight import DyingGrid

    job = _job(tmp_path, 2)
    grid = _grid(tmp_path / "n", job)
    dying = DyingGrid(grid.contexts, node=102, after=after)
    result = serve(dying, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert [r["round"] for r in result["rounds"]] == list(range(1, ROUNDS + 1))
    masked_at = {e["round"]: e["bundle"] for e in result["exchanges"] if e["phase"] == "masked"}
    for r in result["rounds"]:
        if "aborted" not in r:  # in a round's sum exactly when it answered that round's masked exchange
            assert (2 in r["included_ids"]) == (masked_at[r["round"]] <= after), (r, masked_at)
    assert any("aborted" not in r and 2 not in r["included_ids"] for r in result["rounds"])
    assert np.isfinite(np.load(result["params_file"])).all()
    assert np.isfinite(result["report"]["final"]["epsilon"])


class _CrashGrid(InProcessGrid):
    """The SuperLink dies as round ``crash_at`` is about to open (its keys ride a bundle with round r-1)."""

    def __init__(self, contexts: Any, crash_at: int) -> None:
        super().__init__(contexts)
        self.crash_at = crash_at

    def push_messages(self, msgs: Any) -> list[str]:
        msgs = list(msgs)
        for m in msgs:
            index = m.content.get(BUNDLE_RECORD) if m.metadata.message_type == BUNDLE else None
            if index is not None and any(k == "start" and r == self.crash_at
                                         for k, r in zip(index["kinds"], index["rounds"], strict=True)):
                raise RuntimeError(f"the SuperLink is gone before round {self.crash_at}")
        return super().push_messages(msgs)


def test_a_run_ahead_resumes_from_its_checkpoint_exactly(tmp_path: Path) -> None:
    """Crash as round 3 opens (round 2 still in flight): the checkpoint holds round 1 (or 2); the resumed
    run, also ahead, ends bit for bit as the uninterrupted sequential run, and no node refuses a round:
    opening a round ahead claims nothing."""
    import dataclasses

    whole = serve(_grid(tmp_path / "a", _job(tmp_path / "a", 1)), _job(tmp_path / "a", 1),  # type: ignore[arg-type]
                  Progress(Path(_job(tmp_path / "a", 1).out)))
    ckpt = str(tmp_path / "b" / "ckpt")
    job = dataclasses.replace(_job(tmp_path / "b", 2), checkpoint=ckpt)
    grid = _grid(tmp_path / "b", job)
    with pytest.raises(RuntimeError, match="gone before round 3"):
        serve(_CrashGrid(grid.contexts, 3), job, Progress(Path(job.out)))  # type: ignore[arg-type]
    resumed_job = dataclasses.replace(job, resume=True)
    for ctx in grid.contexts.values():
        ctx.run_config["job"] = resumed_job.to_json()
    resumed = serve(InProcessGrid(grid.contexts), resumed_job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert resumed["rounds"] and all("aborted" not in r for r in resumed["rounds"])
    assert resumed["rounds"][-1]["round"] == ROUNDS
    assert np.array_equal(np.load(whole["params_file"]), np.load(resumed["params_file"]))


def test_a_budget_that_runs_out_stops_a_run_ahead_where_the_sequential_run_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is checked when the model goes out (after the round before was charged): the run ahead
    stops before the same round as the sequential run, with the same model and the same message, and no
    node trained for that round."""
    from fl.errors import BudgetExhaustedError
    from fl.training.server import ServerSide

    honest = ServerSide.check_budget

    def check(self: Any, round: int, planned: Any) -> None:
        honest(self, round, planned)
        if round == 2:
            raise BudgetExhaustedError("round 2 would overspend (test)")

    monkeypatch.setattr(ServerSide, "check_budget", check)
    seq_job, ahead_job = _job(tmp_path / "a", 1), _job(tmp_path / "b", 2)
    seq = serve(_grid(tmp_path / "a", seq_job), seq_job, Progress(Path(seq_job.out)))  # type: ignore[arg-type]
    ahead_grid = _grid(tmp_path / "b", ahead_job)
    ahead = serve(ahead_grid, ahead_job, Progress(Path(ahead_job.out)))  # type: ignore[arg-type]
    assert [r["round"] for r in seq["rounds"]] == [r["round"] for r in ahead["rounds"]] == [1]
    assert "stopped before round 2" in ahead["report"]["stopped"] and ahead["report"]["stopped"] == \
        seq["report"]["stopped"]
    assert np.array_equal(np.load(seq["params_file"]), np.load(ahead["params_file"]))
    assert all(node_state.last_released(c, ahead_job.releases_id()) == 1 for c in ahead_grid.contexts.values())
