"""Audits: the reference values, and each audit passes correct code and catches a planted bug."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import dp.sgd
from dp.accounting import calibrate_noise, gaussian_epsilon
from dp.audit import (
    assert_below,
    audit_dp_sgd,
    audit_mechanism,
    clopper_pearson,
    epsilon_lower_bound,
    gaussian_fit_epsilon,
    one_run_epsilon,
    one_run_p_value,
)
from dp.mechanisms import GaussianMechanism
from dp.rng import SecureRandom


def test_one_run_reference_value() -> None:
    assert one_run_epsilon(m=1000, r=100, v=75, delta=1e-4, confidence=0.95) == pytest.approx(0.673, abs=2e-3)


def test_one_run_p_value_is_binomial_tail_without_delta() -> None:
    q = 1 / (1 + np.exp(-0.5))
    assert one_run_p_value(m=100, r=40, v=30, epsilon=0.5, delta=0.0) == pytest.approx(stats.binom.sf(29, 40, q))


@pytest.mark.parametrize(("k", "n"), [(0, 20), (3, 100), (50, 50), (17, 40)])
def test_clopper_pearson_matches_scipy(k: int, n: int) -> None:
    lo, hi = clopper_pearson(k, n, alpha=0.05)
    exp_lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    exp_hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    assert lo == pytest.approx(exp_lo, abs=1e-9)
    assert hi == pytest.approx(exp_hi, abs=1e-9)


def test_epsilon_lower_bound_behaves() -> None:
    strong = epsilon_lower_bound(fp=1, fn=10, negatives=1000, positives=1000, delta=1e-5)
    weak = epsilon_lower_bound(fp=500, fn=500, negatives=1000, positives=1000, delta=1e-5)
    assert strong > 4.0
    assert weak == 0.0


def test_gaussian_fit_recovers_mu() -> None:
    rng = SecureRandom.for_testing("fit")
    s0, s1 = rng.normal(20000), rng.normal(20000) + 1.0
    assert gaussian_fit_epsilon(s0, s1, delta=1e-5) == pytest.approx(gaussian_epsilon(mu=1.0, delta=1e-5), rel=0.05)


def test_mechanism_audit_passes_correct_noise_and_catches_weakened_noise() -> None:
    z = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=1.0, steps=1)
    for factor, should_fail in ((1.0, False), (0.1, True)):
        mech = GaussianMechanism(sensitivity=1.0, noise_multiplier=z * factor)
        res = audit_mechanism(lambda x, r, m=mech: m(x, rng=r), without=np.zeros(4), with_canary=np.eye(4)[0],
                              trials=3000, delta=1e-5, rng=SecureRandom.for_testing(f"mech{factor}"))
        if should_fail:
            assert res.epsilon_lower_bound > 2.0
            with pytest.raises(AssertionError, match="claimed 2"):
                assert_below(res, 2.0)
        else:
            assert res.epsilon_lower_bound <= 2.0
            assert_below(res, 2.0)


def test_dp_sgd_audit_passes_correct_code() -> None:
    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=20)
    res = audit_dp_sgd(noise_multiplier=z, steps=20, delta=1e-5, rng=SecureRandom.for_testing("sgd-ok"))
    assert res.details["guesses"] == 100
    assert res.epsilon_lower_bound <= 1.0
    assert_below(res, 1.0)


def test_dp_sgd_audit_catches_noise_divided_by_ten(monkeypatch: pytest.MonkeyPatch) -> None:
    real = dp.sgd.torch_gaussian

    def buggy(numel: int, *, std: float, rng, dtype=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return real(numel, std=std / 10, rng=rng, dtype=dtype)

    monkeypatch.setattr(dp.sgd, "torch_gaussian", buggy)
    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=20)
    res = audit_dp_sgd(noise_multiplier=z, steps=20, delta=1e-5, rng=SecureRandom.for_testing("sgd-bug"))
    assert res.epsilon_lower_bound > 1.0
    with pytest.raises(AssertionError, match="weaker than the accounting"):
        assert_below(res, 1.0)
