"""A SuperNode's memo of its noise calibrations, kept in its own Flower state across ClientApp processes.

Flower may start a fresh ClientApp process for every message; rebuilding this node's client side then
repeats the noise calibration (seconds with DP-SGD or an epsilon target). The calibration is a pure
function of public job settings, so its result is memoised in ``context.state`` (the node's own run
state, never sent by the server), keyed by the exact keyword arguments. A stored value is used only
after a check that it meets the budget (one epsilon computation, not a search): a damaged or stale entry
can cost time, never privacy.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flwr.app import ConfigRecord, Context

from dp.accounting import PLD_FAST, calibrate_noise, compute_epsilon

__all__ = ["NodeCalibrations"]

log = logging.getLogger(__name__)

RECORD = "privagg-calibrations"
_CHECKED = ("delta", "sample_rate", "steps", "accountant", "sampling", "population")


class NodeCalibrations:
    """``calibrate_noise`` with a per-node memo in ``context.state``; same keyword arguments, same result."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def _entries(self) -> tuple[list[str], list[float]]:
        if RECORD not in self.context.state:
            return [], []
        rec: Any = self.context.state[RECORD]
        keys, values = list(rec.get("keys", [])), list(rec.get("values", []))
        if len(keys) != len(values):
            return [], []
        return [str(k) for k in keys], [float(v) for v in values]

    def __call__(self, **kwargs: Any) -> float:
        key = json.dumps(kwargs, sort_keys=True)
        keys, values = self._entries()
        if key in keys:
            z = values[keys.index(key)]
            if _meets_budget(z, kwargs):
                return z
            log.warning("a stored noise calibration does not meet its budget; calibrating again")
            del values[keys.index(key)]
            keys.remove(key)
        z = calibrate_noise(**kwargs)
        self.context.state[RECORD] = ConfigRecord({"keys": [*keys, key], "values": [*values, z]})
        return z


def _meets_budget(z: float, kwargs: dict[str, Any]) -> bool:
    """Whether ``z`` keeps the calibrated steps within the budget (the calibration's own accountant)."""
    if set(kwargs) - {"epsilon", *_CHECKED} or not (z > 0):
        return False  # arguments this check does not model: never trust, recompute
    args = {k: kwargs[k] for k in _CHECKED if k in kwargs}
    try:
        eps = compute_epsilon(noise_multiplier=z, pld_interval=PLD_FAST, **args)
    except (TypeError, ValueError):
        return False
    return bool(eps <= float(kwargs["epsilon"]) * (1 + 1e-9))
