"""The SecAgg / SecAgg+ pipeline sums end to end: clip, quantize, mask, sum, decode within the bound."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import RoundInfo, ValueSpec
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.errors import AbortError

SESSION = b"test-session"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 10),
    drops=st.dictionaries(st.integers(0, 9), st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
    plus=st.booleans(),
)
def test_pipeline_float_sum_within_quantization_bound(n: int, drops: dict[int, int], seed: int, plus: bool) -> None:
    d = 50
    ssum = SecAggPlus(threshold=0.6, neighbours=4) if plus else SecAgg(threshold=0.6)
    bound = Pipeline([Clip(l2=1.0), Quantize(bits=16)], sum=ssum).bind(ValueSpec(size=d, cohort=n))
    rng = np.random.default_rng(seed)
    xs = {c: rng.normal(size=d) * rng.uniform(0.1, 2.0) for c in range(n)}
    enc = {c: bound.encode(x, SecureRandom.for_testing(f"{seed}-{c}")) for c, x in xs.items()}
    sched = DropoutSchedule({c: p for c, p in drops.items() if c < n})
    try:
        out = run_secure_sum(
            ssum,
            enc,
            spec=bound.sum_spec,
            session=SESSION,
            round=0,
            dropouts=sched,
            reorder=np.random.default_rng(seed),
        )
    except AbortError:
        assert drops  # only dropouts can make the round abort
        return
    info = RoundInfo(round=0, planned=tuple(range(n)), included=out.included, population=n, sample_rate=1.0)
    got = bound.decode(out.total, info, SecureRandom.for_testing("server"))
    want = sum(
        (np.asarray(Clip(l2=1.0).encode(xs[c], bound.specs[0], SecureRandom.for_testing(0))) for c in out.included),
        np.zeros(d),
    )
    q = Quantize(bits=16).quantizer(bound.specs[1])
    assert np.max(np.abs(got - want)) <= q.max_error(len(out.included)) + 1e-12
