"""DP building blocks: L2 clipping, the Gaussian mechanism, and a discrete Gaussian sampler.

All noise comes from a CSPRNG (:class:`dp.rng.SecureRandom`, AES-256-CTR). NumPy's and torch's default
generators are predictable from their output, so noise drawn from them could be subtracted.

Floating-point caveat (Mironov 2012, "On significance of the least significant bits for differential
privacy"): a Gaussian sample computed in floating point (Box-Muller here) does not take every double
value, and the set of reachable ``x + noise`` values depends on ``x``; an attacker who sees the exact
double can sometimes tell neighbouring inputs apart. In federated learning the released value is an
average of many noised updates, further rounded by training, which makes the attack impractical, but
the formal guarantee is for the idealised real-valued mechanism. For integer domains (secure
aggregation's ring) use :func:`discrete_gaussian` (Canonne, Kamath, Steinke 2020): integer noise added
to integers is exact, so the caveat does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray

from dp.errors import InputError, PrivacyParameterError
from dp.rng import SecureRandom

if TYPE_CHECKING:
    import torch

__all__ = [
    "UNIFORM_BITS",
    "GaussianMechanism",
    "NoiseSource",
    "box_muller_max_abs",
    "clip_l2",
    "clip_rows",
    "discrete_gaussian",
    "gaussian_noise",
    "sample_discrete_gaussian_exact",
    "torch_gaussian",
    "truncation_delta",
]

_STD_FIX = "pass noise_multiplier * sensitivity (0 for no noise)"


class NoiseSource(Protocol):
    """What the mechanisms need from a random source (``SecureRandom`` has it)."""

    def bytes(self, n: int) -> bytes: ...

    def uniform(self, n: int) -> NDArray[np.float64]: ...

    def normal(self, n: int, std: float = 1.0) -> NDArray[np.float64]: ...


def clip_l2(x: NDArray[np.floating], bound: float) -> NDArray[np.float64]:
    """Scale ``x`` down so its L2 norm is at most ``bound`` (a copy; unchanged if already inside)."""
    if not (bound > 0 and math.isfinite(bound)):
        raise PrivacyParameterError(f"clip bound must be a positive finite number, got {bound}; pass the L2 norm "
                                    "every vector is clipped to, e.g. bound=1.0")
    v: NDArray[np.float64] = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm):
        raise InputError("cannot clip a vector with NaN or Inf entries; reject it before clipping")
    return v * (bound / norm) if norm > bound else v.copy()


def clip_rows(x: NDArray[np.floating], bound: float) -> NDArray[np.float64]:
    """Clip every row of a 2-D array to L2 norm ``bound`` (per-example clipping)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x * np.minimum(1.0, bound / np.maximum(norms, 1e-300)), dtype=np.float64)


def gaussian_noise(n: int, *, std: float, rng: NoiseSource) -> NDArray[np.float64]:
    """``n`` samples of N(0, std^2) from the CSPRNG ``rng``."""
    if not (std >= 0 and math.isfinite(std)):
        raise PrivacyParameterError(f"noise std must be a finite number >= 0, got {std}; {_STD_FIX}")
    if std == 0:
        return np.zeros(n)
    return rng.normal(n, std)


UNIFORM_BITS = 53
"""Random bits per uniform in every Gaussian sampler here (float64 precision, from 64-bit CSPRNG words)."""


def box_muller_max_abs(bits: int = UNIFORM_BITS) -> float:
    """The largest ``|z|`` Box-Muller can output from ``bits``-bit uniforms, in units of sigma.

    The radius is ``sqrt(-2 ln u1)`` with ``u1`` in ``{2^-bits, ..., 1}``, so it is at most
    ``sqrt(2 bits ln 2)``: 5.77 for 24-bit uniforms (float32), 8.57 for 53-bit ones (float64).
    """
    return math.sqrt(2.0 * bits * math.log(2.0))


