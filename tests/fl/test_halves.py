"""The two halves of a run: a client side built alone equals the in-memory composition; Flower keeps one.

The claim: a SuperNode that builds only its own :class:`ClientSide` from the job (its own DP-SGD
calibration, no other site's state) sends exactly the update the in-memory loop's client would send, and
the Flower ClientApp builds that client side once per run instead of once per message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.config import PrivacyConfig, TrainConfig
from fl.errors import NonFiniteUpdateError
from fl.training.client import ClientSide
from fl.training.loop import Federation
from fl.training.server import ServerSide

CONFIGS = {
    "dp-sgd": PrivacyConfig(spec="dp-sgd,secagg+", epsilon=2.0, dpsgd_batch_size=16),
    "dnoise": PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0, threshold=0.6),
    "plain": PrivacyConfig(spec="none"),
}


def _config(privacy: PrivacyConfig, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"dataset": "breast_cancer", "clients": 4, "rounds": 2, "seed": 5, "model": "logreg",
                            "weighting": "samples", "insecure_seeded_randomness": True}
    return TrainConfig(**{**base, **kw}, privacy=privacy)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_client_side_built_alone_sends_the_in_memory_update(name: str) -> None:
    config = _config(CONFIGS[name])
    fed = Federation(config)
    fed.run_round(1)  # a trained global model, not the initial one
    params = fed.params.copy()
    for cid in (0, 3):
        alone = ClientSide.for_site(config, cid)
        mine, result = alone.update(params, 2)
        theirs, expected = fed.client_update(cid, 2, params)
        np.testing.assert_array_equal(mine, theirs)
        assert result == expected
        assert alone.weight == fed.weight(cid)


def test_a_client_side_calibrates_only_its_own_dp_sgd_noise() -> None:
    config = _config(CONFIGS["dp-sgd"])
    alone = ClientSide.for_site(config, 2)
    fed = Federation(config)
    z = alone.plan.trainer.noise_multiplier  # type: ignore[union-attr]
    assert isinstance(z, dict) and set(z) == {2}
    assert z[2] == fed.plan.trainer.noise_for(2)  # type: ignore[union-attr]


def test_a_client_side_refuses_a_foreign_partition_and_a_wrong_model() -> None:
    config = _config(CONFIGS["plain"])
    with pytest.raises(ValueError, match="not in this run's 4 clients"):
        ClientSide.for_site(config, 4)
    side = ClientSide.for_site(config, 0)
    with pytest.raises(ValueError, match="expects"):
        side.update(np.zeros(3), 1)


def test_a_diverged_client_sends_nothing() -> None:
    side = ClientSide.for_site(_config(CONFIGS["plain"]), 1)
    params = np.full(side.worker.size, np.inf)
    with pytest.raises(NonFiniteUpdateError, match="client 1's update"):
        side.update(params, 1)


def test_the_server_side_holds_no_client_rows() -> None:
    """The server side's state is the model, optimizer, ledger and test set: no per-site training tensors."""
    fed = Federation(_config(CONFIGS["plain"]))
    server = fed.server
    assert isinstance(server, ServerSide)
    tensors = [v for v in vars(server).values() if hasattr(v, "shape")]
    assert all(int(t.shape[0]) in (fed.data.x_test.shape[0], fed.params.size) for t in tensors)


