"""Adversary: a malicious ServerApp / SuperLink operator, against the real privagg ClientApp functions.

It controls the job (the run config every node reads) and every message the nodes receive. The claim
(the node policy): nothing it sends selects code on the node, and nothing it sends makes the node run
with less privacy than the node's OWN policy allows. A weaker job is refused with an error reply.
"""

from __future__ import annotations

import builtins
import json
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, NodePolicy
from tests.adversary.flower_harness import deliver, instruction, node_context, server_identity


@pytest.fixture(autouse=True)
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


class _Plant:
    """Unpickling this object opens (creates) a file: the proof that pickle ran on attacker bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return builtins.open, (str(self.path), "w")


def _sum_job(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    job = FlowerJob(task="sum", out=str(tmp_path / "out"), clients=3, size=16, rounds=1, protocol="secagg+",
                    threshold=0.6)
    return {**asdict(job), **kw}


def _start(ctx: Any, msgs: list[bytes] | None = None) -> Any:
    fields: dict[str, Any] = {"round": 1, "session": b"s" * 16}
    if msgs is not None:
        fields["msgs"] = msgs
    return deliver(instruction(ctx.node_id, "train.privagg_start", fields), ctx)


def _hello(ctx: Any) -> Any:
    return deliver(instruction(ctx.node_id, "query.privagg_hello", {"hello": 1}), ctx)


def test_a_job_naming_pickle_as_codec_never_runs_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    job = _sum_job(tmp_path, codec="pickle")  # old clients imported this module and ran its loads()
    ctx = node_context(tmp_path, 11, 0, 3, json.dumps(job))
    for reply in (_hello(ctx), _start(ctx, [pickle.dumps(_Plant(marker))])):
        assert reply.has_error(), "the node accepted a job that names code to import"
        assert "codec" in reply.error.reason and "secagg.wire" in reply.error.reason
    assert not marker.exists(), "pickle.loads ran on bytes the server sent"


def test_pickle_bytes_in_an_honest_looking_job_are_refused_by_the_wire_codec(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ctx = node_context(tmp_path, 11, 0, 3, json.dumps(_sum_job(tmp_path)))
    reply = _start(ctx, [pickle.dumps(_Plant(marker))])
    assert reply.has_error() and "CodecError" in reply.error.reason
    assert not marker.exists()


def test_a_plain_job_is_refused_unless_the_node_allows_plain(tmp_path: Path) -> None:
    job = json.dumps(_sum_job(tmp_path, protocol="plain"))
    ctx = node_context(tmp_path, 11, 0, 3, job)
    for reply in (_hello(ctx), _start(ctx)):
        assert reply.has_error() and "protocol 'plain'" in reply.error.reason
        assert "PolicyError" in reply.error.reason
    assert "privagg-state" not in ctx.state, "the node started a round it refused"
    # The node's own policy can allow plain (public test data): the same job then runs.
    policy = NodePolicy(protocols=("secagg", "secagg+", "plain")).save(tmp_path / "policy.json")
    allowed = node_context(tmp_path / "b", 12, 0, 3, job, policy=policy)
    reply = _start(allowed)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["privagg"]["msgs"], "the plain client sends its value"


def test_a_secure_job_is_accepted_by_default(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, 11, 0, 3, json.dumps(_sum_job(tmp_path)))
    assert not _hello(ctx).has_error()
    reply = _start(ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert "privagg-state" in ctx.state  # the machine waits for the next phase


@pytest.mark.parametrize("threshold,clients", [(0.4, 3), (0.6, 1)])
def test_a_low_threshold_or_a_lone_client_is_refused(tmp_path: Path, threshold: float, clients: int) -> None:
    ctx = node_context(tmp_path, 11, 0, clients, json.dumps(_sum_job(tmp_path, threshold=threshold, clients=clients)))
    reply = _hello(ctx)
    assert reply.has_error() and "PolicyError" in reply.error.reason
    assert ("threshold" if threshold < 0.5 else "planned client") in reply.error.reason


def _train_job(tmp_path: Path, **config: Any) -> str:
    privacy = config.pop("privacy", PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0,
                                                  threshold=0.6))
    cfg = TrainConfig(dataset="breast_cancer", clients=3, rounds=1, seed=3, model="logreg", privacy=privacy, **config)
    return FlowerJob(task="train", out=str(tmp_path / "out"), config=cfg.as_dict()).to_json()


def test_seeded_randomness_from_the_job_is_refused(tmp_path: Path) -> None:
    """With the seed the server knows, it could recompute and subtract this node's DP noise."""
    import numpy as np

    from fl.training.loop import Federation

    job = _train_job(tmp_path, insecure_seeded_randomness=True)
    size = Federation(TrainConfig(**{**json.loads(job)["config"], "privacy": PrivacyConfig(
        **json.loads(job)["config"]["privacy"])})).params.size
    ctx = node_context(tmp_path, 11, 0, 3, job)
    params = np.zeros(size, dtype=np.float64).tobytes()
    reply = deliver(instruction(11, "train.privagg_start", {"round": 1, "session": b"s" * 16, "params": params}),
                    ctx)
    assert reply.has_error() and "insecure_seeded_randomness" in reply.error.reason
    assert _hello(ctx).has_error()
    # The seam works only where the node itself enables it (the Flower == in-memory test does).
    policy = NodePolicy(allow_insecure_seeded_randomness=True).save(tmp_path / "policy.json")
    seam = node_context(tmp_path / "b", 12, 0, 3, _train_job(tmp_path, insecure_seeded_randomness=True),
                        policy=policy)
    assert not _hello(seam).has_error()


