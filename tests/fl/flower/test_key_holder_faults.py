"""Faults of the Paillier key-holder node: it dies mid-run (issue #16, Faults).

In process (fast, the default suite): the real ServerApp (``serve`` / the ServerApp's main) and ClientApps
over :class:`~tests.adversary.flower_harness.InProcessGrid`; the key holder goes silent when round 2's
decryption request reaches it (Flower still lists the dead node, as until its heartbeat expires). Claims:
the round aborts cleanly with an error naming the key holder's node, within the phase timeout; a key
holder restarted with the same key file (a new node id, a fresh Flower context) is found and the next
round runs; if none comes back within the join timeout, the run stops with an error saying the key
holder is unreachable and how to resume, and writes no model. With real processes (slow): the key-holder
SuperNode is killed (SIGKILL) mid-run over TLS and restarted with the same key file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context

from fl.config import PrivacyConfig, TrainConfig
from fl.runners.flower import FlowerJob, NodePolicy
from fl.runners.flower.job import KEYHOLDER
from fl.runners.flower.keyholder import KeyHolderUnreachableError, keygen, read_public_key
from fl.runners.flower.link import Progress
from fl.runners.flower.serverapp import serve
from secagg.machine import KEY_HOLDER
from tests.adversary.flower_harness import InProcessGrid, key_holder_context, node_context

KH, KH_BACK = 900, 901
ROUNDS = 3


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keyholder"), bits=2048)


def _job(tmp: Path, public: Path, *, seeded: bool = True, **kw: Any) -> FlowerJob:
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=ROUNDS, seed=5, model="logreg",
                         insecure_seeded_randomness=seeded,
                         privacy=PrivacyConfig(spec="clip,noise,paillier", clip=1.0, noise_multiplier=0.5))
    fields: dict[str, Any] = dict(task="train", out=str(tmp / "out"), config=config.as_dict(), join_timeout=0.6,
                                  start_timeout=60, phase_timeout=0.3, poll_interval=0.0,
                                  paillier_public_key=public.read_text())
    return FlowerJob(**{**fields, **kw})


class _KeyHolderDies(InProcessGrid):
    """The key holder goes silent when round ``dies_at``'s decryption request reaches it; with ``restart``,
    a key holder restarted from the same files (key, state key, round record) joins as node ``KH_BACK``."""

    def __init__(self, contexts: dict[int, Context], *, dies_at: int, restart: Context | None = None) -> None:
        super().__init__(contexts)
        self.dies_at, self.restart = dies_at, restart
        self.decrypt_asked: list[tuple[int, int]] = []  # (node, round) of every decryption request

    def push_messages(self, msgs: Any) -> list[str]:
        msgs = list(msgs)
        for m in msgs:
            if m.metadata.message_type == KEYHOLDER:
                rnd = int(m.content["privagg"]["round"])
                self.decrypt_asked.append((m.metadata.dst_node_id, rnd))
                if m.metadata.dst_node_id == KH and rnd == self.dies_at:
                    self.silent.add(KH)
                    if self.restart is not None:
                        self.contexts[KH_BACK] = self.restart
        return super().push_messages(msgs)


def _contexts(tmp: Path, job: FlowerJob, keys: tuple[Path, Path]) -> tuple[dict[int, Context], Context]:
    """Three clients and the key holder; and the key holder as it is after a restart (same files, new id)."""
    fp = read_public_key(keys[1]).fingerprint.hex()
    policy = NodePolicy(protocols=("paillier",), paillier_key_fingerprint=fp,
                        allow_insecure_seeded_randomness=True).save(tmp / "policy.json")
    ctx = {100 + c: node_context(tmp, 100 + c, c, 3, job.to_json(), policy=policy) for c in range(3)}
    ctx[KH] = key_holder_context(tmp, KH, job.to_json(), keys[0], policy=policy)
    again = key_holder_context(tmp, KH_BACK, job.to_json(), keys[0], policy=policy)
    again.node_config["state-key-file"] = ctx[KH].node_config["state-key-file"]  # the same node's own files
    return ctx, again


def test_a_restarted_key_holder_is_found_and_the_next_round_runs(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    job = _job(tmp_path, keys[1], join_timeout=5.0)
    contexts, restarted = _contexts(tmp_path, job, keys)
    grid = _KeyHolderDies(contexts, dies_at=2, restart=restarted)
    t0 = time.monotonic()
    result = serve(grid, job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 30
    one, two, three = result["rounds"]
    assert one["included"] == 3 and three["included"] == 3  # the round after the failure runs in full
    assert two["included"] == 0
    assert f"Paillier key holder (SuperNode {KH}) returned no decrypted sum for round 2" in two["aborted"]
    assert f"back as SuperNode {KH_BACK}" in two["aborted"]
    assert grid.decrypt_asked == [(KH, 1), (KH, 2), (KH_BACK, 3)]
    assert int(restarted.state["privagg-keyholder"]["last"]) == 3  # type: ignore[arg-type]
    assert np.all(np.isfinite(np.load(result["params_file"])))


def test_a_key_holder_that_stays_away_stops_the_run_saying_how_to_resume(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """No key holder comes back: ``error.json`` names it as unreachable and gives the resume command; no
    model and no result are written. Restarted, the run resumes from the checkpoint and finishes."""
    from flwr.app import RecordDict

    from fl.runners.flower.serverapp import _server_main

    ckpt = tmp_path / "ckpt"
    job = _job(tmp_path, keys[1], checkpoint=str(ckpt))
    contexts, restarted = _contexts(tmp_path, job, keys)
    grid = _KeyHolderDies(contexts, dies_at=2)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"job": job.to_json()})
    t0 = time.monotonic()
    with pytest.raises(KeyHolderUnreachableError) as caught:
        _server_main(grid, server)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 30  # the phase and join timeouts, not a hang
    error = json.loads((Path(job.out) / "error.json").read_text())["error"]
    assert error.startswith("KeyHolderUnreachableError") and str(caught.value) in error
    for part in (f"key holder (SuperNode {KH}) returned no decrypted sum for round 2", "unreachable",
                 "--paillier-key DIR/key.json", f"--resume {ckpt}"):
        assert part in error, part
    assert not (Path(job.out) / "result.json").exists() and not (Path(job.out) / "params.npy").exists()

    grid.contexts[KH_BACK] = restarted  # the operator restarts the key holder, the launcher resumes the job
    resumed = serve(grid, FlowerJob(**{**json.loads(job.to_json()), "resume": True}),  # type: ignore[arg-type]
                    Progress(Path(job.out)))
    two, three = resumed["rounds"]
    assert two["round"] == 2 and two["included"] == 0 and "aborted" in two  # the clients released round 2 once
    assert three["round"] == 3 and three["included"] == 3
    assert grid.decrypt_asked[-1] == (KH_BACK, 3)


def test_the_last_round_failing_needs_no_wait(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The key holder dies at the last round: the round aborts naming it; no wait for a round that is not left."""
    job = _job(tmp_path, keys[1], join_timeout=30.0)
    contexts, _ = _contexts(tmp_path, job, keys)
    t0 = time.monotonic()
    result = serve(_KeyHolderDies(contexts, dies_at=ROUNDS), job, Progress(Path(job.out)))  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 25  # not the 30 s join timeout
    assert [r["included"] for r in result["rounds"]] == [3, 3, 0]
    assert f"key holder (SuperNode {KH})" in result["rounds"][-1]["aborted"]
    assert result["nodes"][str(KEY_HOLDER)] == KH


