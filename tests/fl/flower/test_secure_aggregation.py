"""privagg_mod + SecureAggregation over an in-process Grid: Flower's FedAvg, record types and ClientApp dispatch.

The adversaries: a server that asks a node for weaker terms, for the update in the clear, or for the
same round twice; a node that drops mid-round; a node that speaks for another. Each test checks the
stated bound exactly (the secure aggregate equals the plain weighted mean up to the quantization bound).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl.runners.flower.mod import RECORD, SecureTerms, flatten, privagg_mod
from fl.runners.flower.policy import NodePolicy
from fl.runners.flower.workflow import SecureAggregation
from tests.fl.flower._loopback import LoopbackGrid

SHAPES = {"w": (3, 4), "b": (4,)}


def _update(node_id: int, rnd: int, size: int) -> np.ndarray:
    return np.random.default_rng([node_id, rnd]).uniform(-0.5, 0.5, size)


def _examples(node_id: int) -> int:
    return 10 * (node_id - 100)


def _train(msg: Message, context: Context) -> Message:
    """A deterministic 'training': global + a per-node, per-round update; num-examples per node."""
    arrays = msg.content["arrays"]
    rnd = int(msg.metadata.group_id)
    glob = flatten(arrays)
    new = glob + _update(context.node_id, rnd, glob.size)
    out, at = ArrayRecord(), 0
    for k in arrays:
        ref = arrays[k].numpy()
        out[k] = type(arrays[k])(new[at:at + ref.size].reshape(ref.shape).astype(ref.dtype))
        at += ref.size
    metrics = MetricRecord({"num-examples": _examples(context.node_id), "loss": 0.5})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def _app(*, mod: bool = True) -> ClientApp:
    app = ClientApp(mods=[privagg_mod] if mod else [])
    app.train()(_train)
    return app


def _initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord([rng.normal(size=s).astype(np.float32) for s in SHAPES.values()])


def _plain_mean(nodes: list[int], rnd: int, glob: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The weighted mean of the nodes' updates as their ClientApps reply them (rounded to the model's dtype)."""
    w = np.array([_examples(n) for n in nodes], dtype=np.float64)
    ups = np.stack([(glob + _update(n, rnd, glob.size)).astype(dtype).astype(np.float64) - glob for n in nodes])
    return (w[:, None] * ups).sum(0) / w.sum()


@pytest.mark.parametrize("protocol", ["secagg+", "secagg"])
def test_fedavg_through_secure_aggregation_equals_plain_fedavg(tmp_path: Path, protocol: str) -> None:
    """Flower's own FedAvg, 2 rounds over 3 nodes: the model equals plain FedAvg within the quantization bound."""
    grid = LoopbackGrid(_app(), 3, tmp_path)
    sa = SecureAggregation(protocol=protocol, threshold=0.7, poll_interval=0.0)
    result = FedAvg(fraction_evaluate=0.0).start(grid=sa.wrap(grid), initial_arrays=_initial(), num_rounds=2)
    glob = flatten(_initial()).astype(np.float32).astype(np.float64)
    for rnd in (1, 2):
        mean = _plain_mean([101, 102, 103], rnd, glob)
        bound = sa.terms.with_cohort(3).pipeline(glob.size)
        q = bound.pipeline.layers[0].quantizer(bound.specs[0])  # type: ignore[attr-defined]
        w = sum(min(_examples(n), 1000) / 1000 for n in (101, 102, 103))
        # each summand of w * update is off by < 1 step; dividing by w gives the bound on the mean
        tol = 3 / q.scale / w + 3 / q.scale * np.abs(mean).max() / w
        np.testing.assert_allclose(sa.history[rnd - 1].mean_update, mean, atol=tol, rtol=0)
        glob = (glob + sa.history[rnd - 1].mean_update).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(flatten(result.arrays), glob, atol=1e-6)
    assert [h.included for h in sa.history] == [(101, 102, 103)] * 2
    # nothing but protocol messages left a node: no arrays, no metrics in any reply
    assert sa.history[0].weight == pytest.approx(sum(_examples(n) for n in (101, 102, 103)))


