"""The server side of a run: sampling, decoding and averaging the sum, the server optimizer, evaluation,
the ledger, the report and checkpoints.

It never sees a client's update, only the secure sum's total (decoded by the server half of every
privacy layer) and public metadata (sample counts, training results). Runners hand it the outcome of
each round's secure sum: the in-memory loop (:mod:`fl.training.loop`) and the Flower ServerApp alike.

Averaging: with ``weighting="samples"`` client k sends ``(n_k / n_mean) * delta_k`` and the server divides
the sum by the included clients' ``sum(n_k / n_mean)`` -- the n_k-weighted FedAvg average of exactly the
clients that made it into the sum (sample counts are public metadata). With ``"uniform"`` (what DP-FedAvg
needs, so one client's influence is bounded by the clip norm) every client counts once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from dp.rng import SecureRandom
from fl.config import TrainConfig
from fl.data.sites import Dataset
from fl.data.stats import FederatedStats
from fl.errors import BudgetExhaustedError, CheckpointError
from fl.privacy.ledger import Ledger
from fl.runners.local import SumOutcome
from fl.spec import RandomSource, RoundInfo, TrainResult
from fl.training.models import get_flat, set_flat
from fl.training.seeds import party_rng, session_id
from fl.training.server_opt import make_server_optimizer
from fl.training.setup import RunPlan, Sites

__all__ = ["CHECKPOINT", "ServerSide", "evaluate", "majority_rate", "saved_statistics"]

CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_KEYS = ("config", "next_round", "params", "server_opt", "history", "ledger", "accounting")
_FINAL_KEYS = ("accuracy", "balanced_accuracy", "loss", "auc", "epsilon", "delta", "epsilon_training",
               "epsilon_preprocessing")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Loss, accuracy and (binary tasks) ROC AUC on held-out data."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(dim=1) == y).float().mean())
    pred = logits.argmax(dim=1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in torch.unique(y)]
    out = {"loss": loss, "accuracy": acc, "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan}
    if num_classes == 2 and len(torch.unique(y)) == 2:
        from sklearn.metrics import roc_auc_score

        prob = torch.softmax(logits, dim=1)[:, 1].numpy()
        out["auc"] = float(roc_auc_score(y.numpy(), prob))
    return out


def majority_rate(data: Dataset) -> float:
    """Test accuracy of always predicting the training set's most frequent class (the floor to beat).

    NaN when the server holds no training rows or no test rows (a Flower run on the nodes' own data)."""
    if len(data.y_train) == 0 or len(data.y_test) == 0:
        return math.nan
    majority = int(np.bincount(data.y_train).argmax())
    return float(np.mean(data.y_test == majority))


def saved_statistics(directory: Path | None) -> FederatedStats | None:
    """The preprocessing statistics a checkpoint holds (None if absent or unreadable: load() says why)."""
    try:
        stats = torch.load(directory / CHECKPOINT, weights_only=False).get("stats") if directory else None
    except Exception:
        return None
    return stats if isinstance(stats, FederatedStats) else None


class ServerSide:
    """The server's state for one run: global parameters, server optimizer, ledger, history."""

    def __init__(self, config: TrainConfig, sites: Sites, run: RunPlan, model: nn.Module) -> None:
        self.config = config
        self.sites = sites
        self.run = run
        self.model = model
        self.params = get_flat(model)
        self.x_test = torch.from_numpy(sites.data.x_test)
        self.y_test = torch.from_numpy(sites.data.y_test)
        self.server_opt = make_server_optimizer(config.server_opt, config.server_lr)
        self.ledger = Ledger()
        self.server_log: list[dict[str, Any]] = []  # server-only facts (client ids); never in the report
        if sites.data.guarantees:  # what preprocessing revealed (federated statistics), before round 1
            self.ledger.record(0, sites.data.guarantees, stage="preprocessing")
        self.history: list[dict[str, Any]] = []
        self.next_round = 1
        self.layer_state = run.bound.initialize()  # stateful layers (aclip): public, explicit, checkpointed
        # the evaluation of the global model: the test rows' metrics, or a user's own (fl.api.train)
        self.evaluation: Callable[[nn.Module], dict[str, float]] | None = None

    # ---- sampling -------------------------------------------------------------------------------
    @property
    def population(self) -> int:
        return self.sites.population

    @property
    def sampling(self) -> str:
        return "poisson" if self.config.sample_rate is not None else "fixed"

    @property
    def sample_rate(self) -> float:
        if self.config.sample_rate is not None:
            return self.config.sample_rate
        return (self.config.cohort or self.population) / self.population

    def sample(self, round: int) -> tuple[int, ...]:
        """The clients asked to take part in ``round``, drawn from a CSPRNG (:class:`dp.rng.SecureRandom`).

        Amplification by sampling holds only against observers who cannot replay the draw, so it is never
        derived from the public seed; the report and ledger carry participant counts only. The named test
        seam ``insecure_seeded_randomness`` derives it from the seed so runs repeat.
        """
        if self.config.insecure_seeded_randomness:
            rng = SecureRandom.for_testing(f"sample:{self.config.seed}:{round}")
        else:
            rng = SecureRandom()
        u = rng.uniform(self.population)
        if self.config.sample_rate is not None:
            return tuple(int(c) for c in np.flatnonzero(u < self.config.sample_rate))
        k = self.config.cohort or self.population
        return tuple(sorted(int(c) for c in np.argsort(u, kind="stable")[:k]))  # a uniform k-subset

    def rng(self, round: int, who: object = "server") -> RandomSource:
        return party_rng(self.config, round, who)

    def session(self, round: int) -> bytes:
        return session_id(self.config, round)

    def weight(self, cid: int) -> float:
        return self.run.weight(self.sites, cid)

    def round_info(self, round: int, planned: Sequence[int], included: Sequence[int]) -> RoundInfo:
        return RoundInfo(
            round=round, planned=tuple(planned), included=tuple(included), population=self.population,
            sample_rate=self.sample_rate, sampling="poisson" if self.config.sample_rate is not None else "fixed",
            num_samples={c: self.sites.client_sizes[c] for c in planned},
        )

    # ---- a round --------------------------------------------------------------------------------
    def check_budget(self, round: int, planned: Sequence[int]) -> None:
        """Raise :class:`BudgetExhaustedError` before a round that would overspend the privacy budget."""
        accounting = self.run.plan.accounting
        if accounting is not None:
            ok, why = accounting.can_run(self.round_info(round, planned, planned))
            if not ok:
                raise BudgetExhaustedError(why)

    def min_included(self, received: int) -> int:
        """The sum's own floor for a round with ``received`` updates (Poisson rounds vary in size)."""
        spec = dataclasses.replace(self.run.bound.sum_spec, cohort=max(1, received))
        return self.run.plan.pipeline.sum.min_included(spec)

    def release_nothing(self, round: int, planned: Sequence[int], key: str, why: str) -> dict[str, Any]:
        """Record a round that released no model update (``key``: ``"skipped"`` or ``"aborted"``)."""
        record = {"round": round, "planned": len(planned), "included": 0, key: why, **self.evaluate()}
        self.history.append(record)
        self.next_round = round + 1
        return record

    def finish_round(
        self,
        round: int,
        planned: Sequence[int],
        outcome: SumOutcome,
        results: Mapping[int, TrainResult],
        *,
        rejected: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Decode the sum, average, apply the server optimizer, evaluate and record."""
        info = self.round_info(round, planned, outcome.included)
        total, self.layer_state = self.run.bound.advance(outcome.total, info, self.rng(round, "server"),
                                                         self.layer_state)
        denom = sum(self.weight(c) for c in outcome.included)
        self.params = self.server_opt.step(self.params, total / denom)
        # counts only: who was sampled or included is the server's knowledge, never released (it would let
        # anyone with the report replay the sample and undo the amplification)
        record: dict[str, Any] = {
            "round": round, "planned": len(planned), "included": len(outcome.included), "rejected": len(rejected),
        }
        if rejected:
            self.server_log.append({"round": round, "rejected": list(rejected)})
        included = {c: results[c] for c in outcome.included if c in results}
        accounting = self.run.plan.accounting
        if accounting is not None:
            record.update(accounting.record(info, included))
        record.update(self.run.bound.measurements(self.layer_state))  # e.g. aclip's clip and noisy clipped share
        record.update(self.evaluate())
        record["train_loss"] = float(np.mean([r.loss for r in included.values()] or [math.nan]))
        claims = self.run.bound.guarantees(info)
        if accounting is not None:
            claims += accounting.guarantees()
        self.ledger.record(round, claims, included=len(outcome.included))
        self.history.append(record)
        self.next_round = round + 1
        return record

    def evaluate(self) -> dict[str, float]:
        """The global model's metrics: the user's ``evaluation`` if set, else :meth:`test_metrics`."""
        if self.evaluation is not None:
            set_flat(self.model, self.params)
            return self.evaluation(self.model)
        return self.test_metrics()

    def test_metrics(self) -> dict[str, float]:
        """Accuracy, loss (and AUC for two classes) of the global model on the server's test rows."""
        set_flat(self.model, self.params)
        return evaluate(self.model, self.x_test, self.y_test, self.sites.data.num_classes)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the whole run state (atomically) so :meth:`load` continues bit-for-bit."""
        directory.mkdir(parents=True, exist_ok=True)
        accounting = self.run.plan.accounting
        state = {
            "config": self.config.as_dict(), "next_round": self.next_round, "params": self.params,
            "server_opt": self.server_opt.state(), "history": self.history, "ledger": self.ledger.entries,
            "accounting": accounting.state() if accounting is not None else None,
            "server_log": self.server_log, "stats": self.sites.data.stats, "layer_state": self.layer_state,
        }
        tmp = directory / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        tmp.replace(directory / CHECKPOINT)

    def load(self, directory: Path) -> None:
        """Continue from the checkpoint in ``directory``; ``CheckpointError`` if it cannot be read."""
        path = directory / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}; run once with --checkpoint-dir {directory}")
        state = _read_checkpoint(path)
        _check_same_settings(dict(state["config"]), self.config, directory)
        self.next_round = int(state["next_round"])
        self.params = np.asarray(state["params"], dtype=np.float64)
        self.server_opt.load(state["server_opt"])
        self.history = list(state["history"])
        self.ledger = Ledger(list(state["ledger"]))
        self.server_log = list(state.get("server_log", []))
        if "layer_state" in state or self.run.bound.stateful:  # a stateful pipeline never restarts its state
            self.layer_state = self.run.bound.load_state(state.get("layer_state") or ())
        accounting = self.run.plan.accounting
        if state["accounting"] is not None and accounting is not None:
            accounting.load_state(state["accounting"])  # the composed event lists

    # ---- report ---------------------------------------------------------------------------------
    def final(self) -> dict[str, Any]:
        """The report's ``final`` section: the last round's metrics and the total privacy spent."""
        final = dict(self.history[-1]) if self.history else self.evaluate()
        accounting = self.run.plan.accounting
        if accounting is not None:  # also when the last round was skipped or aborted
            final["epsilon"], final["delta"] = accounting.spent()
        if self.run.stats_budget is not None:  # basic composition with the released preprocessing statistics
            eps_s, delta_s = self.run.stats_budget
            final["epsilon_training"], final["epsilon_preprocessing"] = final.get("epsilon", 0.0), eps_s
            final["epsilon"] = final.get("epsilon", 0.0) + eps_s
            final["delta"] = final.get("delta", 0.0) + delta_s
        return {k: final[k] for k in _FINAL_KEYS if k in final} | {"rounds_completed": len(self.history)}

    def report(
        self, *, baseline: float | None, per_client: Mapping[str, Any], stopped: str | None = None
    ) -> dict[str, Any]:
        """The JSON-ready report; ``per_client``: simulation diagnostics (covered by no guarantee)."""
        plan = self.run.plan
        out: dict[str, Any] = {
            "config": self.config.as_dict(),
            "pipeline": plan.pipeline.name,
            "rounds": self.history,
            "final": self.final(),
            "baseline": {"centralized_accuracy": baseline, "majority_class_rate": majority_rate(self.sites.data)},
            "per_client": dict(per_client),
            "guarantees": self.ledger.latest(),
            "ledger": self.ledger.as_list(),
            "privacy": plan.accounting.report() if plan.accounting is not None else {"accountant": None},
        }
        if self.run.class_weights is not None:
            out["class_weight"] = self.run.class_weights.as_dict()
        if self.run.bound.stateful:
            out["layer_state"] = self.layer_state
        if self.sites.site_names:
            out["sites"] = {str(k): v for k, v in self.sites.site_names.items()}
        if stopped:
            out["stopped"] = stopped
        if plan.notes:
            out["notes"] = list(plan.notes)
        return out


def _check_same_settings(saved: dict[str, Any], config: TrainConfig, directory: Path) -> None:
    """Refuse a checkpoint made with other settings (only ``--rounds`` may change, and not under a budget)."""
    current = config.as_dict()
    if config.privacy.epsilon is not None and saved.get("rounds") != current["rounds"]:
        raise ValueError(
            f"the checkpoint's noise was calibrated for --rounds {saved.get('rounds')} at --epsilon "
            f"{config.privacy.epsilon:g}; resume with the same --rounds (more rounds would need less "
            f"noise per round than was already spent, and the budget would be undercounted)"
        )
    saved.pop("rounds", None)
    current.pop("rounds", None)
    diff = sorted(k for k in current if saved.get(k) != current[k])
    if diff:
        raise ValueError(
            f"checkpoint in {directory} was made with different settings ({', '.join(diff)}); resume with "
            f"the same flags (only --rounds may change)"
        )


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and shape-check a checkpoint; any damage becomes a ``CheckpointError`` naming file and fix."""
    fix = (f"the file is damaged (e.g. the disk filled up or it was copied partially): restore it from a backup, "
           f"or delete {path.parent} and start again with --checkpoint-dir")
    try:
        # own file, written by ServerSide.save (it holds the accountant object, so not weights_only)
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # truncated zip, corrupt pickle stream, wrong types...: all "damaged"
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); {fix}") from exc
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a privagg checkpoint (missing {', '.join(missing)}); {fix}")
    try:
        state["next_round"] = int(state["next_round"])
        state["params"] = np.asarray(state["params"], dtype=np.float64)
        if not isinstance(state["config"], dict) or not isinstance(state["history"], list):
            raise TypeError("config or history has the wrong type")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} holds malformed values ({exc}); {fix}") from exc
    return cast(dict[str, Any], state)
