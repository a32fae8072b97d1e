"""Early stopping on a validation split the server holds, restoring the best round's model.

Why: a fixed ``--rounds`` either stops before convergence or keeps training (and, under DP, spending
budget) after it. With ``TrainConfig.early_stopping`` set, :meth:`EarlyStopper.attach` splits the server's
held-out rows once, by the run's seed, into a **validation** split (``validation_fraction``) and the
**test** split that alone measures the final number and the baselines; the stopping rule never sees a
test row. After every round the server evaluates the released global model on the validation split
(``val_loss``/``val_accuracy`` in the round record); after ``patience`` rounds in a row without the
validation loss falling by more than ``min_delta`` it stops, and the model of the best round is
restored (also when all rounds ran).

Privacy: the validation rows are the server's own data, not the clients'; evaluating the released model
on them is post-processing, so it costs no epsilon. The accountants charge per round run, so a run that
stops early reports the (smaller) epsilon actually spent; the noise was calibrated for ``rounds``.

Resume: the validation losses travel in the checkpointed round history; the parameters of the two most
recent best rounds are kept in ``early_stop.npz`` beside the checkpoint (plain arrays, no pickle), so a
Ctrl-C between that file and the checkpoint still leaves the best round of the checkpoint on disk.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fl.config import EarlyStopConfig, TrainConfig

if TYPE_CHECKING:
    from fl.data.sites import Dataset
    from fl.training.loop import Federation

__all__ = ["BEST_FILE", "EarlyStopper", "split_validation"]

log = logging.getLogger(__name__)

BEST_FILE = "early_stop.npz"
_MIN_ROWS = 10  # fewer validation rows than this make the stopping rule mostly noise: warn


def split_validation(data: Dataset, fraction: float, *, seed: int) -> Dataset:
    """``data`` with its test rows split into a validation split and a (smaller) test split.

    Stratified by class so both splits keep the class mix; idempotent (a data set that already has a
    validation split, e.g. the one handed to the non-private twin run, is returned unchanged).
    """
    if data.x_val is not None:
        return data
    n = len(data.y_test)
    rng = np.random.default_rng([seed, 0x7A1])  # public simulation set-up of the server's own rows
    val: list[NDArray[np.int64]] = []
    for c in np.unique(data.y_test):
        rows = rng.permutation(np.flatnonzero(data.y_test == c))
        val.append(rows[: round(fraction * len(rows))])
    v = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    t = np.setdiff1d(np.arange(n), v)
    if len(v) == 0 or len(t) == 0:
        raise ValueError(
            f"early stopping needs validation and test rows, but the server holds only {n} held-out row(s) "
            f"(--validation-fraction {fraction:g}); raise --test-fraction or drop --patience"
        )
    if len(v) < _MIN_ROWS:
        log.warning("early stopping decides on only %d validation rows: raise --test-fraction or "
                    "--validation-fraction for a steadier rule", len(v))
    return replace(data, x_test=data.x_test[t], y_test=data.y_test[t], x_val=data.x_test[v], y_val=data.y_test[v])


class EarlyStopper:
    """The round loop's early-stopping hook: :meth:`update` after each round, :meth:`finish` at the end."""

    def __init__(self, rule: EarlyStopConfig, *, state_dir: Path | None = None) -> None:
        self.rule = rule
        self.state_dir = state_dir
        self.best_loss = math.inf
        self.best_round = 0  # 0: the initial model (no round yet)
        self.best_params: NDArray[np.float64] | None = None
        self.wait = 0
        self.stopped_after: int | None = None
        self._kept: dict[int, NDArray[np.float64]] = {}  # the last two best rounds' parameters (resume)

    @classmethod
    def attach(
        cls, fed: Federation, config: TrainConfig, *, checkpoint_dir: Path | None = None, resume: bool = False
    ) -> EarlyStopper | None:
        """The stopper for ``config`` (``None`` when early stopping is off), with ``fed``'s test set split.

        Call it before any baseline is computed, so the baselines use the same (reduced) test set.
        """
        rule = config.early_stopping
        if rule is None:
            return None
        fed.data = split_validation(fed.data, rule.validation_fraction, seed=config.seed)  # the server's test rows
        stopper = cls(rule, state_dir=checkpoint_dir)
        if resume:
            stopper._restore(fed)
        return stopper

    def _val_metrics(self, fed: Federation) -> dict[str, float]:
        import torch

        from fl.training.loop import evaluate
        from fl.training.models import set_flat

        data = fed.data
        assert data.x_val is not None and data.y_val is not None
        set_flat(fed.model, fed.params)
        m = evaluate(fed.model, torch.from_numpy(data.x_val), torch.from_numpy(data.y_val), data.num_classes)
        return {"val_loss": m["loss"], "val_accuracy": m["accuracy"]}

    def update(self, fed: Federation, record: dict[str, Any]) -> str | None:
        """Evaluate the round's model on the validation split (into ``record``); the stop message, if it stops."""
        record.update(self._val_metrics(fed))
        r = int(record["round"])
        if self._observe(r, float(record["val_loss"]), fed.params):
            self._save()
        if self.wait < self.rule.patience:
            return None
        self.stopped_after = r
        return (f"early stopping after round {r}: the validation loss has not fallen by more than "
                f"{self.rule.min_delta:g} for {self.rule.patience} round(s); the model of round "
                f"{self.best_round} (validation loss {self.best_loss:.4f}) is restored")

    def _observe(self, r: int, loss: float, params: NDArray[np.float64]) -> bool:
        """Track the best round; True when ``r`` is a new best."""
        if math.isfinite(loss) and loss < self.best_loss - self.rule.min_delta:
            self.best_loss, self.best_round, self.best_params, self.wait = loss, r, params.copy(), 0
            self._kept = {k: v for k, v in self._kept.items() if k == max(self._kept, default=-1)}
            self._kept[r] = self.best_params
            return True
        self.wait += 1
        return False

    def _save(self) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (BEST_FILE + ".tmp.npz")
        np.savez(tmp, **{f"round_{k}": v for k, v in self._kept.items()})  # type: ignore[arg-type]
        tmp.replace(self.state_dir / BEST_FILE)

    def _restore(self, fed: Federation) -> None:
        """Rebuild the state from the checkpointed history and the kept best parameters."""
        for rec in fed.history:
            if "val_loss" in rec:
                self._observe(int(rec["round"]), float(rec["val_loss"]), fed.params)
        self._kept = {}
        if self.best_round == 0 or self.best_round == fed.next_round - 1:
            self.best_params = fed.params.copy() if self.best_round else None
            self._kept = {self.best_round: self.best_params} if self.best_params is not None else {}
            return
        path = self.state_dir / BEST_FILE if self.state_dir is not None else None
        key = f"round_{self.best_round}"
        try:
            with np.load(path, allow_pickle=False) as kept:  # type: ignore[arg-type]
                self.best_params = np.asarray(kept[key], dtype=np.float64)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(
                f"cannot resume early stopping: the parameters of best round {self.best_round} are not in "
                f"{path} ({type(exc).__name__}); start the run again"
            ) from exc
        self._kept = {self.best_round: self.best_params}

    def finish(self, fed: Federation, report: dict[str, Any]) -> None:
        """Restore the best round's model and make ``report``'s final numbers (and per-client) its own."""
        if self.best_params is not None:
            fed.params = self.best_params.copy()
        final = report["final"]
        final.update({k: v for k, v in fed.evaluate().items() if k in ("accuracy", "balanced_accuracy", "loss",
                                                                         "auc")})
        report["per_client"] = fed.client_accuracy()
        assert fed.data.y_val is not None
        report["early_stopping"] = {
            "best_round": self.best_round, "best_val_loss": self.best_loss, "stopped_after": self.stopped_after,
            "patience": self.rule.patience, "min_delta": self.rule.min_delta,
            "validation_rows": len(fed.data.y_val), "test_rows": len(fed.data.y_test),
        }
