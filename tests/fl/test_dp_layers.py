"""GaussianNoise: composition checks, noise on the sum (central and distributed), guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp.accounting import compute_epsilon, rounding_sensitivity
from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.pipeline import Pipeline
from fl.privacy.accounting import DpFedAvgAccounting
from fl.runners.local import run_secure_sum
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums.plain import PlainSum

D = 20_000


def info(n: int, included: int | None = None) -> RoundInfo:
    inc = tuple(range(n if included is None else included))
    return RoundInfo(round=1, planned=tuple(range(n)), included=inc, population=n, sample_rate=1.0)


def test_noise_needs_clip_first() -> None:
    with pytest.raises(CompositionError, match=r"put Clip\(l2=...\) before GaussianNoise"):
        Pipeline([GaussianNoise(multiplier=1.0)]).bind(ValueSpec(size=4, cohort=3))
    with pytest.raises(CompositionError, match="before Quantize"):
        Pipeline([Clip(l2=1.0), Quantize(bits=16), GaussianNoise(multiplier=1.0)]).bind(ValueSpec(size=4, cohort=3))
    with pytest.raises(CompositionError, match="Clip before the noise"):
        Pipeline([Clip(l2=1.0), GaussianNoise(multiplier=1.0, placement="clients"), Clip(l2=1.0)]).bind(
            ValueSpec(size=4, cohort=3))
    with pytest.raises(ValueError, match="multiplier"):
        GaussianNoise(multiplier=0.0)


def test_central_noise_is_added_once_by_the_server() -> None:
    layer = GaussianNoise(multiplier=2.0)
    bound = Pipeline([Clip(l2=0.5), layer]).bind(ValueSpec(size=D, cohort=4))
    rng = SecureRandom.for_testing(0)
    x = np.full(D, 0.001)
    assert np.array_equal(bound.encode(x, rng), x)  # clients add nothing
    out = bound.decode(np.zeros(D), info(4), rng)
    assert out.std() == pytest.approx(2.0 * 0.5, rel=0.03)
    assert bound.sum_spec.noise_std == 0.0


def test_distributed_noise_sums_to_sigma_and_leaves_quantizer_headroom() -> None:
    n = 5
    layer = GaussianNoise(multiplier=1.5, placement="clients", shares=n)
    bound = Pipeline([Clip(l2=1.0), layer, Quantize(bits=24)], sum=PlainSum()).bind(ValueSpec(size=D, cohort=n))
    assert bound.specs[2].noise_std == pytest.approx(1.5 / math.sqrt(n))
    values = {c: bound.encode(np.zeros(D), SecureRandom.for_testing(c)) for c in range(n)}
    out = run_secure_sum(PlainSum(), values, spec=bound.sum_spec, session=b"s" * 16)
    total = bound.decode(out.total, info(n), SecureRandom.for_testing("srv"))
    assert total.std() == pytest.approx(1.5, rel=0.03)
    # each client's own value carries only its share of the noise
    one = bound.pipeline.layers[1].encode(np.zeros(D), bound.specs[1], SecureRandom.for_testing(9))
    assert one.std() == pytest.approx(1.5 / math.sqrt(n), rel=0.03)


def test_dropouts_weaken_the_effective_multiplier() -> None:
    layer = GaussianNoise(multiplier=2.0, placement="clients", shares=10)
    spec = Clip(l2=1.0).bind(ValueSpec(size=8, cohort=10))
    assert layer.effective_multiplier(spec, included=10) == pytest.approx(2.0)
    assert layer.effective_multiplier(spec, included=5) == pytest.approx(2.0 * math.sqrt(0.5))
    central = GaussianNoise(multiplier=2.0)
    assert central.effective_multiplier(spec, included=5) == pytest.approx(2.0)


def test_discrete_noise_lands_on_the_grid() -> None:
    g = 1.0 / 1024
    layer = GaussianNoise(multiplier=1.0, placement="clients", shares=4, discrete=True, granularity=g)
    bound = Pipeline([Clip(l2=1.0), layer]).bind(ValueSpec(size=D, cohort=4))
    x = SecureRandom.for_testing("x").normal(D, 0.001)
    y = bound.encode(x, SecureRandom.for_testing(1))
    k = y / g
    assert np.array_equal(k, np.round(k))
    assert (y - x).std() == pytest.approx(0.5, rel=0.03)  # sigma / sqrt(shares)
    spec = bound.specs[1]
    assert layer.effective_multiplier(spec) < 1.0  # grid rounding is charged to the sensitivity


def test_guarantees_name_the_observer_and_what_is_public() -> None:
    layer = GaussianNoise(multiplier=1.0, placement="clients", shares=4)
    acc = DpFedAvgAccounting(noise=layer, clip=1.0, size=3, delta=1e-5)
    bound = Pipeline([Clip(l2=1.0), layer]).bind(ValueSpec(size=3, cohort=4))
    acc.record(info(4, included=3), {})
    g = next(x for x in bound.guarantees(info(4, included=3)) if "noise" in x.layer)
    assert "server" in g.against and "no amplification" in g.against
    assert g.params["included"] == 3
    assert any("Mironov" in a for a in g.assumptions)
    assert any("n_k" in a and "public" in a for a in g.assumptions)
    claims = {c.params["observer"]: c for c in acc.guarantees()}
    assert set(claims) == {"released model", "server"}
    assert claims["server"].params["epsilon"] == pytest.approx(acc.spent()[0])
    central = GaussianNoise(multiplier=1.0)
    gc = central.guarantees(Clip(l2=1.0).bind(ValueSpec(size=3, cohort=4)), info(4))[0]
    assert "not the server" in gc.against
    assert any("add/remove-one" in a for a in gc.assumptions)


def test_fixed_cohort_guarantee_says_replace_one() -> None:
    """Flaw 6: a fixed cohort is accounted replace-one, and the text must say so (it said add/remove)."""
    spec = Clip(l2=1.0).bind(ValueSpec(size=3, cohort=10))
    cohort = RoundInfo(round=1, planned=tuple(range(10)), included=tuple(range(10)), population=100,
                       sample_rate=0.1, sampling="fixed")
    (g,) = GaussianNoise(multiplier=1.0).guarantees(spec, cohort)
    text = " ".join(g.assumptions)
    assert "replace-one" in text and "add/remove" not in text
    assert GaussianNoise(multiplier=1.0).steps(spec, cohort)["released model"].without_replacement


def test_discrete_rounding_sensitivity_is_one_function_for_layer_and_ledger() -> None:
    """Flaw 4: the ledger charged the clip norm alone; it must charge clip + g * sqrt(d), as the layer does."""
    d, g = 10_000, 1.0 / 256
    layer = GaussianNoise(multiplier=2.0, discrete=True, granularity=g)
    spec = Clip(l2=1.0).bind(ValueSpec(size=d, cohort=4))
    sens = rounding_sensitivity(clip=1.0, granularity=g, dim=d)
    assert sens == pytest.approx(1.0 + g * 100)
    assert layer.sensitivity(spec) == sens
    acc = DpFedAvgAccounting(noise=layer, clip=1.0, size=d, delta=1e-5)
    rec = acc.record(info(4), {})
    assert rec["noise_multiplier"] == pytest.approx(2.0 / sens)
    expected = compute_epsilon(noise_multiplier=2.0 / sens, delta=1e-5, sample_rate=1.0, steps=1)
    assert acc.spent()[0] == pytest.approx(expected, rel=1e-6)
    assert acc.spent()[0] > compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=1.0, steps=1) * 1.2
    assert acc.report()["mechanisms"][0]["l2_sensitivity"] == sens