# ---- Flower: one client side per run ------------------------------------------------------------
def _flower_setup(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    pytest.importorskip("flwr")
    import fl.runners.flower.clientapp as runner
    from tests.adversary.flower_harness import server_identity

    server_identity(monkeypatch)
    monkeypatch.setattr(runner, "_CLIENT_SIDES", {})
    built: list[int] = []
    real = ClientSide.for_site.__func__  # type: ignore[attr-defined]

    def counting(cls: type[ClientSide], config: TrainConfig, cid: int, **kw: Any) -> ClientSide:
        built.append(cid)
        return real(cls, config, cid, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(ClientSide, "for_site", classmethod(counting))
    return runner, built


def test_flower_client_builds_its_side_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hello + two rounds' starts in one process: one build (before: a Federation per message)."""
    from fl.runners.flower import FlowerJob, NodePolicy
    from tests.adversary.flower_harness import deliver, instruction, node_context

    runner, built = _flower_setup(monkeypatch)
    config = _config(CONFIGS["dnoise"], clients=3)
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict()).to_json()
    policy = NodePolicy(allow_insecure_seeded_randomness=True).save(tmp_path / "policy.json")
    ctx = node_context(tmp_path, 11, 1, 3, job, policy=policy)
    assert not deliver(instruction(11, "query.privagg_hello", {"hello": 1}), ctx).has_error()
    params = Federation(config).params
    for rnd in (1, 2):
        fields = {"round": rnd, "session": bytes([rnd]) * 16, "params": params.tobytes()}
        reply = deliver(instruction(11, "train.privagg_start", fields, message_id=f"m{rnd}"), ctx)
        assert not reply.has_error(), reply.error.reason
    assert built == [1]
    runner._CLIENT_SIDES.clear()  # a cold process (Flower may start one per message) rebuilds it
    deliver(instruction(11, "query.privagg_hello", {"hello": 1}, message_id="m3"), ctx)
    assert built == [1, 1]


def test_flower_client_rebuilds_for_another_job_or_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fl.runners.flower import FlowerJob, NodePolicy
    from tests.adversary.flower_harness import deliver, instruction, node_context

    runner, built = _flower_setup(monkeypatch)
    policy = NodePolicy(allow_insecure_seeded_randomness=True).save(tmp_path / "policy.json")
    for seed in (5, 6):  # same run id, another job: never the old job's side
        config = TrainConfig(dataset="breast_cancer", clients=3, rounds=1, seed=seed, model="logreg",
                             insecure_seeded_randomness=True, privacy=PrivacyConfig(spec="secagg+", threshold=0.6))
        job = FlowerJob(task="train", out=str(tmp_path / "out"), config=config.as_dict()).to_json()
        ctx = node_context(tmp_path, 11, 0, 3, job, policy=policy)
        assert not deliver(instruction(11, "query.privagg_hello", {"hello": 1}), ctx).has_error()
    assert built == [0, 0]
    (key,) = runner._CLIENT_SIDES  # only the latest run's side is kept
    assert key[0] == 1 and '"seed": 6' in key[1]


def test_a_cold_process_reuses_the_nodes_calibration_and_checks_it(tmp_path: Path) -> None:
    """The memo lives in the node's own state; a stored value that misses the budget is recomputed."""
    pytest.importorskip("flwr")
    import time

    from flwr.app import ConfigRecord

    from dp.accounting import calibrate_noise
    from fl.runners.flower.calibrations import RECORD, NodeCalibrations
    from tests.adversary.flower_harness import node_context

    ctx = node_context(tmp_path, 11, 0, 3, "{}")
    config = _config(CONFIGS["dp-sgd"])
    t0 = time.perf_counter()
    first = ClientSide.for_site(config, 2, calibrate=NodeCalibrations(ctx))
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ClientSide.for_site(config, 2, calibrate=NodeCalibrations(ctx))  # a fresh process, same node state
    warm = time.perf_counter() - t0
    z = first.plan.trainer.noise_for(2)  # type: ignore[union-attr]
    assert again.plan.trainer.noise_for(2) == z == Federation(config).plan.trainer.noise_for(2)  # type: ignore
    assert warm < cold
    rec: Any = ctx.state[RECORD]
    kwargs = __import__("json").loads(rec["keys"][0])
    assert float(rec["values"][0]) == calibrate_noise(**kwargs)
    ctx.state[RECORD] = ConfigRecord({"keys": list(rec["keys"]), "values": [z / 10]})  # too little noise
    assert NodeCalibrations(ctx)(**kwargs) == z  # refused, recalibrated
