"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

The secrets are 32-byte strings (a self-mask seed, an X25519 private key), read as integers below
2^256 < p, so one field element holds one secret. The Mersenne prime makes uniform sampling trivial
(521 random bits are uniform in [0, p] except for the single value p, which is rejected).

Reconstruction uses exactly ``t`` shares: Lagrange coefficients at 0 depend only on the evaluation
points, so they are computed once per point set and cached -- a server reconstructing many secrets
from the same responders pays O(t^2) once and O(t) per secret. Python integers do the arithmetic; with
521-bit numbers this is microseconds per operation (the peer's pure-Python GF(2^128) spends 95% of its
server time here).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "combine",
    "combine_many",
    "combine_points",
    "combine_table",
    "combine_with",
    "decode_share",
    "encode_share",
    "interpolate",
    "lagrange_at_zero",
    "lagrange_batch",
    "split",
    "split_many",
]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
"""Bytes of one share's value (521 bits)."""
SECRET_BYTES = 32


def _random_element(random_bytes: Callable[[int], bytes]) -> int:
    while True:
        v = int.from_bytes(random_bytes(SHARE_BYTES), "big") & PRIME  # 521 bits
        if v < PRIME:
            return v


def _check_split(secret: bytes, xs: Sequence[int], threshold: int) -> None:
    """The checks every split makes: a 32-byte secret, 1 <= threshold <= len(xs), distinct points in [1, p)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and in [1, p)")


def split(
    secret: bytes,
    xs: Sequence[int],
    *,
    threshold: int,
    random_bytes: Callable[[int], bytes] | None = None,
    coefficients: Sequence[int] | None = None,
) -> list[int]:
    """Share a 32-byte ``secret`` at evaluation points ``xs`` (distinct, in [1, p)); any ``threshold`` recover it.

    Coefficients 1..t-1 of the polynomial come from ``random_bytes`` (a CSPRNG), or from ``coefficients``
    (the named seam for known-answer vectors).
    """
    _check_split(secret, xs, threshold)
    if coefficients is None:
        if random_bytes is None:
            raise ValueError("split needs random_bytes (a CSPRNG) or explicit coefficients")
        coeffs = [_random_element(random_bytes) for _ in range(threshold - 1)]
    else:
        coeffs = [c % PRIME for c in coefficients]
        if len(coeffs) != threshold - 1:
            raise ValueError(f"need {threshold - 1} coefficients, got {len(coeffs)}")
    poly = [int.from_bytes(secret, "big"), *coeffs][::-1]
    out = []
    for x in xs:
        acc = 0
        if x < 1 << 32:  # small points (client ids): Horner without reductions, then one
            for c in poly:
                acc = acc * x + c
            out.append(acc % PRIME)
            continue
        for c in poly:  # Horner
            acc = (acc * x + c) % PRIME
        out.append(acc)
    return out


def split_many(
    secrets: Sequence[bytes], xs: Sequence[int], *, threshold: int, random_bytes: Callable[[int], bytes]
) -> list[list[int]]:
    """:func:`split` of several secrets at the same points ``xs``: the same shares, from the same draws of
    ``random_bytes`` (secret by secret, as one call each), in one Horner pass.

    The polynomials are packed side by side into one integer, in lanes wide enough that no lane carries
    into the next (points are small), so a client sharing b and s_sk pays for one polynomial, not two.
    """
    forward = [split_coefficients(sec, xs, threshold=threshold, random_bytes=random_bytes) for sec in secrets]
    if not forward or max(xs) >= 1 << 32:  # large points: one plain split each
        return [split(s, xs, threshold=threshold, coefficients=f[1:]) for s, f in zip(secrets, forward, strict=True)]
    polys = [f[::-1] for f in forward]
    width = 8 * SHARE_BYTES + threshold * max(xs).bit_length() + 8  # a lane's sum_j c_j x^j fits
    packed = [sum(p[j] << (i * width) for i, p in enumerate(polys)) for j in range(threshold)]
    mask = (1 << width) - 1
    out: list[list[int]] = [[] for _ in polys]
    for x in xs:
        acc = 0
        for c in packed:
            acc = acc * x + c
        for i, row in enumerate(out):
            row.append(((acc >> (i * width)) & mask) % PRIME)
    return out


def split_coefficients(
    secret: bytes, xs: Sequence[int], *, threshold: int, random_bytes: Callable[[int], bytes]
) -> list[int]:
    """[secret, c_1, ..., c_{t-1}]: the polynomial :func:`split` draws (same checks, same draws)."""
    _check_split(secret, xs, threshold)
    return [int.from_bytes(secret, "big"), *(_random_element(random_bytes) for _ in range(threshold - 1))]


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i), for distinct points ``xs``."""
    if len(set(xs)) != len(xs):
        raise ValueError("evaluation points must be distinct")
    total = 1
    for x in xs:
        total = total * x % PRIME
    dens = []
    for i, xi in enumerate(xs):
        den = xi
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xj - xi) % PRIME
        dens.append(den)
    # l_i = prod_{j != i} x_j / (x_j - x_i) = total / (x_i * prod_{j != i} (x_j - x_i)); one batched inverse.
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        out[i] = total * inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    return tuple(out)


