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

from collections.abc import Callable, Sequence
from functools import lru_cache

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "combine",
    "decode_share",
    "encode_share",
    "interpolate",
    "lagrange_at_zero",
    "split",
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
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and in [1, p)")
    if coefficients is None:
        if random_bytes is None:
            raise ValueError("split needs random_bytes (a CSPRNG) or explicit coefficients")
        coeffs = [_random_element(random_bytes) for _ in range(threshold - 1)]
    else:
        coeffs = [c % PRIME for c in coefficients]
        if len(coeffs) != threshold - 1:
            raise ValueError(f"need {threshold - 1} coefficients, got {len(coeffs)}")
    poly = [int.from_bytes(secret, "big"), *coeffs]
    out = []
    for x in xs:
        acc = 0
        for c in reversed(poly):  # Horner
            acc = (acc * x + c) % PRIME
        out.append(acc)
    return out


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