def test_dp_weaker_than_the_node_minimum_is_refused(tmp_path: Path) -> None:
    policy = NodePolicy(min_noise_multiplier=0.8, max_clip=2.0).save(tmp_path / "policy.json")
    strong = node_context(tmp_path / "ok", 11, 0, 3, _train_job(tmp_path), policy=policy)
    assert not _hello(strong).has_error()
    weak_noise = _train_job(tmp_path, privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0,
                                                             noise_multiplier=0.5, threshold=0.6))
    reply = _hello(node_context(tmp_path / "a", 12, 0, 3, weak_noise, policy=policy))
    assert reply.has_error() and "noise multiplier 0.5 is below" in reply.error.reason
    central = _train_job(tmp_path, privacy=PrivacyConfig(spec="clip,noise,secagg+", clip=1.0, noise_multiplier=2.0,
                                                          threshold=0.6))
    reply = _hello(node_context(tmp_path / "b", 13, 0, 3, central, policy=policy))
    assert reply.has_error() and "central noise is added by the server" in reply.error.reason
    big_clip = _train_job(tmp_path, privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=5.0, noise_multiplier=1.0,
                                                           threshold=0.6))
    reply = _hello(node_context(tmp_path / "c", 14, 0, 3, big_clip, policy=policy))
    assert reply.has_error() and "clip norm 5.0 exceeds" in reply.error.reason
    budget = NodePolicy(max_epsilon=4.0).save(tmp_path / "eps.json")
    reply = _hello(node_context(tmp_path / "d", 15, 0, 3, _train_job(tmp_path), policy=budget))
    assert reply.has_error() and "target epsilon None exceeds" in reply.error.reason


def test_policy_files_are_strict(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"allow_plain": True}))
    with pytest.raises(ValueError, match="unknown node policy key"):
        NodePolicy.load(bad)
    ctx = node_context(tmp_path, 11, 0, 3, json.dumps(_sum_job(tmp_path)), policy=bad)
    reply = _hello(ctx)
    assert reply.has_error() and "policy is unusable" in reply.error.reason
    with pytest.raises(ValueError, match="choose from"):
        NodePolicy(protocols=("pickle",))
    assert NodePolicy.load(NodePolicy().save(tmp_path / "p.json")) == NodePolicy()


def test_a_round_is_contributed_to_once_and_only_within_the_planned_rounds(tmp_path: Path) -> None:
    """Reopening a round (or one past the plan) would release this node's data more often than budgeted."""
    ctx = node_context(tmp_path, 11, 0, 3, json.dumps(_sum_job(tmp_path, rounds=2)))

    def start(rnd: int) -> Any:
        return deliver(instruction(11, "train.privagg_start", {"round": rnd, "session": bytes([rnd]) * 16}), ctx)

    assert not start(1).has_error()
    again = start(1)
    assert again.has_error() and "already contributed to round 1" in again.error.reason
    assert not start(2).has_error()
    beyond = start(3)
    assert beyond.has_error() and "outside the job's planned rounds 1..2" in beyond.error.reason