def _start_message(terms: SecureTerms, *, rnd: int = 1, cid: int = 0, node: int = 101) -> Message:
    rec = ConfigRecord({**terms.to_record(), "stage": "start", "session": b"s" * 16, "round": rnd, "cid": cid})
    content = RecordDict({"arrays": _initial(), "config": ConfigRecord(), RECORD: rec})
    msg = Message(content, dst_node_id=node, message_type="train", group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _run_mod(grid: LoopbackGrid, msg: Message, node: int = 101) -> Message:
    return grid.app(msg, grid.contexts[node])


def test_node_refuses_weaker_terms_than_its_policy(tmp_path: Path) -> None:
    """A server asking threshold 0.5 of a node whose policy needs 0.6 gets an error naming the threshold; the
    ClientApp never trains (nothing computed from the node's data leaves it)."""
    policy = NodePolicy(min_threshold=0.6).save(tmp_path / "policy.json")
    trained: list[int] = []
    app = ClientApp(mods=[privagg_mod])

    @app.train()
    def _count(msg: Message, context: Context) -> Message:
        trained.append(1)
        return _train(msg, context)

    grid = LoopbackGrid(app, 3, tmp_path, node_config={"policy-file": str(policy)})
    reply = _run_mod(grid, _start_message(SecureTerms(threshold=0.5, cohort=3)))
    assert reply.has_error() and "threshold 0.5 is below this node's minimum 0.6" in reply.error.reason
    assert not trained
    ok = _run_mod(grid, _start_message(SecureTerms(threshold=0.7, cohort=3)))
    assert not ok.has_error() and trained == [1]
    assert set(ok.content.keys()) == {RECORD}, "only protocol messages leave the node"


def test_node_refuses_a_train_message_in_the_clear(tmp_path: Path) -> None:
    """Without our record the update would travel in the clear: refused unless the node's policy lists plain."""
    grid = LoopbackGrid(_app(), 1, tmp_path)
    msg = Message(RecordDict({"arrays": _initial(), "config": ConfigRecord()}), dst_node_id=101, message_type="train",
                  group_id="1")
    msg.metadata.__dict__["_message_id"] = "m0"
    reply = _run_mod(grid, msg)
    assert reply.has_error() and "in the clear" in reply.error.reason
    policy = NodePolicy(protocols=("secagg", "secagg+", "plain")).save(tmp_path / "plain.json")
    grid = LoopbackGrid(_app(), 1, tmp_path, node_config={"policy-file": str(policy)})
    assert not _run_mod(grid, msg).has_error()


def test_node_contributes_to_each_round_once(tmp_path: Path) -> None:
    """A server that opens round 1 again (to average away noise) is refused; round 2 is accepted."""
    grid = LoopbackGrid(_app(), 1, tmp_path)
    terms = SecureTerms(threshold=0.7, cohort=3)
    assert not _run_mod(grid, _start_message(terms, rnd=1)).has_error()
    again = _run_mod(grid, _start_message(terms, rnd=1))
    assert again.has_error() and "already contributed to round 1" in again.error.reason
    assert not _run_mod(grid, _start_message(terms, rnd=2)).has_error()


def test_round_completes_when_a_node_drops_mid_round(tmp_path: Path) -> None:
    """Node 103 goes silent after the start: the sum is the weighted mean of 101 and 102 exactly (to quantization)."""
    grid = LoopbackGrid(_app(), 3, tmp_path)
    grid.silent[103] = lambda msg: msg.content[RECORD]["stage"] == "step"
    sa = SecureAggregation(protocol="secagg", threshold=0.6, poll_interval=0.0, phase_timeout=0.2)
    sa.wrap(grid).send_and_receive(FedAvg().configure_train(1, _initial(), ConfigRecord(), grid))
    out = sa.history[0]
    assert out.included == (101, 102) and out.planned == (101, 102, 103)
    glob = flatten(_initial()).astype(np.float64)
    np.testing.assert_allclose(out.mean_update, _plain_mean([101, 102], 1, glob), atol=1e-6)


def test_a_node_speaking_for_another_is_dropped(tmp_path: Path) -> None:
    """A reply whose protocol message claims another sender drops the replying node, not the claimed one."""
    from secagg import wire

    grid = LoopbackGrid(_app(), 3, tmp_path)

    def forge(nid: int, reply: Message) -> Message:
        """Node 103 rewrites every message it sends to claim client 0 as its sender."""
        if nid == 103 and not reply.has_error():
            rec: Any = reply.content[RECORD]
            rec["msgs"] = [wire.dumps(dataclasses.replace(wire.loads(b), sender=0)) for b in rec["msgs"]]
        return reply

    grid.tamper = forge
    sa = SecureAggregation(protocol="secagg", threshold=0.6, poll_interval=0.0, phase_timeout=0.2)
    sa.wrap(grid).send_and_receive(FedAvg().configure_train(1, _initial(), ConfigRecord(), grid))
    assert sa.history[0].included == (101, 102)


def _epsilon(z: float, rounds: int, delta: float) -> float:
    from dp.accounting import PLD_FAST, Accountant, GaussianStep

    acc = Accountant(accountant="pld", pld_interval=PLD_FAST)
    acc.compose(GaussianStep(z, 1.0, "fixed"), count=rounds)
    return acc.epsilon(delta)


def test_central_dp_is_accounted_per_round_and_the_budget_stops_the_run(tmp_path: Path) -> None:
    """clip + central noise: each round charged as an unamplified Gaussian (Flower's sampling is not secret);
    the round that would exceed the budget is not run."""
    from fl.runners.flower.workflow import BudgetExhaustedError

    grid = LoopbackGrid(_app(), 3, tmp_path)
    budget = (_epsilon(2.0, 2, 1e-5) + _epsilon(2.0, 3, 1e-5)) / 2  # room for exactly two rounds
    sa = SecureAggregation(protocol="secagg+", threshold=0.7, clip=1.0, noise_multiplier=2.0, epsilon=budget,
                           delta=1e-5, poll_interval=0.0)
    wrapped = sa.wrap(grid)
    for rnd in (1, 2):
        wrapped.send_and_receive(FedAvg().configure_train(rnd, _initial(), ConfigRecord(), grid))
    assert sa.report()["privacy"]["epsilon"] == pytest.approx(_epsilon(2.0, 2, 1e-5), rel=1e-6)
    assert [e["round"] for e in sa.ledger.as_list()] == [1, 2]
    assert any("noise" in g["layer"] for g in sa.ledger.as_list()[0]["guarantees"])
    with pytest.raises(BudgetExhaustedError, match="budget"):
        wrapped.send_and_receive(FedAvg().configure_train(3, _initial(), ConfigRecord(), grid))
    # the noise is really there: the decoded mean is the clipped mean plus N(0, (z*S/3)^2) per coordinate
    glob = flatten(_initial()).astype(np.float64)
    clipped = [u * min(1.0, 1.0 / np.linalg.norm(u)) for u in (_update(n, 1, glob.size) for n in (101, 102, 103))]
    resid = sa.history[0].mean_update - np.mean(clipped, axis=0)
    assert 0.3 < float(np.std(resid)) < 1.3  # expected 2/3 over 16 coordinates


def test_a_node_that_requires_its_own_noise_refuses_central_noise(tmp_path: Path) -> None:
    """min_noise_multiplier: central noise (added by the server, unchecked) does not count; distributed does."""
    policy = NodePolicy(min_noise_multiplier=0.5).save(tmp_path / "p.json")
    grid = LoopbackGrid(_app(), 3, tmp_path, node_config={"policy-file": str(policy)})
    central = _run_mod(grid, _start_message(SecureTerms(cohort=3, clip=1.0, noise_multiplier=1.0)))
    assert central.has_error() and "central noise is added by the server" in central.error.reason
    sa = SecureAggregation(threshold=0.7, clip=1.0, noise_multiplier=1.0, placement="clients", poll_interval=0.0)
    sa.wrap(grid).send_and_receive(FedAvg().configure_train(2, _initial(), ConfigRecord(), grid))
    assert sa.history[0].included == (101, 102, 103)
    assert {o["observer"] for o in sa.report()["privacy"]["observers"]} == {"released model", "server"}


def test_legacy_default_workflow_with_secure_aggregation_as_fit_step(tmp_path: Path) -> None:
    """DefaultWorkflow(fit_workflow=SecureAggregation(...)) with a LegacyContext and the legacy FedAvg."""
    from flwr.client import NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow

    init = [a.astype(np.float64) for a in _initial().to_numpy_ndarrays()]

    class Client(NumPyClient):
        def __init__(self, nid: int) -> None:
            self.nid = nid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            flat = np.concatenate([p.ravel() for p in parameters]) + _update(self.nid, 1, 16)
            return [flat[:12].reshape(3, 4), flat[12:]], _examples(self.nid), {}

    app = ClientApp(client_fn=lambda context: Client(context.node_id).to_client(), mods=[privagg_mod])
    grid = LoopbackGrid(app, 3, tmp_path)
    sa = SecureAggregation(threshold=0.7, poll_interval=0.0)
    strategy = LegacyFedAvg(fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters(init))
    ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=ctx, config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=sa)(grid, legacy)
    glob = np.concatenate([a.ravel() for a in init])
    np.testing.assert_allclose(sa.history[0].mean_update, _plain_mean([101, 102, 103], 1, glob, np.float64),
                               atol=1e-6)


