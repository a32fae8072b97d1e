"""Checkpoint and resume a Flower training run; the nodes never contribute to a round twice, across runs.

The real ServerApp round (``serve``) and ClientApps in one process (``InProcessGrid``). A run that dies
after round 2 (the SuperLink or the ServerApp gone) resumes from its checkpoint and ends with exactly the
model and ledger of an uninterrupted run. A server that replays rounds by starting the job again (or
"resuming" from an older checkpoint) gets nothing: each node keeps its own record of released rounds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, JobError, NodePolicy
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from tests.adversary.flower_harness import InProcessGrid, node_context, server_identity

ROUNDS = 3


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _job(out: Path, **kw: Any) -> FlowerJob:
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=ROUNDS, seed=3, model="logreg",
                         insecure_seeded_randomness=True,
                         privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0,
                                               threshold=0.6))
    return FlowerJob(task="train", out=str(out / "out"), config=config.as_dict(), join_timeout=5, start_timeout=60,
                     phase_timeout=60, poll_interval=0.0, **kw)


class _CrashError(RuntimeError):
    """The SuperLink went away."""


class _DyingGrid(InProcessGrid):
    """The SuperLink dies as round ``crash_at`` is about to open (no node has seen that round)."""

    def __init__(self, contexts: Any, crash_at: int | None) -> None:
        super().__init__(contexts)
        self.crash_at = crash_at

    def push_messages(self, msgs: Any) -> list[str]:
        msgs = list(msgs)
        for m in msgs:
            if m.metadata.message_type == "train.privagg_start" and int(m.content["privagg"]["round"]) == \
                    self.crash_at:
                raise _CrashError(f"the SuperLink is gone before round {self.crash_at}")
        return super().push_messages(msgs)


def _serve(nodes: Path, job: FlowerJob, *, crash_at: int | None = None) -> dict[str, Any]:
    policy = NodePolicy(allow_insecure_seeded_randomness=True).save(nodes / "policy.json")
    contexts = {100 + c: node_context(nodes, 100 + c, c, 3, job.to_json(), policy=policy) for c in range(3)}
    return serve(_DyingGrid(contexts, crash_at), job, Progress(Path(job.out)))  # type: ignore[arg-type]


def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _serve(tmp_path / "a", _job(tmp_path / "a"))
    ckpt = str(tmp_path / "b" / "ckpt")
    with pytest.raises(_CrashError):
        _serve(tmp_path / "b", _job(tmp_path / "b", checkpoint=ckpt), crash_at=3)
    resumed = _serve(tmp_path / "b", _job(tmp_path / "b", checkpoint=ckpt, resume=True))
    assert [r["round"] for r in resumed["rounds"]] == [3]  # only the round that had not run
    a = np.load(whole["params_file"])
    b = np.load(resumed["params_file"])
    assert np.array_equal(a, b), "the resumed model differs from the uninterrupted run's"
    assert whole["report"]["privacy"] == resumed["report"]["privacy"]  # the same accounting, to the last digit
    assert whole["report"]["privacy"]["accountant"] is not None
    assert whole["report"]["ledger"] == resumed["report"]["ledger"]


def test_nodes_refuse_rounds_they_already_released_in_an_earlier_run(tmp_path: Path) -> None:
    """The job sent again (or resumed from an older checkpoint): every node refuses; nothing is released."""
    first = _serve(tmp_path, _job(tmp_path))
    assert all(r["included"] == 3 for r in first["rounds"])
    again = _serve(tmp_path, dataclasses.replace(_job(tmp_path), out=str(tmp_path / "again")))
    assert all(r["included"] == 0 and "aborted" in r for r in again["rounds"])
    progress = (tmp_path / "again" / "progress.jsonl").read_text()
    assert "round_done" in progress


def test_another_job_id_is_another_job_to_the_nodes(tmp_path: Path) -> None:
    _serve(tmp_path, _job(tmp_path, job_id="first"))
    second = _serve(tmp_path, _job(tmp_path, job_id="second"))
    assert all(r["included"] == 3 for r in second["rounds"])


def test_resume_needs_a_checkpoint_and_only_train_jobs_have_one(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="checkpoint"):
        _job(tmp_path, resume=True)
    with pytest.raises(JobError, match="train jobs"):
        FlowerJob(task="sum", checkpoint=str(tmp_path))


def test_the_cli_resumes_with_the_checkpointed_job_id_and_statistics(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``flower run --checkpoint-dir`` names a job id; ``--resume`` keeps it and sums no statistics again."""
    import argparse

    from fl.cli import flower as flower_cli

    parser = argparse.ArgumentParser()
    flower_cli.add_arguments(parser)
    ckpt = tmp_path / "ckpt"
    flags = ["run", "--insecure", "--clients", "3", "--privacy", "clip,dnoise,secagg+", "--noise-multiplier", "1",
             "--clip", "1", "--rounds", "3", "--seed", "3"]
    first = flower_cli._job(parser.parse_args([*flags, "--checkpoint-dir", str(ckpt)]))
    assert first.job_id and first.checkpoint == str(ckpt.resolve()) and not first.resume
    with pytest.raises(ValueError, match="no checkpoint"):
        flower_cli._job(parser.parse_args([*flags, "--resume", str(ckpt)]))
    (ckpt / "checkpoint.pt").write_bytes(b"")  # present (its contents are the ServerApp's to check)
    called: list[Any] = []
    monkeypatch.setattr(flower_cli, "release_statistics", lambda config: called.append(config))
    again = flower_cli._job(parser.parse_args([*flags, "--resume", str(ckpt)]))
    assert again.resume and again.job_id == first.job_id and again.releases_id() == first.releases_id()
    assert called == [], "a resumed job released the statistics again"


def test_a_run_that_dies_says_how_to_resume(tmp_path: Path) -> None:
    from fl.runners.flower.serverapp import resume_hint

    ckpt = tmp_path / "ckpt"
    job = _job(tmp_path, checkpoint=str(ckpt))
    assert resume_hint(job) == ""  # nothing saved yet: nothing to resume
    with pytest.raises(_CrashError):
        _serve(tmp_path, job, crash_at=2)
    assert f"--resume {ckpt}" in resume_hint(job)


def test_a_public_sum_job_may_run_again_on_the_same_nodes(tmp_path: Path) -> None:
    """The cross-run record guards private data; a sum job's vectors are public test data (the latency
    benchmark runs the same sum job twice on one cluster)."""
    job = FlowerJob(task="sum", out=str(tmp_path / "out"), clients=3, size=16, rounds=1, protocol="secagg+",
                    threshold=0.6, join_timeout=5, start_timeout=60, phase_timeout=60, poll_interval=0.0)
    for _ in range(2):
        contexts = {100 + c: node_context(tmp_path, 100 + c, c, 3, job.to_json()) for c in range(3)}
        result = serve(_DyingGrid(contexts, None), job, Progress(Path(job.out)))  # type: ignore[arg-type]
        assert [r["included"] for r in result["rounds"]] == [3]
