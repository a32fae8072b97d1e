"""The plugin's hypothesis strategies, used the way a user building on the protocol would."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import ValueSpec
from fl.sums.secagg import SecAgg
from fl.testing.strategies import cohorts, dropout_schedules, message_orders, reorder_generators


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cids=cohorts(min_size=3, max_size=7), reorder=reorder_generators())
def test_secagg_sums_exactly_the_survivors_under_drawn_dropouts(data: Any, cids: list[int],
                                                                reorder: np.random.Generator) -> None:
    t = max(2, (2 * len(cids) + 2) // 3)
    sched = data.draw(dropout_schedules(cids, phases=2, min_survivors=t))  # drops before the masked input
    assert isinstance(sched, DropoutSchedule)
    assert len(cids) - len(sched.drops) >= t
    modulus = 1 << 20
    spec = ValueSpec(size=5, cohort=len(cids), domain="ring", modulus=modulus, value_bits=16)
    rng = np.random.default_rng(len(cids))
    values = {c: rng.integers(0, modulus, 5, dtype=np.uint64) for c in cids}
    out = run_secure_sum(SecAgg(threshold=t), values, spec=spec, session=b"strategies", dropouts=sched,
                         reorder=reorder)
    survivors = [c for c in cids if c not in sched.drops]
    assert sorted(out.included) == survivors
    want = np.zeros(5, dtype=np.uint64)
    for c in survivors:
        want += values[c]
    assert np.array_equal(out.total, want & np.uint64(modulus - 1))


@given(cids=cohorts(min_size=2, max_size=9), data=st.data())
def test_strategies_respect_their_bounds(cids: list[int], data: Any) -> None:
    assert cids == sorted(set(cids)) and 2 <= len(cids) <= 9
    sched = data.draw(dropout_schedules(cids, phases=4, min_survivors=1, max_dropouts=3))
    assert len(sched.drops) <= min(3, len(cids) - 1)
    assert set(sched.drops) <= set(cids) and all(0 <= p < 4 for p in sched.drops.values())
    order = data.draw(message_orders(cids))
    assert sorted(order) == cids
