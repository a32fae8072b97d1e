"""The in-memory runner's fl glue: turns a :class:`~fl.spec.SecureSum` into machines and drives them.

The transport, dropout schedule and outcome live in :mod:`secagg.memory` (protocol tests need no
``fl``); the phase loop is :func:`secagg.drive.drive`. This module only builds the machines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.spec import SecureSum, ValueSpec
from secagg.machine import ClientMachine
from secagg.memory import DropoutSchedule, SumOutcome, run_in_memory

__all__ = ["DropoutSchedule", "SumOutcome", "run_secure_sum"]


def run_secure_sum(
    ssum: SecureSum,
    values: Mapping[int, NDArray[Any]],
    *,
    spec: ValueSpec,
    session: bytes,
    round: int = 0,
    dropouts: DropoutSchedule | None = None,
    reorder: np.random.Generator | None = None,
) -> SumOutcome:
    """Run one round of ``ssum`` over ``values`` (client id -> encoded vector) entirely in memory.

    ``reorder`` shuffles message delivery within each phase (order must never matter). A client that
    refuses a request (raises ``ProtocolError``) is logged and treated as dropped from then on.
    Raises ``AbortError`` (from the server machine) when too few clients survive a phase.
    """
    cids = sorted(values)
    server = ssum.server(cids, spec=spec, session=session, round=round)
    parties: dict[int, ClientMachine] = {
        cid: ssum.client(cid, values[cid], spec=spec, session=session, round=round) for cid in cids
    }
    parties.update(ssum.parties(spec=spec, session=session, round=round))
    return run_in_memory(server, parties, dropouts=dropouts, reorder=reorder)