def truncation_delta(*, noise_multiplier: float, sample_rate: float, steps: int, dim: int,
                     bits: int = UNIFORM_BITS) -> float:
    """An upper bound on the delta the accountant does not charge for Box-Muller's cut-off tails.

    Box-Muller on ``bits``-bit uniforms puts each coordinate pair at radius ``sqrt(-2 ln u1)`` with ``u1``
    on the grid ``{2^-bits, ..., 1}``, never beyond ``R =`` :func:`box_muller_max_abs`. An observer of
    ``x + noise`` learns that the example is present whenever the output is outside the support of the
    example-free output, i.e. the shifted noise leaves the radius-``R`` disc in some pair. A step that
    includes the example (probability ``q``) shifts pair ``i`` by ``t_i`` sigma, ``sum t_i^2 <= D^2`` with
    ``D = 1/z``; leaving needs radius ``> R - t_i``, of probability ``P[u1 < h(t_i)] <= h(t_i)``,
    ``h(t) = exp(-(R - t)^2 / 2)``. ``h`` is convex on ``[0, D]`` when ``R - D > 1``, so
    ``h(t) <= 2^-bits + t h'(D)``, and over the ``k = ceil(dim / 2)`` pairs (Cauchy-Schwarz):
    ``p <= k 2^-bits + h'(D) D sqrt(k)``. Over ``steps`` steps, ``delta <= 1 - (1 - q p)^steps``.
    Returns 1.0 (no bound) when ``R - D <= 1``.
    """
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise PrivacyParameterError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}; "
                                    "pass the multiplier the run uses (no noise has no tails to bound)")
    if not 0 < sample_rate <= 1 or steps < 1 or dim < 1:
        raise PrivacyParameterError(f"need 0 < sample_rate <= 1, steps >= 1 and dim >= 1, got {sample_rate}, "
                                    f"{steps}, {dim}; pass the run's sample rate, step count and vector length")
    big_r, shift = box_muller_max_abs(bits), 1.0 / noise_multiplier
    if big_r - shift <= 1:
        return 1.0
    pairs = (dim + 1) // 2
    slope = (big_r - shift) * math.exp(-((big_r - shift) ** 2) / 2)  # h'(D)
    p = pairs * 2.0**-bits + slope * shift * math.sqrt(pairs)
    if p >= 1:
        return 1.0
    return -math.expm1(steps * math.log1p(-sample_rate * p))


