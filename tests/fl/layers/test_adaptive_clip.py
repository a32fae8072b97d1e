"""AdaptiveClip: the layer's two halves, its state contract, and the norm reaching the target quantile."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dp.rng import SecureRandom
from fl.layers.adaptive_clip import AdaptiveClip
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.pipeline import BoundPipeline, Pipeline
from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import CompositionError, RoundInfo, StatefulLayer, ValueSpec
from fl.sums.secagg import SecAggPlus


def info(n: int, round: int = 1) -> RoundInfo:
    ids = tuple(range(n))
    return RoundInfo(round=round, planned=ids, included=ids, population=n, sample_rate=1.0)


def rng(label: str = "t") -> SecureRandom:
    return SecureRandom.for_testing(f"aclip-test:{label}")


def test_count_scale_and_sensitivity_follow_andrew_et_al() -> None:
    """sigma_b = count_noise * z and z_update = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, section 3)."""
    for k in (0.6, 0.75, 2.0, 10.0):
        layer = AdaptiveClip(count_noise=k)
        c, s = layer.count_scale, layer.sensitivity
        assert s == pytest.approx(math.sqrt(1 + c**2 / 4))
        z = 1.3
        update, count = layer.split(z * s)  # the noise layer's sigma on the joint vector
        assert count == pytest.approx(k * z)
        assert update == pytest.approx((z**-2 - (2 * count) ** -2) ** -0.5)
        assert (update**-2 + (2 * count) ** -2) ** -0.5 == pytest.approx(z)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=12), st.floats(0.01, 20))
def test_encode_clips_to_the_round_norm_and_appends_the_bit(values: list[float], clip: float) -> None:
    layer = AdaptiveClip(initial_clip=clip)
    spec = ValueSpec(size=len(values), cohort=3)
    out_spec = layer.bind(spec)
    x = np.array(values)
    enc = layer.encode(x, spec, rng(), layer.initialize())
    assert enc.shape == (len(values) + 1,) == (out_spec.size,)
    assert np.linalg.norm(enc) <= out_spec.l2_bound + 1e-9  # the sensitivity the noise is calibrated to
    unclipped = np.linalg.norm(x) <= clip
    assert enc[-1] == pytest.approx(layer.count_scale * (0.5 if unclipped else -0.5))
    np.testing.assert_allclose(enc[:-1] * clip, x if unclipped else x * clip / np.linalg.norm(x), atol=1e-9)


def test_decode_restores_units_and_next_state_is_the_geometric_update() -> None:
    layer = AdaptiveClip(target_quantile=0.3, initial_clip=2.0, learning_rate=0.5)
    spec = ValueSpec(size=2, cohort=4)
    state = layer.initialize()
    xs = [np.array([0.1, 0.0]), np.array([3.0, 4.0]), np.array([0.0, 1.0]), np.array([10.0, 0.0])]
    total = sum(layer.encode(x, spec, rng(), state) for x in xs)  # noiseless here: the arithmetic only
    decoded = layer.decode(total, spec, info(4), rng(), state)
    np.testing.assert_allclose(decoded, [0.1 + 1.2 + 0.0 + 2.0, 1.6 + 1.0])
    nxt = layer.next_state(state, total, spec, info(4))
    assert nxt["unclipped_count"] == pytest.approx(2.0)
    assert nxt["clipped_fraction"] == pytest.approx(0.5)
    assert nxt["clip"] == pytest.approx(2.0 * math.exp(-0.5 * (0.5 - 0.3)))
    assert (nxt["round"], nxt["clip_used"]) == (1, 2.0)
    assert layer.measurements(nxt) == {"clip": 2.0, "clipped_fraction": 0.5, "next_clip": nxt["clip"]}
    assert layer.next_state(state, total, spec, info(0)) == state  # nothing released: no update


def run_rounds(bound: BoundPipeline, norms: Any, rounds: int, clients: int, label: str) -> list[dict[str, Any]]:
    """``rounds`` rounds of ``clients`` updates with norms drawn by ``norms(n)``; the states after each."""
    g = np.random.default_rng(5)
    src = rng(label)
    state = bound.initialize()
    history = []
    for r in range(1, rounds + 1):
        d = bound.specs[0].size
        dirs = g.normal(size=(clients, d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        total = sum(bound.encode(u, src, state) for u in dirs * norms(g, clients)[:, None])
        _, state = bound.advance(total, info(clients, r), src, state)
        history.append(state[0])
    return history


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_clip_converges_to_the_target_quantile_of_update_norms(quantile: float) -> None:
    """Lognormal(0, 0.5) update norms: C_t reaches exp(0.5 * Phi^-1(gamma)) from 10x below, with noise on."""
    layer = AdaptiveClip(target_quantile=quantile, initial_clip=0.1, learning_rate=0.2)
    bound = Pipeline([layer, GaussianNoise(multiplier=1.0)]).bind(ValueSpec(size=6, cohort=100))
    history = run_rounds(bound, lambda g, n: np.exp(g.normal(0, 0.5, n)), 70, 100, f"conv{quantile}")
    target = math.exp(0.5 * stats.norm.ppf(quantile))
    late = [h["clip"] for h in history[-15:]]
    assert np.median(late) == pytest.approx(target, rel=0.1)
    clipped = np.mean([h["clipped_fraction"] for h in history[-15:]])
    assert clipped == pytest.approx(1 - quantile, abs=0.1)
    assert history[0]["clipped_fraction"] > 0.8  # it started far below the norms


def test_distributed_noise_and_secagg_plus_carry_the_extra_coordinate() -> None:
    """aclip -> dnoise -> quantize -> SecAgg+ with a dropout: the ring holds d + 1 values, the count survives."""
    layers = [AdaptiveClip(initial_clip=1.0), GaussianNoise(multiplier=0.5, placement="clients", shares=8),
              Quantize(bits=20)]
    bound = Pipeline(layers, sum=SecAggPlus(threshold=0.5)).bind(ValueSpec(size=5, cohort=8))
    assert bound.sum_spec.size == 6 and bound.sum_spec.domain == "ring"
    state = bound.initialize()
    src = rng("ring")
    ups = {i: np.full(5, 0.1 * (i + 1)) for i in range(8)}  # norms 0.22 .. 1.79: clients 0-3 unclipped
    values = {i: bound.encode(u, src, state) for i, u in ups.items()}
    outcome = run_secure_sum(bound.pipeline.sum, values, spec=bound.sum_spec, session=b"s" * 16, round=1,
                             dropouts=DropoutSchedule({7: 2}))
    assert outcome.included == tuple(range(7))
    out, nxt = bound.advance(outcome.total, info(7), src, state)
    assert out.shape == (5,)
    expected = sum(u / max(1.0, float(np.linalg.norm(u))) for i, u in ups.items() if i < 7)
    sigma = 0.5 * layers[0].sensitivity  # noise std on the decoded sum, in units of the clip (1.0)
    assert np.all(np.abs(out - expected) < 6 * sigma)
    assert abs(nxt[0]["unclipped_count"] - 4) < 6 * sigma / layers[0].count_scale
    assert nxt[0]["included"] == 7


def test_stateless_pipelines_are_unchanged_and_stateful_ones_demand_state() -> None:
    plain = Pipeline([Clip(l2=1.0), GaussianNoise(multiplier=1.0)]).bind(ValueSpec(size=3, cohort=2))
    assert not plain.stateful and plain.initialize() == [None, None]
    x = plain.encode(np.ones(3), rng())  # no state argument needed
    assert plain.decode(x, info(1), rng()).shape == (3,)
    assert plain.measurements(None) == {}
    layer = AdaptiveClip()
    assert isinstance(layer, StatefulLayer) and not isinstance(Clip(l2=1.0), StatefulLayer)
    bound = Pipeline([layer, GaussianNoise(multiplier=1.0)]).bind(ValueSpec(size=3, cohort=2))
    assert bound.stateful
    with pytest.raises(CompositionError, match="stateful"):
        bound.encode(np.ones(3), rng())
    with pytest.raises(CompositionError, match="stateful"):
        bound.decode(np.ones(4), info(1), rng())
    with pytest.raises(ValueError, match="same --privacy"):
        bound.load_state([None, None])
    assert bound.load_state([{"clip": 0.5, "round": 3}, None]) == [{"clip": 0.5, "round": 3}, None]


def test_bad_parameters_and_orders_name_the_fix() -> None:
    with pytest.raises(ValueError, match="count_noise"):
        AdaptiveClip(count_noise=0.5)
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveClip(target_quantile=1.5)
    with pytest.raises(ValueError, match="initial_clip"):
        AdaptiveClip(initial_clip=0.0)
    with pytest.raises(CompositionError, match="before the noise"):
        Pipeline([Clip(l2=1.0), GaussianNoise(multiplier=1.0, placement="clients"), AdaptiveClip()]).bind(
            ValueSpec(size=2, cohort=2))
    with pytest.raises(CompositionError, match="before Quantize"):
        Pipeline([Clip(l2=1.0), Quantize(bits=16), AdaptiveClip()]).bind(ValueSpec(size=2, cohort=2))