# ---- real processes ------------------------------------------------------------------------------------
def _progress(out: Path) -> list[dict[str, Any]]:
    path = out / "progress.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kill_key_holder_at(cluster: Any, out: Path, event: str, rnd: int | None = None, *,
                        timeout: float = 240) -> None:
    """SIGKILL the key-holder SuperNode (and its helpers) once the ServerApp logged ``event`` (of round ``rnd``)."""
    deadline = time.monotonic() + timeout
    while not any(e.get("event") == event and e.get("round") == rnd for e in _progress(out)):
        assert time.monotonic() < deadline, f"no {event} {rnd} yet: {_progress(out)}"
        assert not (out / "error.json").is_file(), (out / "error.json").read_text()
        time.sleep(0.05)
    cluster.kill_node(cluster.n)  # node n is the key holder


@pytest.mark.flower
@pytest.mark.slow
def test_killed_key_holder_node_over_tls(tmp_path: Path) -> None:
    """SuperLink, 3 client SuperNodes and the key-holder SuperNode over TLS, a 3-round Paillier training job.

    1. The key holder is killed after round 1 and restarted with the same key file: round 2 aborts naming
       it; round 3 runs with every client, decrypted by the restarted node (found under its new node id).
    2. A second job (no checkpoint): the key holder is killed as round 1 opens and stays away: the run
       stops with an error saying it is unreachable and how to go on; no result and no model are written.
    """
    from fl.runners.flower import LocalCluster, wait_result
    from fl.runners.flower.processes import group_alive

    private, public = keygen(tmp_path / "keyholder-site", bits=2048)
    fp = read_public_key(public).fingerprint.hex()
    cluster = LocalCluster(tmp_path / "cluster", 3, tls=True, fleet_poll=0.1, key_holder=private,
                           policy=NodePolicy(protocols=("paillier",), paillier_key_fingerprint=fp))
    try:
        cluster.start(timeout=60)
        job = _job(tmp_path / "first", public, join_timeout=120, phase_timeout=5, poll_interval=0.05, job_id="first",
                   seeded=False)
        out = cluster.submit(job)
        _kill_key_holder_at(cluster, out, "round_done", 1)
        cluster.start_node(cluster.n)  # the operator restarts it: same key file, same node files
        result = wait_result(out, timeout=300, processes=[cluster.superlink])
        one, two, three = result["rounds"]
        assert one["included"] == 3 and three["included"] == 3, result["rounds"]
        assert two["included"] == 0 and "Paillier key holder (SuperNode" in two["aborted"], two
        assert "returned no decrypted sum for round 2" in two["aborted"] and "is back as SuperNode" in two["aborted"]

        second = _job(tmp_path / "second", public, join_timeout=5, phase_timeout=5, poll_interval=0.05,
                      job_id="second", seeded=False)
        out2 = cluster.submit(second)
        _kill_key_holder_at(cluster, out2, "joined")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="KeyHolderUnreachableError") as caught:
            wait_result(out2, timeout=120, processes=[cluster.superlink])
        assert time.monotonic() - t0 < 90  # round 1's training, then the phase and join timeouts: not a hang
        for part in ("returned no decrypted sum for round 1", "unreachable", "--paillier-key DIR/key.json",
                     "kept no checkpoint"):
            assert part in str(caught.value), part
        assert not (out2 / "result.json").exists() and not (out2 / "params.npy").exists()
    finally:
        cluster.stop()
    assert not [p.pid for p in [cluster.superlink, *cluster.nodes.values()] if group_alive(p.pid)]
