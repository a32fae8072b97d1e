"""Every error ``fl`` raises on purpose, in one module; each message names the fix.

The classes are re-exported where they were first defined (``fl.spec.CompositionError``,
``fl.data.stats.DataError``, ``fl.training.loop.BudgetExhaustedError`` ...), so old imports keep working;
new code imports them from here (or from :mod:`fl`). This module imports nothing from ``fl``.

The other packages keep theirs the same way: :mod:`secagg.errors` (:class:`~secagg.errors.SecAggError`) and
:mod:`dp.errors` (:class:`~dp.errors.DPError`, each class also the ``ValueError``/``TypeError``/``AssertionError`` it
refines); ``fl`` does not re-wrap them (its CLI prints any ``ValueError`` as one line).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BudgetExhaustedError",
    "CheckpointError",
    "CompositionError",
    "DataError",
    "NonFiniteUpdateError",
    "TrainingInterrupted",
]


class CompositionError(ValueError):
    """Layers were composed in an order that cannot work; the message names the fix."""


class DataError(ValueError):
    """A data set, CSV or partition cannot be used as asked; the message names the fix."""


class NonFiniteUpdateError(ValueError):
    """A client's update contains NaN or Inf; it is rejected so the model is never poisoned."""


class BudgetExhaustedError(RuntimeError):
    """The next round would exceed the privacy budget; training stops before it."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a privagg checkpoint); names the fix."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fl.training.loop.train`: says how far the run got and how to resume it.

    ``completed``: rounds finished; ``checkpoint_round``: the last round whose checkpoint is on disk
    (``None`` without a checkpoint directory). The checkpoint file is written atomically, so it always
    holds a whole completed round.
    """

    def __init__(self, completed: int, checkpoint_dir: Path | None, checkpoint_round: int | None) -> None:
        self.completed = completed
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_round = checkpoint_round
        super().__init__(self.message())

    def message(self) -> str:
        """What happened and the command that resumes (or why nothing can be resumed)."""
        if self.checkpoint_dir is None or not self.checkpoint_round:
            how = "no checkpoint was written; pass --checkpoint-dir DIR to be able to resume"
            if self.checkpoint_dir is not None:
                how = f"no round was checkpointed in {self.checkpoint_dir} yet; start again"
            return f"interrupted after round {self.completed}; {how}"
        return (
            f"interrupted after round {self.completed}; resume with --resume {self.checkpoint_dir} "
            f"(and the same flags); its checkpoint holds round {self.checkpoint_round}"
        )