def test_a_server_inflating_the_cohort_to_thin_the_noise_is_refused(tmp_path: Path, monkeypatch: Any) -> None:
    """Distributed noise is split across the claimed cohort: claiming 10 clients for 3 would make each add a
    tenth of the variance. Each node's floor (t of the claimed cohort under its policy) refuses a round with
    fewer members, so no sum is released."""
    grid = LoopbackGrid(_app(), 3, tmp_path)
    sa = SecureAggregation(threshold=0.7, clip=1.0, noise_multiplier=1.0, placement="clients", poll_interval=0.0,
                           phase_timeout=0.2)
    real = SecureTerms.with_cohort
    monkeypatch.setattr(SecureTerms, "with_cohort", lambda self, n: real(self, 10))
    replies = sa.wrap(grid).send_and_receive(FedAvg().configure_train(1, _initial(), ConfigRecord(), grid))
    assert list(replies) == [] and sa.history == []
    monkeypatch.setattr(SecureTerms, "with_cohort", real)
    sa.wrap(grid).send_and_receive(FedAvg().configure_train(2, _initial(), ConfigRecord(), grid))
    assert sa.history[0].included == (101, 102, 103)  # the honest claim runs


def test_a_node_checks_its_noise_floor_against_the_worst_round_it_accepts(tmp_path: Path) -> None:
    """min_noise_multiplier 0.9, distributed z = 1.2: an honest cohort of 3 (floor 2: 1.2 * sqrt(2/3) = 0.98)
    runs; a claimed cohort of 6 for the same nodes (floor 3: 1.2 * sqrt(3/6) = 0.85) is refused."""
    policy = NodePolicy(min_noise_multiplier=0.9).save(tmp_path / "p.json")
    grid = LoopbackGrid(_app(), 3, tmp_path, node_config={"policy-file": str(policy)})
    terms = SecureTerms(cohort=3, clip=1.0, noise_multiplier=1.2, placement="clients")
    assert not _run_mod(grid, _start_message(terms, rnd=1)).has_error()
    thinned = _run_mod(grid, _start_message(terms.with_cohort(6), rnd=2))
    assert thinned.has_error() and "noise multiplier 0.848528 is below this node's minimum 0.9" in thinned.error.reason


def test_a_clientapp_replying_with_other_arrays_gets_a_clear_error(tmp_path: Path) -> None:
    app = ClientApp(mods=[privagg_mod])

    @app.train()
    def _wrong(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 5})
        return Message(RecordDict({"arrays": ArrayRecord([np.zeros(3)]), "metrics": metrics}), reply_to=msg)

    grid = LoopbackGrid(app, 1, tmp_path)
    reply = _run_mod(grid, _start_message(SecureTerms(cohort=3)))
    assert reply.has_error() and "3 values in arrays ['0'], the global model has 16" in reply.error.reason
