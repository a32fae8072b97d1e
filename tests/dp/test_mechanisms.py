"""Mechanisms: clipping, CSPRNG Gaussian noise, the discrete Gaussian sampler."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from dp.accounting import compute_epsilon
from dp.mechanisms import (
    UNIFORM_BITS,
    GaussianMechanism,
    box_muller_max_abs,
    clip_l2,
    clip_rows,
    discrete_gaussian,
    discrete_gaussian_std,
    gaussian_noise,
    sample_discrete_gaussian_exact,
    torch_gaussian,
    truncation_delta,
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


class _ConstantBytes:
    """A NoiseSource whose keystream is one repeated byte: drives Box-Muller to the grid's extremes."""

    def __init__(self, byte: int) -> None:
        self.byte = byte

    def bytes(self, n: int) -> bytes:
        return bytes([self.byte]) * n

    def uniform(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def normal(self, n: int, std: float = 1.0) -> np.ndarray:
        raise NotImplementedError


def test_box_muller_support_bound_is_the_53_bit_one() -> None:
    # analytic: the smallest radius uniform is 2^-53, so |z| <= sqrt(2 * 53 * ln 2) = 8.57 sigma
    assert box_muller_max_abs(53) == pytest.approx(math.sqrt(-2 * math.log(2.0**-53)))
    assert box_muller_max_abs(53) > 8.5 and box_muller_max_abs(24) < 5.8
    assert UNIFORM_BITS >= 53
    # the sampler reaches it: all-zero and all-one keystreams give the extreme radius uniforms
    # (the old 24-bit sampler topped out at 5.77 sigma on these inputs)
    for std, dtype in ((1.0, torch.float64), (2.0, torch.float32)):
        peak = max(float(torch_gaussian(64, std=std, rng=_ConstantBytes(b), dtype=dtype).abs().max()) for b in (0, 255))
        assert peak >= 8.5 * std
        assert peak <= box_muller_max_abs(UNIFORM_BITS) * std * (1 + 1e-6)  # never inf, never beyond the bound
    # SecureRandom.normal (the numpy path of every other Gaussian here) has the same 53-bit radius
    rng = SecureRandom.for_testing("tails")
    z = rng.normal(400_000)
    assert np.isfinite(z).all() and np.abs(z).max() < box_muller_max_abs(53)


def test_uncharged_truncation_delta_is_far_below_the_budget() -> None:
    """The README's DP-SGD setting (q = 256/60000, z = 1.1, 14,062 steps, delta = 1e-5)."""
    q, z, steps = 256 / 60000, 1.1, 14_062
    # the issue's estimate for 24-bit uniforms: one coordinate's Gaussian tail beyond R - 1/z, per included step
    tail_24 = stats.norm.sf(box_muller_max_abs(24) - 1 / z)
    issue_24 = 1 - (1 - q * tail_24) ** steps
    assert issue_24 > 1e-5  # the flaw: above the claimed delta
    assert truncation_delta(noise_multiplier=z, sample_rate=q, steps=steps, dim=1, bits=24) >= issue_24  # upper bound
    # with 53-bit uniforms, even for a million parameters, it is >= 100x below the budget
    for dim in (1, 85_000, 1_000_000):
        assert truncation_delta(noise_multiplier=z, sample_rate=q, steps=steps, dim=dim) < 1e-7
    assert truncation_delta(noise_multiplier=z, sample_rate=q, steps=steps, dim=1) < 1e-9
    with pytest.raises(ValueError, match="noise_multiplier"):
        truncation_delta(noise_multiplier=0.0, sample_rate=q, steps=steps, dim=1)


def test_torch_gaussian_is_standard_normal() -> None:
    z = torch_gaussian(200_000, std=1.0, rng=SecureRandom.for_testing("ks"), dtype=torch.float64).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    with pytest.raises(ValueError, match="std"):
        torch_gaussian(4, std=-1.0, rng=SecureRandom.for_testing(0))


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
