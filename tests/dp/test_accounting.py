"""Accounting: cross-checked against Opacus's accountants and dp-accounting's own, plus calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant as OpacusRDP

from dp.accounting import (
    PLD_FAST,
    Accountant,
    GaussianStep,
    calibrate_noise,
    compute_epsilon,
    event_from_json,
    event_to_json,
    gaussian_delta,
    gaussian_epsilon,
    make_event,
    rounding_sensitivity,
)

MNIST_Q, MNIST_Z, MNIST_T = 256 / 60000, 1.1, 14062


def test_mnist_rdp_matches_opacus_and_reference() -> None:
    ours = compute_epsilon(noise_multiplier=MNIST_Z, delta=1e-5, sample_rate=MNIST_Q, steps=MNIST_T, accountant="rdp")
    opacus = OpacusRDP()
    opacus.history = [(MNIST_Z, MNIST_Q, MNIST_T)]
    theirs = opacus.get_epsilon(delta=1e-5)
    assert ours == pytest.approx(2.5966, abs=5e-4)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_mnist_pld_is_tighter() -> None:
    pld = compute_epsilon(noise_multiplier=MNIST_Z, delta=1e-5, sample_rate=MNIST_Q, steps=MNIST_T)
    assert pld == pytest.approx(2.38, abs=0.01)


def test_federated_regime_pld_far_tighter_than_rdp() -> None:
    q = 100 / 763_430
    rdp = compute_epsilon(noise_multiplier=1.0, delta=1e-9, sample_rate=q, steps=3000, accountant="rdp")
    pld = compute_epsilon(noise_multiplier=1.0, delta=1e-9, sample_rate=q, steps=3000, accountant="pld")
    opacus = OpacusRDP()
    opacus.history = [(1.0, q, 3000)]
    assert rdp == pytest.approx(1.057, abs=1e-3)
    assert rdp == pytest.approx(opacus.get_epsilon(delta=1e-9), rel=1e-6)
    assert pld == pytest.approx(0.060, abs=2e-3)


def test_unsampled_gaussian_closed_form_matches_pld_library() -> None:
    acc = PLDAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(4.0), 20))
    ours = compute_epsilon(noise_multiplier=4.0, delta=1e-5, sample_rate=1.0, steps=20)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-4)
    assert gaussian_delta(mu=math.sqrt(20) / 4.0, epsilon=ours) == pytest.approx(1e-5, rel=1e-6)


def test_heterogeneous_rounds_compose_like_the_library() -> None:
    acc = Accountant(accountant="pld", pld_interval=1e-4)
    acc.compose(GaussianStep(1.2, 0.01), 100)
    acc.compose(GaussianStep(0.9, 0.01), 50)
    lib = PLDAccountant()
    lib.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.2)), 100)
    lib.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(0.9)), 50)
    assert acc.epsilon(1e-5) == pytest.approx(lib.get_epsilon(1e-5), rel=1e-3)
    assert acc.total_steps == 150


def test_fixed_cohort_uses_without_replacement_rdp_with_replace_one() -> None:
    acc = Accountant(accountant="pld")
    acc.compose(GaussianStep(2.0, 0.1, "fixed", 100, 10), 30)
    assert acc.accountant_used.startswith("rdp")
    lib = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # replace-one moves a clipped sum by 2x the clip norm: the event's multiplier is halved
    lib.compose(dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(1.0)), 30)
    assert acc.epsilon(1e-5) == pytest.approx(lib.get_epsilon(1e-5), rel=1e-9)
    assert isinstance(make_event(noise_multiplier=2.0, sample_rate=0.1, sampling="fixed", population=100,
                                 sample_size=10), dp_event.SampledWithoutReplacementDpEvent)


def test_mixing_sampling_schemes_is_refused() -> None:
    acc = Accountant()
    acc.compose(GaussianStep(2.0, 0.1, "fixed", 100, 10))
    acc.compose(GaussianStep(2.0, 0.1, "poisson"))
    with pytest.raises(ValueError, match="one client-sampling scheme"):
        acc.epsilon(1e-5)


def test_no_noise_is_infinite_and_no_steps_is_zero() -> None:
    acc = Accountant()
    assert acc.epsilon(1e-5) == 0.0
    acc.compose(GaussianStep(0.0, 0.5))
    assert math.isinf(acc.epsilon(1e-5))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        GaussianStep(1.0, 1.5)
    with pytest.raises(ValueError, match="population"):
        GaussianStep(1.0, 0.5, "fixed")
    with pytest.raises(ValueError, match="delta"):
        Accountant().epsilon(0.0)
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_noise(epsilon=-1, delta=1e-5, sample_rate=0.1, steps=10)


@pytest.mark.parametrize(
    ("epsilon", "q", "steps", "accountant"),
    [(1.0, 0.26, 80, "pld"), (5.0, 1.0, 20, "pld"), (2.0, 0.05, 200, "rdp")],
)
def test_calibration_meets_budget_and_is_tight(epsilon: float, q: float, steps: int, accountant: str) -> None:
    z = calibrate_noise(epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)  # type: ignore[arg-type]
    kw = dict(delta=1e-5, sample_rate=q, steps=steps, accountant=accountant, pld_interval=PLD_FAST)
    at = compute_epsilon(noise_multiplier=z, **kw)  # type: ignore[arg-type]
    below = compute_epsilon(noise_multiplier=z * 0.99, **kw)  # type: ignore[arg-type]
    assert compute_epsilon(noise_multiplier=z, delta=1e-5, sample_rate=q, steps=steps,
                           accountant=accountant) <= epsilon  # type: ignore[arg-type]  # finer PLD: tighter
    assert at <= epsilon
    assert below > epsilon  # within 1% of the smallest multiplier that fits


@settings(max_examples=25, deadline=None)
@given(mu=st.floats(0.05, 8.0), eps=st.floats(0.0, 20.0))
def test_gaussian_epsilon_inverts_delta(mu: float, eps: float) -> None:
    delta = gaussian_delta(mu=mu, epsilon=eps)
    if 1e-12 < delta < 0.5:
        assert gaussian_epsilon(mu=mu, delta=delta) == pytest.approx(eps, abs=1e-6, rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(z1=st.floats(0.6, 5.0), factor=st.floats(1.05, 3.0), steps=st.integers(1, 50))
def test_more_noise_never_costs_more(z1: float, factor: float, steps: int) -> None:
    e1 = compute_epsilon(noise_multiplier=z1, delta=1e-5, sample_rate=0.1, steps=steps, accountant="rdp")
    e2 = compute_epsilon(noise_multiplier=z1 * factor, delta=1e-5, sample_rate=0.1, steps=steps, accountant="rdp")
    assert e2 <= e1


@settings(max_examples=20, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.3, 20.0), st.sampled_from([0.01, 0.3, 1.0]), st.integers(1, 50)), min_size=1, max_size=3
    )
)
def test_composition_event_round_trips_through_json(steps: list[tuple[float, float, int]]) -> None:
    acc = Accountant()
    for z, q, n in steps:
        acc.compose(GaussianStep(z, q), n)
    data = json.loads(json.dumps(event_to_json(acc.event())))
    assert event_from_json(data) == acc.event()
    with pytest.raises(ValueError, match="unknown DpEvent"):
        event_from_json({"class_name": "os.system"})  # a message never selects code


def test_state_restores_the_same_composition() -> None:
    acc = Accountant(accountant="rdp")
    acc.compose(GaussianStep(2.0, 0.1, "fixed", 100, 10), 7)
    other = Accountant(accountant="rdp")
    other.load_state(json.loads(json.dumps(acc.state())))
    assert other.steps == acc.steps and other.epsilon(1e-5) == acc.epsilon(1e-5)


def test_calibration_with_steps_already_spent() -> None:
    spent = [(GaussianStep(2.0, 0.2), 5)]
    z = calibrate_noise(epsilon=3.0, delta=1e-5, sample_rate=0.2, steps=10, extra=spent)
    acc = Accountant()
    acc.compose(*spent[0])
    acc.compose(GaussianStep(z, 0.2), 10)
    assert 3.0 * 0.99 < acc.epsilon(1e-5) <= 3.0
    assert z > calibrate_noise(epsilon=3.0, delta=1e-5, sample_rate=0.2, steps=10)
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise(epsilon=0.5, delta=1e-5, sample_rate=0.2, steps=10, extra=spent)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 300), g=st.floats(1e-3, 0.5), seed=st.integers(0, 2**32 - 1), spiky=st.booleans())
def test_rounding_sensitivity_bounds_every_rounded_vector(dim: int, g: float, seed: int, spiky: bool) -> None:
    """Adversary: any clipped vector, any rounding outcome; the rounded norm never exceeds the bound."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim) if not spiky else np.r_[1.0, np.zeros(dim - 1)]
    x = x / max(1.0, float(np.linalg.norm(x)))  # clip to 1
    scaled = x / g
    worst = np.where(np.sign(x) >= 0, np.ceil(scaled), np.floor(scaled)) * g  # every coordinate rounded outward
    assert float(np.linalg.norm(worst)) <= rounding_sensitivity(clip=1.0, granularity=g, dim=dim) + 1e-12
