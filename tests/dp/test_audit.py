"""Audits: the reference values, and each audit passes correct code and catches a planted bug."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import dp.sgd
from dp.accounting import calibrate_noise, compute_epsilon, gaussian_epsilon
from dp.audit import (
    Claim,
    assert_below,
    audit_dp_sgd,
    audit_gaussian_mechanism,
    audit_mechanism,
    clopper_pearson,
    epsilon_for_mu,
    epsilon_lower_bound,
    gaussian_fit_epsilon,
    gdp_mu_interval,
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


def _weaken_dp_sgd_noise(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """PLANTED BUG: DP-SGD's noise std divided by ``factor``."""
    real = dp.sgd.torch_gaussian

    def buggy(numel: int, *, std: float, rng, dtype=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return real(numel, std=std / factor, rng=rng, dtype=dtype)

    monkeypatch.setattr(dp.sgd, "torch_gaussian", buggy)


def test_gdp_mu_interval_is_exact_under_its_model() -> None:
    # coverage of the one-sided 90% bounds over 300 simulated audits with known mu = 0.8
    rng = SecureRandom.for_testing("coverage")
    lo_miss = hi_miss = 0
    for _ in range(300):
        s0, s1 = rng.normal(60) * 2.0 + 5.0, rng.normal(40) * 2.0 + 5.0 + 0.8 * 2.0
        mu, lo, hi = gdp_mu_interval(s0, s1, confidence=0.9)
        assert lo <= mu <= hi
        lo_miss += lo > 0.8
        hi_miss += hi < 0.8
    assert 0.05 * 300 <= lo_miss <= 0.15 * 300 and 0.05 * 300 <= hi_miss <= 0.15 * 300
    # large samples: the noncentral t bound is the normal-approximation one
    s0, s1 = rng.normal(20000), rng.normal(20000) + 1.0
    mu, lo, _ = gdp_mu_interval(s0, s1, confidence=0.95)
    se = np.sqrt(2 / 20000 * (1 + mu**2 / 4))
    assert lo == pytest.approx(mu - stats.norm.ppf(0.95) * se, abs=2e-3)
    with pytest.raises(ValueError, match="finite"):
        gdp_mu_interval([0.0, np.nan, 1.0], [1.0, 2.0])


def test_epsilon_for_mu_composes_like_the_accountant() -> None:
    assert epsilon_for_mu(0.5, delta=1e-5, releases=16) == pytest.approx(gaussian_epsilon(mu=2.0, delta=1e-5))
    assert epsilon_for_mu(1 / 1.1, delta=1e-5, releases=100, sample_rate=0.01) == pytest.approx(
        compute_epsilon(noise_multiplier=1.1, delta=1e-5, sample_rate=0.01, steps=100))
    assert epsilon_for_mu(0.0, delta=1e-5) == 0.0
    claim = Claim(epsilon=1.0, delta=1e-5, releases=20)
    assert claim.epsilon_of(1 / claim.noise_multiplier()) <= 1.0


def test_dp_sgd_audit_passes_correct_code() -> None:
    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=20)
    res = audit_dp_sgd(noise_multiplier=z, steps=20, delta=1e-5, confidence=0.99,
                       rng=SecureRandom.for_testing("sgd-ok"))
    assert res.details["observations"] == 1000 and res.method.startswith("gdp-fit")
    assert res.details["noise_multiplier_lower"] <= z <= res.details["noise_multiplier_upper"]
    assert res.epsilon_lower_bound <= 1.0
    assert_below(res, 1.0)


def test_dp_sgd_audit_catches_noise_divided_by_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 10): the one-run audit let noise / 2 through; the Gaussian-DP fit catches it."""
    _weaken_dp_sgd_noise(monkeypatch, 2.0)
    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=20)
    res = audit_dp_sgd(noise_multiplier=z, steps=20, delta=1e-5, confidence=0.99, runs=2,
                       rng=SecureRandom.for_testing("sgd-bug2"))
    assert res.epsilon_lower_bound > 1.0
    assert res.details["noise_multiplier_upper"] < z  # the measured noise is provably below the claimed one
    with pytest.raises(AssertionError, match="weaker than the accounting"):
        assert_below(res, 1.0)


def test_dp_sgd_audit_composes_a_sampled_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    # the README's claim: q = 256/60000, z = 1.1, 14,062 steps; audited with 10 full-batch steps
    claim = Claim(epsilon=compute_epsilon(noise_multiplier=1.1, delta=1e-5, sample_rate=256 / 60000, steps=14062),
                  delta=1e-5, releases=14062, sample_rate=256 / 60000)
    ok = audit_dp_sgd(noise_multiplier=1.1, steps=10, claim=claim, confidence=0.99, rng=SecureRandom.for_testing(5))
    assert claim.epsilon is not None and ok.epsilon_lower_bound <= claim.epsilon
    _weaken_dp_sgd_noise(monkeypatch, 2.0)
    bug = audit_dp_sgd(noise_multiplier=1.1, steps=10, claim=claim, confidence=0.99, rng=SecureRandom.for_testing(5))
    assert bug.epsilon_lower_bound > claim.epsilon


def test_dp_sgd_one_run_method_is_still_available(monkeypatch: pytest.MonkeyPatch) -> None:
    _weaken_dp_sgd_noise(monkeypatch, 10.0)
    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=20)
    res = audit_dp_sgd(noise_multiplier=z, steps=20, delta=1e-5, method="one-run",
                       rng=SecureRandom.for_testing("sgd-bug"))
    assert res.details["guesses"] == 100 and res.method == "one-run dp-sgd"
    assert res.epsilon_lower_bound > 1.0


def test_gaussian_mechanism_audit_catches_half_noise() -> None:
    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=1)
    ok = audit_gaussian_mechanism(GaussianMechanism(sensitivity=2.0, noise_multiplier=z), sensitivity=2.0,
                                  confidence=0.99, rng=SecureRandom.for_testing("m1"))
    bug = audit_gaussian_mechanism(GaussianMechanism(sensitivity=2.0, noise_multiplier=z / 2), sensitivity=2.0,
                                   confidence=0.99, rng=SecureRandom.for_testing("m2"))
    assert ok.epsilon_lower_bound <= 1.0 < bug.epsilon_lower_bound
