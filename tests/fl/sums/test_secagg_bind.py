"""SecAgg's pipeline checks against the peer's flaws: the ring holds the cohort's sum, no silent clipping."""

from __future__ import annotations

import numpy as np
import pytest

from fl.layers.clip import Quantize
from fl.pipeline import Pipeline
from fl.spec import CompositionError, ValueSpec
from fl.sums.secagg import SecAgg
from secagg.errors import OverflowRiskError


def test_overflow_check_uses_the_cohort_and_the_sum_never_wraps() -> None:
    """Peer flaw: the overflow check tested the wrong quantity; the sum wrapped at 1024 clients."""
    n, d = 1500, 4
    # A ring sized for one client's value cannot hold the cohort's sum: refused before any data flows.
    with pytest.raises(CompositionError, match="wrap"):
        SecAgg().bind(ValueSpec(size=d, cohort=n, domain="ring", modulus=1 << 16, value_bits=16))
    with pytest.raises(CompositionError, match="Quantize"):
        SecAgg().bind(ValueSpec(size=d, cohort=n))
    # Quantize sizes the ring for the cohort: 1500 clients all at the bound sum exactly.
    bound = Pipeline([Quantize(bits=8, bound=1.0)], sum=SecAgg()).bind(ValueSpec(size=d, cohort=n))
    q = Quantize(bits=8, bound=1.0).quantizer(bound.specs[0])
    enc = q.encode(np.ones(d), lambda k: np.zeros(k))
    total = np.zeros(d, dtype=np.uint64)
    for _ in range(n):
        total = (total + enc) & np.uint64(q.modulus - 1)
    assert np.allclose(q.decode(total, n), n * 1.0, atol=q.max_error(n))


def test_inputs_outside_the_range_raise_instead_of_clipping() -> None:
    """Peer flaw: inputs silently clipped to +-8. Ours: Quantize raises (and the client refuses out-of-ring values)."""
    bound = Pipeline([Quantize(bits=16, bound=8.0)], sum=SecAgg()).bind(ValueSpec(size=3, cohort=4))
    from dp.rng import SecureRandom

    with pytest.raises(OverflowRiskError, match="exceeds the quantization bound"):
        bound.encode(np.array([0.0, 9.0, 1.0]), SecureRandom.for_testing(1))
    # (the client's own refusal of out-of-ring values: tests/secagg/test_secagg_adversary.py)
