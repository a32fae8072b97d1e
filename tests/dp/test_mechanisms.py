"""Mechanisms: clipping, CSPRNG Gaussian noise, the discrete Gaussian sampler."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dp.accounting import compute_epsilon
from dp.mechanisms import (
    GaussianMechanism,
    clip_l2,
    clip_rows,
    discrete_gaussian,
    discrete_gaussian_std,
    gaussian_noise,
    sample_discrete_gaussian_exact,
    torch_gaussian,
)
from dp.rng import SecureRandom


@settings(max_examples=50, deadline=None)
@given(x=arrays(np.float64, st.integers(1, 40), elements=st.floats(-1e3, 1e3)), bound=st.floats(0.01, 100))
def test_clip_l2_bounds_norm_and_keeps_direction(x: np.ndarray, bound: float) -> None:
    y = clip_l2(x, bound)
    norm = float(np.linalg.norm(x))
    assert np.linalg.norm(y) <= bound * (1 + 1e-12)
    if norm <= bound:
        np.testing.assert_array_equal(y, x)
    else:
        np.testing.assert_allclose(y * norm / bound, x, rtol=1e-9, atol=1e-9)


def test_clip_rejects_nan_and_bad_bounds() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_l2(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        clip_l2(np.ones(3), 0.0)


def test_clip_rows_is_per_example() -> None:
    x = np.array([[3.0, 4.0], [0.3, 0.4]])
    np.testing.assert_allclose(clip_rows(x, 1.0), [[0.6, 0.8], [0.3, 0.4]])


def test_gaussian_noise_has_the_right_moments() -> None:
    z = gaussian_noise(200_000, std=2.5, rng=SecureRandom.for_testing(0))
    assert abs(z.mean()) < 0.03
    assert z.std() == pytest.approx(2.5, rel=0.01)
    assert np.all(gaussian_noise(5, std=0.0, rng=SecureRandom.for_testing(0)) == 0)


def test_torch_gaussian_moments_and_seam() -> None:
    a = torch_gaussian(100_001, std=3.0, rng=SecureRandom.for_testing(1))
    b = torch_gaussian(100_001, std=3.0, rng=SecureRandom.for_testing(1))
    assert a.shape == (100_001,)
    assert bool((a == b).all())
    assert float(a.std()) == pytest.approx(3.0, rel=0.02)
    assert abs(float(a.mean())) < 0.05


def test_noise_differs_without_the_seam() -> None:
    a, b = (gaussian_noise(8, std=1.0, rng=SecureRandom()) for _ in range(2))
    assert not np.array_equal(a, b)


def test_gaussian_mechanism_epsilon_is_the_single_release() -> None:
    mech = GaussianMechanism(sensitivity=2.0, noise_multiplier=3.0)
    assert mech.std == 6.0
    assert mech.epsilon(1e-5) == pytest.approx(
        compute_epsilon(noise_multiplier=3.0, delta=1e-5, sample_rate=1.0, steps=1)
    )
    out = mech(np.zeros(50_000), rng=SecureRandom.for_testing(2))
    assert out.std() == pytest.approx(6.0, rel=0.02)


def _dg_pmf(sigma: float, ks: np.ndarray) -> np.ndarray:
    r = np.arange(-int(15 * sigma) - 5, int(15 * sigma) + 6)
    norm = np.exp(-(r**2) / (2 * sigma * sigma)).sum()
    return np.exp(-(ks**2) / (2 * sigma * sigma)) / norm


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_discrete_gaussian_matches_its_pmf(sigma: float) -> None:
    n = 100_000
    x = discrete_gaussian(n, sigma=sigma, rng=SecureRandom.for_testing(f"dg{sigma}"))
    assert x.dtype == np.int64 and x.shape == (n,)
    lo, hi = int(x.min()), int(x.max())
    ks = np.arange(lo, hi + 1)
    emp = np.bincount(x - lo, minlength=ks.size) / n
    tv = 0.5 * np.abs(emp - _dg_pmf(sigma, ks)).sum()
    assert tv < 0.02 if sigma < 10 else tv < 0.06  # sampling error only
    assert x.std() == pytest.approx(discrete_gaussian_std(sigma), rel=0.02)
    assert abs(x.mean()) < 4 * sigma / math.sqrt(n)


def test_exact_discrete_gaussian_sampler() -> None:
    rng = SecureRandom.for_testing("exact")
    xs = np.array([sample_discrete_gaussian_exact(Fraction(4), rng=rng) for _ in range(3000)])
    assert xs.dtype.kind == "i"
    assert xs.var() == pytest.approx(discrete_gaussian_std(2.0) ** 2, rel=0.1)
    assert abs(xs.mean()) < 0.2
    with pytest.raises(ValueError):
        sample_discrete_gaussian_exact(0, rng=rng)
