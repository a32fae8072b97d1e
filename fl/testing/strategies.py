"""Hypothesis strategies for tests built on privagg's protocol machines and in-memory runner.

- :func:`cohorts`: sorted, distinct client ids (not ``0..n-1``, so code that confuses an id with an
  index is caught);
- :func:`dropout_schedules`: which client goes silent at which phase
  (:class:`fl.runners.local.DropoutSchedule`), optionally keeping a minimum number of clients alive to the end;
- :func:`message_orders`: the delivery order of one phase's messages (order must never matter);
- :func:`reorder_generators`: seeded generators for ``run_secure_sum(..., reorder=...)``.

Requires ``hypothesis`` (privagg's ``dev`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from hypothesis import strategies as st

__all__ = ["cohorts", "dropout_schedules", "message_orders", "reorder_generators"]

T = TypeVar("T")


def cohorts(*, min_size: int = 2, max_size: int = 12, max_id: int = 10_000) -> st.SearchStrategy[list[int]]:
    """Sorted lists of ``min_size..max_size`` distinct client ids in ``[0, max_id)``."""
    if not 1 <= min_size <= max_size <= max_id:
        raise ValueError("need 1 <= min_size <= max_size <= max_id")
    return st.lists(st.integers(0, max_id - 1), min_size=min_size, max_size=max_size, unique=True).map(sorted)


@st.composite
def _schedules(draw: Any, cids: Sequence[int], phases: int, min_survivors: int, max_dropouts: int | None) -> Any:
    from fl.runners.local import DropoutSchedule

    ids = list(cids)
    most = len(ids) - min_survivors
    if max_dropouts is not None:
        most = min(most, max_dropouts)
    if most <= 0:
        return DropoutSchedule({})
    dropped = draw(st.lists(st.sampled_from(ids), max_size=most, unique=True))
    return DropoutSchedule({cid: draw(st.integers(0, phases - 1)) for cid in dropped})


def dropout_schedules(cids: Sequence[int], *, phases: int = 4, min_survivors: int = 0,
                      max_dropouts: int | None = None) -> st.SearchStrategy[Any]:
    """``DropoutSchedule``s over ``cids``: each dropped client goes silent at one of ``phases`` phases.

    ``min_survivors``: at least this many clients never drop (e.g. the threshold, to test exact sums);
    ``max_dropouts``: at most this many drop. Shrinks towards fewer dropouts.
    """
    if phases < 1 or not 0 <= min_survivors <= len(cids):
        raise ValueError("need phases >= 1 and 0 <= min_survivors <= len(cids)")
    return _schedules(list(cids), phases, min_survivors, max_dropouts)


def message_orders(messages: Sequence[T]) -> st.SearchStrategy[list[T]]:
    """Every delivery order of ``messages`` (one phase's outbox), shrinking towards the original order."""
    return st.permutations(list(messages))


def reorder_generators() -> st.SearchStrategy[np.random.Generator]:
    """Seeded NumPy generators for the in-memory runner's ``reorder=`` (which order, not secrets)."""
    return st.integers(0, 2**32 - 1).map(np.random.default_rng)
