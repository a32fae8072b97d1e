"""Pipeline composition, the quantizer, and the in-memory runner with PlainSum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize, clip_l2
from fl.pipeline import Pipeline
from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums.plain import PlainSum, threshold_count
from secagg.errors import AbortError, OverflowRiskError, ProtocolError
from secagg.plain import PlainInput, PlainServer
from secagg.ring import Quantizer


def info_for(included: tuple[int, ...], planned: tuple[int, ...] | None = None) -> RoundInfo:
    planned = planned or included
    return RoundInfo(round=1, planned=planned, included=included, population=len(planned), sample_rate=1.0)


def test_quantize_without_bound_names_the_fix() -> None:
    with pytest.raises(CompositionError, match="Clip"):
        Pipeline([Quantize(bits=16)]).bind(ValueSpec(size=4, cohort=3))


def test_clip_after_quantize_is_rejected() -> None:
    with pytest.raises(CompositionError, match="before Quantize"):
        Pipeline([Clip(l2=1.0), Quantize(bits=16), Clip(l2=1.0)]).bind(ValueSpec(size=4, cohort=3))


def test_ring_too_wide_for_cohort_is_a_composition_error() -> None:
    with pytest.raises(CompositionError, match="ring"):
        Pipeline([Clip(l2=1.0), Quantize(bits=48)]).bind(ValueSpec(size=4, cohort=1 << 20))


def test_bind_propagates_specs() -> None:
    bound = Pipeline([Clip(l2=2.0), Quantize(bits=16)]).bind(ValueSpec(size=4, cohort=1000))
    assert bound.specs[1].l2_bound == 2.0
    assert bound.sum_spec.domain == "ring"
    assert bound.sum_spec.modulus == 1 << (16 + 10)  # 10 bits of headroom for 1000 clients
    assert bound.sum_spec.value_bits == 16


def test_update_of_wrong_size_is_rejected() -> None:
    bound = Pipeline([Clip(l2=1.0)]).bind(ValueSpec(size=4, cohort=2))
    with pytest.raises(CompositionError, match="bound for 4"):
        bound.encode(np.zeros(5), SecureRandom.for_testing(0))


def test_clip_l2_bounds_norm_and_keeps_small_vectors() -> None:
    x = np.array([3.0, 4.0])
    assert np.linalg.norm(clip_l2(x, 1.0)) == pytest.approx(1.0)
    np.testing.assert_array_equal(clip_l2(x, 10.0), x)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 30),
    bits=st.integers(8, 32),
    seed=st.integers(0, 2**32),
)
def test_quantized_sum_is_within_bound(n: int, d: int, bits: int, seed: int) -> None:
    q = Quantizer(bound=1.0, value_bits=bits, cohort=n)
    rng = SecureRandom.for_testing(seed)
    xs = np.clip(np.random.default_rng(seed).normal(size=(n, d)), -1, 1)
    xs[0, 0] = 1.0  # extremes must not wrap
    if n > 1:
        xs[1, 0] = -1.0
    total = np.zeros(d, dtype=np.uint64)
    for x in xs:
        total += q.encode(x, rng.uniform)
    decoded = q.decode(total, n)
    assert np.max(np.abs(decoded - xs.sum(axis=0))) <= q.max_error(n) + 1e-9


def test_cohort_of_extremes_does_not_wrap() -> None:
    n = 1024
    q = Quantizer(bound=1.0, value_bits=16, cohort=n)
    one = q.encode(np.ones(3), lambda k: np.zeros(k))
    total = (one.astype(np.uint64) * np.uint64(n)) & np.uint64(q.modulus - 1)
    np.testing.assert_allclose(q.decode(total, n), np.full(3, float(n)), atol=q.max_error(n))


def test_out_of_range_value_is_an_error_not_clipped() -> None:
    q = Quantizer(bound=1.0, value_bits=16, cohort=4)
    with pytest.raises(OverflowRiskError, match="Clip"):
        q.encode(np.array([0.5, 8.5]), SecureRandom.for_testing(1).uniform)
    with pytest.raises(OverflowRiskError, match="NaN"):
        q.encode(np.array([np.nan]), SecureRandom.for_testing(1).uniform)


def test_decode_refuses_more_summands_than_planned() -> None:
    q = Quantizer(bound=1.0, value_bits=16, cohort=4)
    with pytest.raises(OverflowRiskError):
        q.decode(np.zeros(2, dtype=np.uint64), 5)


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantizer(bound=1.0, value_bits=4, cohort=1)  # coarse grid: rounding matters
    x = np.full(20000, 0.33)
    mean = q.decode(q.encode(x, SecureRandom.for_testing(2).uniform), 1).mean()
    assert abs(mean - 0.33) < 0.01


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 9), data=st.data())
def test_plain_sum_with_dropouts_and_reordering(n: int, data: st.DataObject) -> None:
    dropped = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    seed = data.draw(st.integers(0, 1000))
    pipeline = Pipeline([Clip(l2=1.0), Quantize(bits=16)])
    bound = pipeline.bind(ValueSpec(size=5, cohort=n))
    rng = SecureRandom.for_testing(seed)
    xs = {c: np.random.default_rng(seed + c).normal(size=5) * 0.2 for c in range(n)}
    enc = {c: bound.encode(x, rng) for c, x in xs.items()}
    out = run_secure_sum(
        pipeline.sum, enc, spec=bound.sum_spec, session=b"s", round=1,
        dropouts=DropoutSchedule({c: 0 for c in dropped}), reorder=np.random.default_rng(seed),
    )
    assert out.included == tuple(c for c in range(n) if c not in dropped)
    expected = sum(clip_l2(xs[c], 1.0) for c in out.included)
    got = bound.decode(out.total, info_for(out.included, tuple(range(n))), rng)
    assert np.max(np.abs(got - expected)) <= 2 * len(out.included) / (2**15 - 1)


def test_plain_sum_aborts_below_min_clients() -> None:
    ssum = PlainSum(min_clients=3)
    spec = ValueSpec(size=2, cohort=4)
    values = {c: np.ones(2) for c in range(4)}
    with pytest.raises(AbortError, match="at least 3"):
        run_secure_sum(ssum, values, spec=spec, session=b"s", dropouts=DropoutSchedule({0: 0, 1: 0}))


def test_plain_server_rejects_replay_wrong_round_and_shape() -> None:
    server = PlainServer([0, 1], 2, b"s", 1)
    server.receive(PlainInput(0, -1, b"s", 1, np.ones(2)))
    with pytest.raises(ProtocolError, match="already"):
        server.receive(PlainInput(0, -1, b"s", 1, np.ones(2)))
    with pytest.raises(ProtocolError, match="another session"):
        server.receive(PlainInput(1, -1, b"s", 2, np.ones(2)))
    with pytest.raises(ProtocolError, match="shape"):
        server.receive(PlainInput(1, -1, b"s", 1, np.ones(3)))
    with pytest.raises(ProtocolError, match="not sampled"):
        server.receive(PlainInput(7, -1, b"s", 1, np.ones(2)))


def test_threshold_count() -> None:
    assert threshold_count(0.7, 10) == 7
    assert threshold_count(3, 10) == 3
    with pytest.raises(CompositionError):
        threshold_count(0, 10)
