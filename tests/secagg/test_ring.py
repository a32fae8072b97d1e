"""The one headroom rule and the one power-of-two check of :mod:`secagg.ring`, and that every user agrees."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.paillier import PackingPlan
from secagg.paillier.packing import slot_bits_for
from secagg.ring import (
    Quantizer,
    headroom_bits,
    is_power_of_two,
    is_ring_modulus,
    ring_bits,
    ring_bits_for,
    value_bits_for,
)


@given(n=st.integers(1, 2**70))
def test_headroom_is_the_smallest_h_with_2_to_the_h_at_least_n(n: int) -> None:
    h = headroom_bits(n)
    assert (1 << h) >= n
    assert h == 0 or (1 << (h - 1)) < n


def test_headroom_is_exact_where_float_log2_rounds() -> None:
    """Regression: ceil(log2(2^60 + 1)) in floats is 60, so the ring was one bit short for that cohort."""
    assert headroom_bits(2**60 + 1) == 61
    assert ring_bits_for(2, 2**60 + 1) == 63
    with pytest.raises(ValueError, match="cohort must be >= 1"):
        headroom_bits(0)


@given(bits=st.integers(2, 48), n=st.integers(1, 10**6))
def test_every_user_of_the_rule_agrees(bits: int, n: int) -> None:
    assert slot_bits_for(bits, n) == ring_bits_for(bits, n) == bits + headroom_bits(n)
    assert value_bits_for(ring_bits_for(bits, n), n) == bits
    if ring_bits_for(bits, n) <= 63:
        assert Quantizer(1.0, bits, n).ring_bits == ring_bits_for(bits, n)


def test_packing_plan_slots_use_the_rule() -> None:
    plan = PackingPlan(1024, 16, 1000)
    assert plan.slot_bits >= ring_bits_for(16, 1000)


@given(m=st.integers(-4, 2**66))
def test_power_of_two_and_ring_modulus(m: int) -> None:
    pow2 = m >= 1 and any(m == 1 << k for k in range(70))
    assert is_power_of_two(m) == pow2
    assert is_ring_modulus(m) == (pow2 and 2 <= m <= 2**64)
    if is_ring_modulus(m):
        assert 1 << ring_bits(m) == m
    else:
        with pytest.raises(ValueError, match="power of two in \\[2, 2\\^64\\]"):
            ring_bits(m)
