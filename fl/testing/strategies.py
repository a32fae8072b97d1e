"""Hypothesis strategies for tests built on privagg's protocol machines and in-memory runner.

- :func:`cohorts`: sorted, distinct client ids (not ``0..n-1``, so code that confuses an id with an
  index is caught);
- :func:`dropout_schedules`: which client goes silent at which phase
  (:class:`fl.runners.local.DropoutSchedule`), optionally keeping a minimum number of clients alive to the end;
- :func:`message_orders`: the delivery order of one phase's messages (order must never matter);
- :func:`reorder_generators`: seeded generators for ``run_secure_sum(..., reorder=...)``;
- :func:`adversarial_unmask_requests`: variants of an honest SecAgg unmask request that an honest client
  must refuse (a client both alive and dropped, fewer than t survivors, the recipient left out, a stranger).

Requires ``hypothesis`` (privagg's ``dev`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
from hypothesis import strategies as st

__all__ = ["adversarial_unmask_requests", "cohorts", "dropout_schedules", "message_orders", "reorder_generators"]

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


def _both(honest: Any) -> st.SearchStrategy[Any]:
    """Some alive clients are named dropped too (asks for both kinds of their shares)."""
    return st.lists(st.sampled_from(honest.alive), min_size=1, unique=True).map(
        lambda vs: replace(honest, dropped=tuple(sorted({*honest.dropped, *vs}))))


def _few(honest: Any, t: int) -> st.SearchStrategy[Any]:
    """Fewer than t survivors (the recipient kept), the others claimed dropped."""
    others = [v for v in honest.alive if v != honest.recipient]

    def build(keep: list[int]) -> Any:
        alive = tuple(sorted({honest.recipient, *keep}))
        moved = set(honest.alive) - set(alive)
        return replace(honest, alive=alive, dropped=tuple(sorted({*honest.dropped, *moved})))

    return st.lists(st.sampled_from(others), max_size=max(0, t - 2), unique=True).map(build) if others \
        else st.just(build([]))


def _left_out(honest: Any) -> st.SearchStrategy[Any]:
    """The recipient is not named alive (it is named dropped, or not at all)."""
    alive = tuple(v for v in honest.alive if v != honest.recipient)
    return st.sampled_from([replace(honest, alive=alive),
                            replace(honest, alive=alive, dropped=tuple(sorted({*honest.dropped, honest.recipient})))])


def _stranger(honest: Any, outsider: int) -> st.SearchStrategy[Any]:
    """Shares of a client the recipient holds none of."""
    return st.sampled_from([replace(honest, alive=tuple(sorted({*honest.alive, outsider}))),
                            replace(honest, dropped=tuple(sorted({*honest.dropped, outsider})))])


def adversarial_unmask_requests(honest: Any, *, t: int, outsider: int = 2**31 - 1) -> st.SearchStrategy[Any]:
    """Variants of ``honest`` (a ``secagg.masking.messages.UnmaskRequest`` an honest server sent) that the honest
    recipient must refuse with ``ProtocolError``: clients named both alive and dropped, fewer than ``t``
    survivors, the recipient left out of the survivors, or shares asked of ``outsider`` (an id not in the
    round). A refused request leaves the client unchanged, so one client can be asked every example.
    """
    if t < 2 or not honest.alive:
        raise ValueError("need t >= 2 and an honest request naming its survivors")
    return st.one_of(_both(honest), _few(honest, t), _left_out(honest), _stranger(honest, outsider))