def torch_gaussian(numel: int, *, std: float, rng: NoiseSource, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``numel`` samples of N(0, std^2) as a torch tensor, from CSPRNG bytes (Box-Muller in torch).

    Both uniforms of each pair have 53 random bits (one 64-bit CSPRNG word each, ``(w >> 11) * 2^-53``);
    the radius uniform is ``(k + 1) * 2^-53`` in ``(0, 1]``, so the log is finite and the tails reach
    :func:`box_muller_max_abs` = 8.57 sigma (24-bit uniforms stopped at 5.77 sigma, an uncharged delta
    above 1e-5 for long DP-SGD runs: see :func:`truncation_delta`). The radius is computed in float64,
    the angle and the product in ``dtype``. This is the fast path DP-SGD uses each step (a few hundred
    thousand samples in about two milliseconds).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if not (std >= 0 and math.isfinite(std)):
        raise PrivacyParameterError(f"noise std must be a finite number >= 0, got {std}; {_STD_FIX}")
    if std == 0:
        return torch.zeros(numel, dtype=dtype)
    m = (numel + 1) // 2
    words = np.frombuffer(rng.bytes(16 * m), dtype=np.uint64) >> np.uint64(64 - UNIFORM_BITS)
    scale = 2.0**-UNIFORM_BITS
    u1 = torch.from_numpy(words[:m].astype(np.float64))
    r = u1.add_(1.0).mul_(scale).log_().mul_(-2.0 * std * std).sqrt_().to(dtype)
    theta = torch.from_numpy(words[m:].astype(np.float64)).mul_(2.0 * math.pi * scale).to(dtype)
    out = torch.empty(2 * m, dtype=dtype)
    torch.cos(theta, out=out[:m]).mul_(r)
    torch.sin(theta, out=out[m:]).mul_(r)
    return out[:numel]


@dataclass(frozen=True, slots=True)
class GaussianMechanism:
    """Release ``f(D) + N(0, (noise_multiplier * sensitivity)^2 I)`` for an L2-bounded ``f``.

    ``epsilon(delta)`` is the tight (PLD) epsilon of a single release.
    """

    sensitivity: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
            raise PrivacyParameterError(f"sensitivity must be a positive finite number, got {self.sensitivity}; "
                                        "pass the L2 sensitivity of the value (e.g. the clip norm)")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyParameterError(f"noise_multiplier must be a positive finite number, got "
                                        f"{self.noise_multiplier}; pass the noise std over the sensitivity, "
                                        "e.g. from dp.accounting.calibrate_noise")

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    def __call__(self, value: NDArray[np.floating], *, rng: NoiseSource) -> NDArray[np.float64]:
        v = np.asarray(value, dtype=np.float64)
        return v + gaussian_noise(v.size, std=self.std, rng=rng).reshape(v.shape)

    def epsilon(self, delta: float) -> float:
        from dp.accounting import compute_epsilon

        return compute_epsilon(noise_multiplier=self.noise_multiplier, delta=delta, sample_rate=1.0, steps=1)


# ---- discrete Gaussian (Canonne, Kamath, Steinke 2020) ----------------------------------------------


def _uniform_int(rng: NoiseSource, n: int) -> int:
    """A uniform integer in [0, n) by rejection on CSPRNG bytes (no modulo bias)."""
    if n <= 0:
        raise InputError(f"a uniform integer in [0, n) needs n >= 1, got {n}; pass a positive range")
    k = max(1, (n.bit_length() + 7) // 8)
    limit = (256**k // n) * n
    while True:
        v = int.from_bytes(rng.bytes(k), "big")
        if v < limit:
            return v % n


def _bernoulli(rng: NoiseSource, p: Fraction) -> bool:
    return _uniform_int(rng, p.denominator) < p.numerator


def _bernoulli_exp(rng: NoiseSource, gamma: Fraction) -> bool:
    """Exact Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS 2020, Algorithm 1)."""
    while gamma > 1:
        if not _bernoulli_exp(rng, Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(rng, gamma / k):
        k += 1
    return k % 2 == 1


def _discrete_laplace(rng: NoiseSource, t: int) -> int:
    """Exact discrete Laplace with scale ``t`` (P[y] proportional to exp(-|y|/t)) (CKS 2020, Algorithm 2)."""
    while True:
        u = _uniform_int(rng, t)
        if not _bernoulli_exp(rng, Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp(rng, Fraction(1)):
            v += 1
        x = u + t * v
        y = int(x)
        negative = _bernoulli(rng, Fraction(1, 2))
        if negative and y == 0:
            continue
        return -y if negative else y


def sample_discrete_gaussian_exact(sigma2: Fraction | int, *, rng: NoiseSource) -> int:
    """One exact sample of the discrete Gaussian N_Z(0, sigma2) (CKS 2020, Algorithm 3).

    Uses only rational arithmetic and CSPRNG integers, so the output distribution is exactly the
    discrete Gaussian. Slow (pure Python); :func:`discrete_gaussian` is the vectorised version.
    """
    sigma2 = Fraction(sigma2)
    if sigma2 <= 0:
        raise PrivacyParameterError(f"sigma2 must be positive, got {sigma2}; pass the variance sigma^2 > 0 of the "
                                    "discrete Gaussian")
    t = math.floor(math.sqrt(sigma2)) + 1
    while True:
        y = _discrete_laplace(rng, t)
        c = _bernoulli_exp(rng, (abs(y) - sigma2 / t) ** 2 / (2 * sigma2))
        if c:
            return y


def discrete_gaussian(n: int, *, sigma: float, rng: NoiseSource) -> NDArray[np.int64]:
    """``n`` samples of the discrete Gaussian N_Z(0, sigma^2), vectorised (CKS 2020 rejection sampler).

    Same algorithm as :func:`sample_discrete_gaussian_exact` (discrete Laplace proposal with scale
    ``t = floor(sigma) + 1``, accept with probability ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``), but the
    geometric draws and acceptance tests use float64 probabilities on 53-bit CSPRNG uniforms, so the
    distribution is exact up to float64 rounding of those probabilities (relative error ~1e-16), while the
    output itself is exact integers.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise PrivacyParameterError(f"sigma must be a positive finite number, got {sigma}; pass the noise std in "
                                    "grid units (noise multiplier * sensitivity / granularity)")
    t = math.floor(sigma) + 1
    out = np.empty(0, dtype=np.int64)
    log_keep = -1.0 / t  # geometric with P[G >= k] = exp(-k/t)
    while out.size < n:
        m = max(64, int(1.5 * (n - out.size)) + 16)
        u = rng.uniform(3 * m)
        g = np.floor(np.log1p(-u[:m]) / log_keep).astype(np.int64)
        sign_neg = u[m : 2 * m] < 0.5
        ok = ~(sign_neg & (g == 0))  # reject -0 so 0 is not counted twice
        y = np.where(sign_neg, -g, g)
        accept = u[2 * m :] < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        out = np.concatenate([out, y[ok & accept]])
    return out[:n]


def discrete_gaussian_std(sigma: float) -> float:
    """The standard deviation of N_Z(0, sigma^2) (at most sigma; equal to it up to 1e-9 for sigma >= 1)."""
    r = math.ceil(12 * sigma) + 1
    ks = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-(ks**2) / (2 * sigma * sigma))
    return float(math.sqrt(float(np.sum(ks**2 * w) / np.sum(w))))


def default_rng() -> SecureRandom:
    """A fresh CSPRNG keyed from ``os.urandom`` (production noise)."""
    return SecureRandom()