def lagrange_batch(point_sets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """:func:`lagrange_at_zero` for many point sets at once, with a single modular inversion in all.

    Evaluation points are small integers (client id + 1), so each denominator ``x_i prod_{j != i}
    (x_j - x_i)`` is a product of small integers, formed exactly and reduced once; all denominators
    of all sets are then inverted together (Montgomery's trick). A server reconstructing one secret per
    client, each from a different set of share holders, pays O(t^2) small-integer products and O(t)
    field multiplications per set instead of O(t^2) field operations.
    """
    dens: list[int] = []
    totals: list[int] = []
    for xs in point_sets:
        if len(set(xs)) != len(xs):
            raise ValueError("evaluation points must be distinct")
        totals.append(math.prod(xs) % PRIME)
        for xi in xs:
            dens.append(xi * math.prod([xj - xi for xj in xs if xj != xi]) % PRIME)
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inv = pow(prefix[-1], -1, PRIME) if dens else 1
    invs = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        invs[i] = inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    out: list[tuple[int, ...]] = []
    pos = 0
    for xs, total in zip(point_sets, totals, strict=True):
        out.append(tuple(total * invs[pos + i] % PRIME for i in range(len(xs))))
        pos += len(xs)
    return out


def dense_points(xs: Sequence[int]) -> bool:
    """Whether sorted points ``xs`` leave few gaps in ``[1, max(xs)]``: :func:`combine_points` applies."""
    return bool(xs) and xs[0] >= 1 and xs[-1] - len(xs) <= 2 * len(xs)


@lru_cache(maxsize=4096)
def _gap_coefficients(xs: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Integer numerators ``a_i`` and one field factor ``c`` with ``l_i = a_i c`` for points ``xs``.

    For the full range ``1..L`` the Lagrange coefficient at 0 is an integer,
    ``l_i = prod_{j != i} j / (j - i) = (-1)^(i-1) C(L, i)``; each gap ``j`` missing from ``xs``
    multiplies it by ``(j - i) / j``. So ``a_i = (-1)^(i-1) C(L, i) prod_gaps (j - i)`` (exact small
    integers) and ``c = 1 / prod_gaps j`` (one inversion per point set).
    """
    top = xs[-1]
    present = set(xs)
    gaps = [j for j in range(1, top + 1) if j not in present]
    scale = pow(math.prod(gaps) % PRIME, -1, PRIME) if gaps else 1
    signed = _signed_binomials(top)
    if not gaps:
        return tuple(map(signed.__getitem__, xs)), scale
    factor = [1] * (top + 1)  # prod_gaps (j - i) for every i, gap by gap (C-level multiplies per row)
    for j in gaps:
        factor = list(map(operator.mul, factor, range(j, j - top - 1, -1)))
    return tuple(signed[i] * factor[i] for i in xs), scale


@lru_cache(maxsize=256)
def _signed_binomials(top: int) -> tuple[int, ...]:
    """``(-1)^(i-1) C(top, i)`` for i = 0..top."""
    return tuple((1 if i % 2 else -1) * math.comb(top, i) for i in range(top + 1))


def combine_points(shares: Sequence[tuple[int, int]]) -> bytes:
    """The 32-byte secret from shares ``(x, y)`` at points with few gaps (see :func:`dense_points`).

    A share group's points are its members' offsets ``1..k+1``, so the coefficients are binomials:
    reconstruction costs ``len(shares)`` small-by-field multiplications and two reductions, with no
    per-share modular inversion. Raises ``ValueError`` on repeated points or inconsistent shares.
    """
    pts = sorted(shares)
    xs = tuple(x for x, _ in pts)
    if len(set(xs)) != len(xs) or not dense_points(xs):
        raise ValueError("combine_points needs distinct points with few gaps in [1, max]")
    nums, scale = _gap_coefficients(xs)
    acc = sum(a * y for a, (_, y) in zip(nums, pts, strict=True)) % PRIME
    s = acc * scale % PRIME
    if s >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: they do not interpolate a 32-byte secret")
    return s.to_bytes(SECRET_BYTES, "big")


def combine_many(xs: tuple[int, ...], rows: Sequence[Sequence[int]]) -> list[bytes | None]:
    """The 32-byte secrets of many share rows that all use the sorted, distinct points ``xs``.

    The coefficients are found once for the point set (binomials for dense points, else Lagrange), then
    each secret costs ``len(xs)`` multiplications and one reduction. ``None`` marks a row whose shares
    are inconsistent (they do not interpolate a 32-byte secret): the caller names the owner.
    """
    if not all(map(operator.lt, xs, xs[1:])):  # sorted and distinct (C-level: called per point set)
        raise ValueError("combine_many needs sorted, distinct points")
    if dense_points(xs):
        nums, scale = _gap_coefficients(xs)
    else:
        nums, scale = lagrange_at_zero(xs), 1
    limit = 1 << (8 * SECRET_BYTES)
    out: list[bytes | None] = []
    for ys in rows:
        if len(ys) != len(xs):
            raise ValueError(f"a row has {len(ys)} shares for {len(xs)} points")
        s = sum(map(operator.mul, nums, ys)) % PRIME * scale % PRIME
        out.append(s.to_bytes(SECRET_BYTES, "big") if s < limit else None)
    return out


_LIMB_BITS = 16
_LIMB_SUM = 1 << 46
"""Rows whose coefficients have sum |a_i| below this take the limb path: each limb sum
``sum_i a_i * limb_i`` is below 2^46 * 2^16 = 2^62, exact in int64 with room for the carries."""


_TOP_MAX = 60
"""Largest point of a row on the limb path: C(60, 30) < 2^57, so binomials are exact in int64."""


@lru_cache(maxsize=8)
def _binomials(top: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """C(l, i) for l, i <= ``top``, exact in int64, and their log2 (for the overflow bound)."""
    exact = np.array([[math.comb(n, i) for i in range(top + 1)] for n in range(top + 1)], dtype=np.int64)
    return exact, np.log2(np.maximum(exact, 1).astype(np.float64))


def _gap_table(points: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """(gaps, valid): row j's integers in ``[1, max(points[j])]`` that are not points, left-aligned."""
    m = len(points)
    present = np.zeros((m, _TOP_MAX + 1), dtype=bool)
    present[np.arange(m)[:, None], points] = True
    missing = ~present & (np.arange(_TOP_MAX + 1) <= points[:, -1:])
    missing[:, 0] = False
    count = missing.sum(axis=1)
    width = int(count.max()) if m else 0
    r, c = np.nonzero(missing)
    gaps = np.zeros((m, width), dtype=np.int64)
    gaps[r, (np.cumsum(missing, axis=1) - 1)[r, c]] = c
    return gaps, np.arange(width) < count[:, None]


def _limb_coefficients(points: NDArray[np.int64]) -> tuple[NDArray[np.int64], list[int], NDArray[np.bool_]]:
    """(a, scales, ok) with Lagrange coefficients ``l_ji = a_ji scale_j`` for every row ``ok`` for the limb path.

    The gap formula of :func:`_gap_coefficients`, vectorised over rows (a server reconstructs one secret
    per client, each at its own point set): ``a_ji = (-1)^(x-1) C(L, x) prod_gaps (g - x)``, exact in
    int64 where the log2 bound says so, reduced by the row's gcd, ``scale = gcd / prod_gaps g``.
    Rows with large points, many gaps or large coefficients are not ``ok`` (the caller interpolates them
    with Python integers).
    """
    m, t = points.shape
    top = points[:, -1]
    ok = (points[:, 0] >= 1) & (top <= _TOP_MAX) & (top - t <= 2 * t)
    pts = np.where(ok[:, None], points, np.arange(1, t + 1))  # placeholder rows keep the indexing in range
    exact, log2 = _binomials(_TOP_MAX)
    gaps, valid = _gap_table(pts)
    diff = gaps[:, :, None] - pts[:, None, :]  # (m, gaps, t), never 0
    bound = log2[pts[:, -1:], pts] + np.where(valid[:, :, None], np.log2(np.abs(diff)), 0.0).sum(axis=1)
    ok &= bound.max(axis=1, initial=0.0) < 62
    a = np.where(pts % 2 == 1, 1, -1) * exact[pts[:, -1:], pts]
    for c in range(gaps.shape[1]):
        a *= np.where(valid[:, c, None], diff[:, c, :], 1)
    g = np.maximum(np.gcd.reduce(np.abs(a), axis=1), 1)
    a //= g[:, None]
    ok &= np.abs(a).sum(axis=1) < _LIMB_SUM
    inverse: dict[tuple[int, int], int] = {}
    scales = [1] * m
    for j, (row, k, gj) in enumerate(zip(gaps.tolist(), valid.sum(axis=1).tolist(), g.tolist(), strict=True)):
        if k or gj != 1:
            key = (math.prod(row[:k]), gj)
            if key not in inverse:
                inverse[key] = gj * pow(key[0], -1, PRIME) % PRIME
            scales[j] = inverse[key]
    return a, scales, ok


def combine_table(points: NDArray[np.int64], shares: NDArray[np.uint8]) -> list[bytes | None]:
    """The 32-byte secrets of ``m`` share rows at once: row j holds the encoded shares ``shares[j]``
    (``(m, t, SHARE_BYTES)`` bytes, as :func:`encode_share` writes them, values below p) at the sorted,
    distinct points ``points[j]`` (``(m, t)``). Same results as :func:`combine_many` row by row.

    A server reconstructs one secret per client, each from its own point set, so no coefficient set is
    shared by many rows and the cost is the ``m t`` products ``a_i y_i``. Here the coefficients are found
    for all rows at once (:func:`_limb_coefficients`) and the products are one int64 product over
    16-bit limbs of the share values, then a carry pass; each row then costs one conversion and two
    reductions in Python. Other rows take :func:`combine_many`. ``None`` marks a row whose shares do not
    interpolate a 32-byte secret.
    """
    m, t = points.shape
    if shares.shape != (m, t, SHARE_BYTES) or shares.dtype != np.uint8:
        raise ValueError(f"shares must be uint8 of shape ({m}, {t}, {SHARE_BYTES}), got {shares.dtype} {shares.shape}")
    if t > 1 and not bool(np.all(points[:, 1:] > points[:, :-1])):
        raise ValueError("combine_table needs sorted, distinct points in every row")
    out: list[bytes | None] = [None] * m
    if not m:
        return out
    coef, scales, ok = _limb_coefficients(points)
    fast = np.flatnonzero(ok)
    got = _combine_limbs(coef[fast], np.ascontiguousarray(shares[fast]), [scales[j] for j in fast.tolist()])
    for j, secret in zip(fast.tolist(), got, strict=True):
        out[j] = secret
    slow = np.flatnonzero(~ok).tolist()
    for j, secret in zip(slow, _combine_python(points[slow], shares[slow]), strict=True):
        out[j] = secret
    return out


def _combine_python(points: NDArray[np.int64], shares: NDArray[np.uint8]) -> list[bytes | None]:
    """:func:`combine_many` for each row, rows grouped by point set (coefficients found once per set)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, row in enumerate(points.tolist()):
        groups.setdefault(tuple(row), []).append(j)
    out: list[bytes | None] = [None] * len(points)
    for xs, rows in groups.items():
        blobs = [shares[j].tobytes() for j in rows]
        ys = [[int.from_bytes(b[i : i + SHARE_BYTES], "big") for i in range(0, len(b), SHARE_BYTES)] for b in blobs]
        for j, secret in zip(rows, combine_many(xs, ys), strict=True):
            out[j] = secret
    return out


def _combine_limbs(coef: NDArray[np.int64], shares: NDArray[np.uint8], scales: list[int]) -> list[bytes | None]:
    """``scale_j sum_i coef[j, i] y[j, i] mod p`` for every row, with int64 limb sums (see :func:`combine_table`)."""
    if not len(scales):
        return []
    limbs = 8 * SHARE_BYTES // _LIMB_BITS
    acc = np.einsum("mt,mtl->ml", coef, shares.view(">u2").astype(np.int64))  # (m, limbs), most significant first
    low = (1 << _LIMB_BITS) - 1
    for col in range(limbs - 1, 0, -1):  # carries up to the top limb, which keeps the sign
        acc[:, col - 1] += acc[:, col] >> _LIMB_BITS
        acc[:, col] &= low
    top = acc[:, 0].tolist()
    rest = acc[:, 1:].astype(">u2").tobytes()
    width, shift, limit = 2 * (limbs - 1), _LIMB_BITS * (limbs - 1), 1 << (8 * SECRET_BYTES)
    out: list[bytes | None] = []
    for j, (hi, scale) in enumerate(zip(top, scales, strict=True)):
        s = ((hi << shift) + int.from_bytes(rest[j * width : (j + 1) * width], "big")) % PRIME
        if scale != 1:
            s = s * scale % PRIME
        out.append(s.to_bytes(SECRET_BYTES, "big") if s < limit else None)
    return out


def combine_with(coefficients: Sequence[int], ys: Sequence[int]) -> bytes:
    """The 32-byte secret from share values ``ys`` and their Lagrange ``coefficients`` (same order).

    Raises ``ValueError`` if the result is not a 32-byte secret (inconsistent shares).
    """
    s = sum(c * y for c, y in zip(coefficients, ys, strict=True)) % PRIME
    if s >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: they do not interpolate a 32-byte secret")
    return s.to_bytes(SECRET_BYTES, "big")


def combine(shares: Sequence[tuple[int, int]], *, threshold: int) -> bytes:
    """Recover the 32-byte secret from exactly ``threshold`` shares ``(x, y)``.

    Raises ``ValueError`` if the count is wrong, the points repeat, or the result is not a 32-byte secret
    (which exposes most inconsistent share sets).
    """
    if len(shares) != threshold:
        raise ValueError(f"reconstruction takes exactly {threshold} shares, got {len(shares)}")
    pts = sorted(shares)
    coeffs = lagrange_at_zero(tuple(x for x, _ in pts))
    s = sum(c * y for c, (_, y) in zip(coeffs, pts, strict=True)) % PRIME
    if s >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: they do not interpolate a 32-byte secret")
    return s.to_bytes(SECRET_BYTES, "big")


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share has {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share value is not a field element")
    return y


def interpolate(shares: Sequence[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the polynomial through ``shares`` (distinct points): names a share that lies.

    O(t^2); used only on the slow path, after a reconstruction failed its commitment check.
    """
    pts = sorted(shares)
    if len({p for p, _ in pts}) != len(pts):
        raise ValueError("evaluation points must be distinct")
    acc = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        acc = (acc + yi * num * pow(den, -1, PRIME)) % PRIME
    return acc
