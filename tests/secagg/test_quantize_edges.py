"""Quantizer edges: +-bound never wraps, every ring up to 2^63 decodes exactly (issue 9, quantizer flaw)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.ring import MAX_RING_BITS, Quantizer, to_signed

ALMOST_ONE = 1.0 - 2.0**-53

edge_x = st.sampled_from(["bound", "-bound", "below", "-below", "zero"])


@settings(max_examples=300, deadline=None)
@given(
    bits=st.integers(2, 48),
    bound=st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False),
    which=edge_x,
    u=st.sampled_from([0.0, 0.5, ALMOST_ONE]),
    log_cohort=st.integers(0, 15),
)
def test_edge_values_stay_in_range_and_keep_their_sign(
    bits: int, bound: float, which: str, u: float, log_cohort: int
) -> None:
    cohort = 1 << log_cohort
    if bits + log_cohort > MAX_RING_BITS:
        return
    q = Quantizer(bound=bound, value_bits=bits, cohort=cohort)
    below = float(np.nextafter(bound, 0.0))
    x = {"bound": bound, "-bound": -bound, "below": below, "-below": -below, "zero": 0.0}[which]
    enc = q.encode(np.array([x]), lambda n: np.full(n, u))
    signed = int(to_signed(enc, q.ring_bits)[0])
    top = (1 << (bits - 1)) - 1
    assert -top <= signed <= top  # never 2^(bits-1): that wrapped to -bound in a ring of `bits` bits
    dec = float(q.decode(enc, 1)[0])
    assert abs(dec - x) <= q.max_error(1) + 1e-12 * bound
    if x != 0:
        assert np.sign(dec) in (0.0, np.sign(x))
    total = (enc.astype(np.uint64) * np.uint64(cohort)) & np.uint64(q.modulus - 1)  # every client at the edge
    got = float(q.decode(total, cohort)[0])
    assert abs(got - cohort * x) <= q.max_error(cohort) + 1e-9 * cohort * bound


def test_plus_bound_with_rounding_noise_near_one_does_not_wrap() -> None:
    """Regression: bits 40-48, x = +bound and u close to 1 reached 2^(bits-1) and decoded as -bound."""
    wrapped = 0
    for bits in range(40, 49):
        for bound in np.random.default_rng(0).uniform(0.1, 10, 100):
            q = Quantizer(bound=float(bound), value_bits=bits, cohort=1)
            dec = q.decode(q.encode(np.array([bound]), lambda n: np.full(n, ALMOST_ONE)), 1)
            wrapped += int(dec[0] < 0)
    assert wrapped == 0


def test_a_63_bit_ring_decodes_exactly() -> None:
    """Regression: a 63-bit ring passed bind and raised OverflowError in decode."""
    q = Quantizer(bound=1.0, value_bits=48, cohort=1 << 15)
    assert q.ring_bits == 63
    enc = q.encode(np.array([1.0, -1.0, 0.0]), lambda n: np.zeros(n))
    assert np.allclose(q.decode(enc, 1), [1.0, -1.0, 0.0], atol=q.max_error(1))
    total = (enc * np.uint64(1 << 15)) & np.uint64(q.modulus - 1)
    assert np.allclose(q.decode(total, 1 << 15), [2.0**15, -(2.0**15), 0.0], atol=q.max_error(1 << 15))


@given(bits=st.integers(1, 64), words=st.lists(st.integers(0, 2**64 - 1), max_size=8))
def test_to_signed_is_twos_complement(bits: int, words: list[int]) -> None:
    got = to_signed(np.array(words, dtype=np.uint64), bits)
    for w, g in zip(words, got, strict=True):
        v = w % (1 << bits)
        assert int(g) == (v - (1 << bits) if v >= 1 << (bits - 1) else v)
