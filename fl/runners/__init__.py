"""Runners drive the sans-IO protocol machines: in memory (``local``) or over Flower (``flower``)."""

from fl.runners.local import DropoutSchedule, SumOutcome, run_secure_sum

__all__ = ["DropoutSchedule", "SumOutcome", "run_secure_sum"]
