"""Training rounds whose key agreement runs ahead (:mod:`fl.runners.flower.ahead`): 2 exchanges per round.

The real ServerApp (``serve``) and ClientApps in one process (``InProcessGrid``). With
``rounds_in_flight=2`` round r+1's keys and shares travel with round r's masked inputs and unmask; the
clients train only when round r+1's masked-input phase brings them the model. The run ends bit for bit
as the sequential one does, in 2R + 2 exchanges instead of 4R, and a node releases nothing earlier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, JobError, NodePolicy
from fl.runners.flower import state as node_state
from fl.runners.flower.job import START
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
