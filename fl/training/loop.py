"""The federated training loop: sample, train locally, secure-sum through the pipeline, update, evaluate.

:class:`Federation` holds one run's state and exposes each step separately (``sample``,
``client_update``, ``finish_round``) so a network runner (Flower) can drive the same steps across
machines; :func:`train` runs it in memory with the local runner, with checkpoints and a JSON report.

Averaging: with ``weighting="samples"`` client k sends ``(n_k / n_mean) * delta_k`` and the server divides
the sum by the included clients' ``sum(n_k / n_mean)`` -- the n_k-weighted FedAvg average of exactly the
clients that made it into the sum (sample counts are public metadata). With ``"uniform"`` (what DP-FedAvg
needs, so one client's influence is bounded by the clip norm) every client counts once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from tqdm.auto import tqdm

from dp.rng import SecureRandom
from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import Dataset, load_federated, partition
from fl.data.stats import FederatedStats
from fl.privacy.ledger import Ledger
from fl.privacy.plan import build_plan
from fl.runners.local import DropoutSchedule, SumOutcome, run_secure_sum
from fl.spec import RandomSource, RoundInfo, TrainResult, ValueSpec
from fl.training.early_stop import EarlyStopper
from fl.training.models import build_model, flatten_parameters, get_flat, set_flat
from fl.training.server_opt import make_server_optimizer
from fl.training.trainers import PlainTrainer
from secagg.errors import AbortError

__all__ = [
    "BudgetExhaustedError",
    "CheckpointError",
    "Federation",
    "NonFiniteUpdateError",
    "TrainingInterrupted",
    "centralized_baseline",
    "evaluate",
    "majority_rate",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class NonFiniteUpdateError(ValueError):
    """A client's update contains NaN or Inf; it is rejected so the model is never poisoned."""


class BudgetExhaustedError(RuntimeError):
    """The next round would exceed the privacy budget; training stops before it."""


def saved_statistics(directory: Path | None) -> FederatedStats | None:
    """The preprocessing statistics a checkpoint holds (None if absent or unreadable: load() says why)."""
    try:
        stats = torch.load(directory / CHECKPOINT, weights_only=False).get("stats") if directory else None
    except Exception:
        return None
    return stats if isinstance(stats, FederatedStats) else None


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a privagg checkpoint); names the fix."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: says how far the run got and how to resume it.

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
        if self.checkpoint_dir is None or not self.checkpoint_round:
            how = "no checkpoint was written; pass --checkpoint-dir DIR to be able to resume"
            if self.checkpoint_dir is not None:
                how = f"no round was checkpointed in {self.checkpoint_dir} yet; start again"
            return f"interrupted after round {self.completed}; {how}"
        return (
            f"interrupted after round {self.completed}; resume with --resume {self.checkpoint_dir} "
            f"(and the same flags); its checkpoint holds round {self.checkpoint_round}"
        )


def _seed(*parts: object) -> int:
    """A 63-bit seed derived from the run seed and labels (for public simulation randomness)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


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


@contextlib.contextmanager
def _sigint_not_swallowed() -> Iterator[None]:
    """Ctrl-C inside the block always ends the run, even if library code catches KeyboardInterrupt.

    scikit-learn's MLP catches KeyboardInterrupt and returns a half-fitted model (so training would go
    on with a different baseline); here the first Ctrl-C is remembered and re-raised after the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        hit.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


def _statistics_budget(data: Dataset) -> tuple[float, float] | None:
    """(epsilon, delta) the DP preprocessing statistics spent (worst observer), or None without DP."""
    stats = getattr(data, "stats", None)
    if stats is None or stats.event is None:
        return None
    params = stats.guarantee.params
    return max(float(params["epsilon"]), float(params.get("epsilon_server", 0.0))), float(params["delta"])


def _training_budget(config: TrainConfig, stats: tuple[float, float] | None) -> TrainConfig:
    """The config whose ``--epsilon`` is what training may spend: the budget less the statistics' epsilon.

    The statistics and training compose (basic composition: epsilons and deltas add), so ``--epsilon E``
    stays the total the report states."""
    eps = config.privacy.epsilon
    if stats is None or eps is None:
        return config
    left = eps - stats[0]
    if left <= 1e-3 * eps:
        raise ValueError(
            f"--epsilon {eps:g} leaves nothing for training after the preprocessing statistics spent "
            f"{stats[0]:.3g}: raise --epsilon or lower --stats-epsilon"
        )
    return replace(config, privacy=replace(config.privacy, epsilon=left))


def majority_rate(data: Dataset) -> float:
    """Test accuracy of always predicting the training set's most frequent class (the floor to beat)."""
    majority = int(np.bincount(data.y_train).argmax())
    return float(np.mean(data.y_test == majority))


def centralized_baseline(data: Dataset, config: TrainConfig) -> float:
    """Test accuracy of the same model family trained centrally, without privacy (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    clf: Any
    if config.model == "logreg":
        clf = LogisticRegression(max_iter=2000)
    else:
        clf = MLPClassifier(hidden_layer_sizes=(config.hidden, config.hidden), max_iter=500, random_state=config.seed)
    with _sigint_not_swallowed():
        clf.fit(data.x_train, data.y_train)
    return float(clf.score(data.x_test, data.y_test))


class _LazyRandom:
    """Creates the CSPRNG on first use: most pipelines draw no randomness on most parties."""

    __slots__ = ("_factory", "_rng")

    def __init__(self, factory: Callable[[], SecureRandom]) -> None:
        self._factory = factory
        self._rng: SecureRandom | None = None

    def _get(self) -> SecureRandom:
        if self._rng is None:
            self._rng = self._factory()
        return self._rng

    def uniform(self, n: int) -> NDArray[np.float64]:
        return self._get().uniform(n)

    def normal(self, n: int, std: float = 1.0) -> NDArray[np.float64]:
        return self._get().normal(n, std)

    def bytes(self, n: int) -> bytes:
        return self._get().bytes(n)


class Federation:
    """One federated run's state: data partitions, global model, pipeline, server optimizer, ledger."""

    def __init__(
        self, config: TrainConfig, *, dataset: Dataset | None = None, stats: FederatedStats | None = None
    ) -> None:
        self.config = config
        # each site keeps its rows; standardization statistics are federated (fl.data.stats), or reused
        # from a checkpoint (``stats``) so a resumed run never releases them twice
        self.data = dataset or load_federated(config, stats=stats)
        if dataset is None:
            self.parts = list(self.data.parts)
        else:
            self.parts = partition(self.data, config.partition, config.clients, seed=config.seed)
        self.site_names = dict(enumerate(self.data.site_names)) if dataset is None else {}
        self.population = len(self.parts)
        self.client_sizes = {k: len(p) for k, p in enumerate(self.parts)}
        self.mean_size = float(np.mean(list(self.client_sizes.values())))
        self.x_train = torch.from_numpy(self.data.x_train)
        self.y_train = torch.from_numpy(self.data.y_train)
        self.x_test = torch.from_numpy(self.data.x_test)
        self.y_test = torch.from_numpy(self.data.y_test)
        self.model = build_model(
            config.model, self.data.num_features, self.data.num_classes, hidden=config.hidden, seed=config.seed
        )
        self._worker = build_model(
            config.model, self.data.num_features, self.data.num_classes, hidden=config.hidden, seed=config.seed
        )
        self._worker_flat = flatten_parameters(self._worker)
        self._start: tuple[NDArray[np.float64], torch.Tensor] | None = None  # (params, float32 copy)
        self.params = get_flat(self.model)
        if config.cohort is not None and not 1 <= config.cohort <= self.population:
            raise ValueError(f"--cohort must be between 1 and the number of clients ({self.population})")
        if config.sample_rate is not None and not 0 < config.sample_rate <= 1:
            raise ValueError(f"--sample-rate must be in (0, 1], got {config.sample_rate}")
        self.stats_budget = _statistics_budget(self.data)
        self.plan = build_plan(
            _training_budget(config, self.stats_budget), size=self.params.size, population=self.population,
            client_sizes=self.client_sizes,
        )
        self.trainer = self.plan.trainer or PlainTrainer(
            epochs=config.local_epochs, lr=config.client_lr, batch_size=config.batch_size, optimizer=config.optimizer
        )
        self.weighting = self.plan.weighting or config.weighting
        # Rings are sized for the most clients a round can have (all of them under Poisson sampling).
        self.max_cohort = config.cohort if (config.cohort and config.sample_rate is None) else self.population
        self.bound = self.plan.pipeline.bind(ValueSpec(size=self.params.size, cohort=self.max_cohort))
        self.server_opt = make_server_optimizer(config.server_opt, config.server_lr)
        self.ledger = Ledger()
        self.server_log: list[dict[str, Any]] = []  # server-only facts (client ids); never in the report
        if self.data.guarantees:  # what preprocessing revealed (federated statistics), before round 1
            self.ledger.record(0, self.data.guarantees, stage="preprocessing")
        self.history: list[dict[str, Any]] = []
        self.next_round = 1

    # ---- the steps of a round -------------------------------------------------------------------
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

    def rng(self, round: int, who: object) -> RandomSource:
        """A CSPRNG for one party's layer randomness; seeded only through the named test seam."""
        if self.config.insecure_seeded_randomness:
            label = f"{self.config.seed}:{round}:{who}"
            return _LazyRandom(lambda: SecureRandom.for_testing(label))
        return _LazyRandom(SecureRandom)

    def session(self, round: int) -> bytes:
        if self.config.insecure_seeded_randomness:
            return hashlib.sha256(f"session:{self.config.seed}:{round}".encode()).digest()[:16]
        return os.urandom(16)

    def weight(self, cid: int) -> float:
        return self.client_sizes[cid] / self.mean_size if self.weighting == "samples" else 1.0

    def client_update(
        self, cid: int, round: int, params: NDArray[np.float64]
    ) -> tuple[NDArray[Any], TrainResult]:
        """Client side: train from ``params`` on client ``cid``'s data and encode the delta for the sum."""
        if params.shape != self.params.shape:
            raise ValueError(f"global model has {params.size} parameters, client {cid} expects {self.params.size}")
        if self._start is None or self._start[0] is not params:  # all clients of a round share the start
            self._start = (params, torch.from_numpy(params).to(torch.float32))
        self._worker_flat.copy_(self._start[1])
        idx = torch.from_numpy(self.parts[cid])
        result = self.trainer.train(
            self._worker, self.x_train[idx], self.y_train[idx], cid=cid, round=round,
            seed=_seed(self.config.seed, "train", round, cid),
        )
        delta = self._worker_flat.numpy().astype(np.float64) - params
        if not np.all(np.isfinite(delta)):
            raise NonFiniteUpdateError(
                f"client {cid}'s update has NaN/Inf values in round {round}; it is rejected. Lower the "
                f"learning rate or check that client's data for NaN/Inf"
            )
        return self.bound.encode(delta * self.weight(cid), self.rng(round, cid)), result

    def round_info(self, round: int, planned: Sequence[int], included: Sequence[int]) -> RoundInfo:
        return RoundInfo(
            round=round,
            planned=tuple(planned),
            included=tuple(included),
            population=self.population,
            sample_rate=self.sample_rate,
            sampling="poisson" if self.config.sample_rate is not None else "fixed",
            num_samples={c: self.client_sizes[c] for c in planned},
        )

    def finish_round(
        self,
        round: int,
        planned: Sequence[int],
        outcome: SumOutcome,
        results: Mapping[int, TrainResult],
        *,
        rejected: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Server side: decode the sum, average, apply the server optimizer, evaluate and record."""
        info = self.round_info(round, planned, outcome.included)
        total = self.bound.decode(outcome.total, info, self.rng(round, "server"))
        denom = sum(self.weight(c) for c in outcome.included)
        self.params = self.server_opt.step(self.params, total / denom)
        # counts only: who was sampled or included is the server's knowledge, never released (it would let
        # anyone with the report replay the sample and undo the amplification)
        record: dict[str, Any] = {
            "round": round,
            "planned": len(planned),
            "included": len(outcome.included),
            "rejected": len(rejected),
        }
        if rejected:
            self.server_log.append({"round": round, "rejected": list(rejected)})
        if self.plan.accounting is not None:
            record.update(self.plan.accounting.record(info, {c: results[c] for c in outcome.included if c in results}))
        record.update(self.evaluate())
        record["train_loss"] = float(np.mean([results[c].loss for c in outcome.included if c in results] or [math.nan]))
        claims = self.bound.guarantees(info)
        if self.plan.accounting is not None:
            claims += self.plan.accounting.guarantees()
        self.ledger.record(round, claims, included=len(outcome.included))
        self.history.append(record)
        self.next_round = round + 1
        return record

    def run_round(self, round: int) -> dict[str, Any]:
        """One synchronous round in memory. Raises ``BudgetExhaustedError`` before a round that would overspend."""
        planned = self.sample(round)
        if self.plan.accounting is not None:
            ok, why = self.plan.accounting.can_run(self.round_info(round, planned, planned))
            if not ok:
                raise BudgetExhaustedError(why)
        base: dict[str, Any] = {"round": round, "planned": len(planned)}
        values: dict[int, NDArray[Any]] = {}
        results: dict[int, TrainResult] = {}
        rejected: list[int] = []
        for cid in planned:
            try:
                values[cid], results[cid] = self.client_update(cid, round, self.params)
            except NonFiniteUpdateError as exc:
                log.warning("%s", exc)
                rejected.append(cid)
        # the sum's own floor for a round of this size (Poisson rounds vary): below it nothing may be summed
        need = self.plan.pipeline.sum.min_included(dataclasses.replace(self.bound.sum_spec, cohort=max(1, len(values))))
        if len(values) < need:
            why = (f"only {len(values)} client update(s) this round; the secure sum needs at least {need} "
                   "(a sum of fewer would reveal them): nothing is released")
            log.warning("round %d skipped: %s", round, why)
            record = {**base, "included": 0, "skipped": why, **self.evaluate()}
            self.history.append(record)
            self.next_round = round + 1
            return record
        dropouts = None
        if self.config.dropout > 0:
            drop_rng = np.random.default_rng(_seed(self.config.seed, "dropout", round))
            dropouts = DropoutSchedule.random(sorted(values), self.config.dropout, drop_rng, phases=4)
        try:
            outcome = run_secure_sum(
                self.plan.pipeline.sum, values, spec=self.bound.sum_spec, session=self.session(round),
                round=round, dropouts=dropouts,
            )
        except AbortError as exc:
            log.warning("round %d: %s", round, exc)
            record = {**base, "included": 0, "aborted": str(exc), **self.evaluate()}
            self.history.append(record)
            self.next_round = round + 1
            return record
        return self.finish_round(round, planned, outcome, results, rejected=rejected)

    def evaluate(self) -> dict[str, float]:
        set_flat(self.model, self.params)
        return evaluate(self.model, self.x_test, self.y_test, self.data.num_classes)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the whole run state (atomically) so :meth:`load` continues bit-for-bit."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config.as_dict(),
            "next_round": self.next_round,
            "params": self.params,
            "server_opt": self.server_opt.state(),
            "history": self.history,
            "ledger": self.ledger.entries,
            "accounting": self.plan.accounting.state() if self.plan.accounting is not None else None,
            "server_log": self.server_log,
            "stats": self.data.stats,
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
        saved = dict(state["config"])
        current = self.config.as_dict()
        if self.config.privacy.epsilon is not None and saved.get("rounds") != current["rounds"]:
            raise ValueError(
                f"the checkpoint's noise was calibrated for --rounds {saved.get('rounds')} at --epsilon "
                f"{self.config.privacy.epsilon:g}; resume with the same --rounds (more rounds would need less "
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
        self.next_round = int(state["next_round"])
        self.params = np.asarray(state["params"], dtype=np.float64)
        self.server_opt.load(state["server_opt"])
        self.history = list(state["history"])
        self.ledger = Ledger(list(state["ledger"]))
        self.server_log = list(state.get("server_log", []))
        if state["accounting"] is not None and self.plan.accounting is not None:
            self.plan.accounting.load_state(state["accounting"])  # the composed event lists

    def client_accuracy(self) -> dict[str, dict[str, float | int]]:
        """The current model's accuracy on each client's own training rows (per-site numbers)."""
        set_flat(self.model, self.params)
        self.model.eval()
        out: dict[str, dict[str, float | int]] = {}
        with torch.no_grad():
            for cid, rows in enumerate(self.parts):
                idx = torch.from_numpy(rows)
                pred = self.model(self.x_train[idx]).argmax(dim=1)
                out[str(cid)] = {"accuracy": float((pred == self.y_train[idx]).float().mean()), "samples": len(rows)}
        return out

    # ---- report ---------------------------------------------------------------------------------
    def report(self, *, baseline: float | None, stopped: str | None = None) -> dict[str, Any]:
        final = dict(self.history[-1]) if self.history else self.evaluate()
        if self.plan.accounting is not None:  # also when the last round was skipped or aborted
            final["epsilon"], final["delta"] = self.plan.accounting.spent()
        if self.stats_budget is not None:  # basic composition with the released preprocessing statistics
            eps_s, delta_s = self.stats_budget
            final["epsilon_training"], final["epsilon_preprocessing"] = final.get("epsilon", 0.0), eps_s
            final["epsilon"] = final.get("epsilon", 0.0) + eps_s
            final["delta"] = final.get("delta", 0.0) + delta_s
        final_keys = ("accuracy", "balanced_accuracy", "loss", "auc", "epsilon", "delta", "epsilon_training",
                      "epsilon_preprocessing")
        out: dict[str, Any] = {
            "config": self.config.as_dict(),
            "pipeline": self.plan.pipeline.name,
            "rounds": self.history,
            "final": {k: final[k] for k in final_keys if k in final} | {"rounds_completed": len(self.history)},
            "baseline": {"centralized_accuracy": baseline, "majority_class_rate": majority_rate(self.data)},
            # simulation diagnostics from raw data: not covered by any privacy guarantee of the run
            "per_client": self.client_accuracy(),
            "guarantees": self.ledger.latest(),
            "ledger": self.ledger.as_list(),
            "privacy": self.plan.accounting.report() if self.plan.accounting is not None else {"accountant": None},
        }
        if self.site_names:
            out["sites"] = {str(k): v for k, v in self.site_names.items()}
        if stopped:
            out["stopped"] = stopped
        if self.plan.notes:
            out["notes"] = list(self.plan.notes)
        return out


_CHECKPOINT_KEYS = ("config", "next_round", "params", "server_opt", "history", "ledger", "accounting")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and shape-check a checkpoint; any damage becomes a ``CheckpointError`` naming file and fix."""
    fix = (f"the file is damaged (e.g. the disk filled up or it was copied partially): restore it from a backup, "
           f"or delete {path.parent} and start again with --checkpoint-dir")
    try:
        # own file, written by Federation.save (it holds the accountant object, so not weights_only)
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
    return state


def format_round(record: Mapping[str, Any], rounds: int) -> str:
    """One readable line per round.

    With DP-SGD every client has its own z, q and step count; the line shows only the stable quantity,
    the largest epsilon over all clients (``eps max``), instead of whichever client is worst this round.
    """
    parts = [f"round {record['round']:>3}/{rounds}", f"clients {record.get('included', 0)}/{record['planned']}"]
    per_client_dp = "worst_client" in record
    for key, label, fmt in (("accuracy", "acc", ".4f"), ("loss", "loss", ".4f"), ("auc", "auc", ".4f"),
                            ("val_loss", "val loss", ".4f"),
                            ("epsilon", "eps", ".3f"), ("delta", "delta", ".0e"), ("noise_multiplier", "z", ".3f"),
                            ("sample_rate", "q", ".3g"), ("steps", "steps", "d")):
        if per_client_dp and key in ("noise_multiplier", "sample_rate", "steps"):
            continue
        if per_client_dp and key == "epsilon":
            label = "eps max"
        value = record.get(key)
        if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{label} {value:{fmt}}")
    if "aborted" in record:
        parts.append("ABORTED")
    return " | ".join(parts)


@contextlib.contextmanager
def _torch_threads(limit: int) -> Iterator[None]:
    """Cap torch's intra-op threads inside the block and restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(limit, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _nonprivate_twin(config: TrainConfig) -> TrainConfig | None:
    """The same run with every privacy layer removed (``None`` if it has none): what privacy costs."""
    if not config.privacy.tokens():
        return None
    return replace(config, privacy=PrivacyConfig(spec="none"))


def train(
    config: TrainConfig,
    *,
    progress: bool = False,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    baseline: bool = True,
    federated_baseline: bool | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds in memory and return the JSON-ready report.

    ``checkpoint_dir``: write a checkpoint after every round; with ``resume=True`` continue from it and
    end with exactly the model an uninterrupted run would have (same seed, test seam for noise).
    ``baseline``: also compute the centralized baseline and (``federated_baseline``, default: the same
    as ``baseline``) the identical federated run without privacy layers, so the report shows what
    privacy cost. Ctrl-C raises :class:`TrainingInterrupted` saying how to resume.
    """
    if config.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {config.rounds} (with 0 the untrained model would be reported)")
    with _torch_threads(2):
        fed = Federation(config, dataset=dataset, stats=saved_statistics(checkpoint_dir) if resume else None)
        if resume:
            if checkpoint_dir is None:
                raise ValueError("resume needs the checkpoint directory")
            fed.load(checkpoint_dir)
            log.info("resumed from %s at round %d", checkpoint_dir, fed.next_round)
        stopper = EarlyStopper.attach(fed, config, checkpoint_dir=checkpoint_dir, resume=resume)  # splits test
        base = centralized_baseline(fed.data, config) if baseline else None
        stopped = _run_rounds(fed, config, progress=progress, checkpoint_dir=checkpoint_dir, on_round=on_round,
                              stopper=stopper)
        report = fed.report(baseline=base, stopped=stopped)
        if stopper is not None:
            stopper.finish(fed, report)  # the best round's model and its numbers
        twin = _nonprivate_twin(config) if (baseline if federated_baseline is None else federated_baseline) else None
        if twin is not None:
            plain = train(twin, baseline=False, dataset=fed.data)
            report["baseline"]["federated_nonprivate_accuracy"] = plain["final"].get("accuracy")
    return report


def _run_rounds(
    fed: Federation,
    config: TrainConfig,
    *,
    progress: bool,
    checkpoint_dir: Path | None,
    on_round: Callable[[dict[str, Any]], None] | None,
    stopper: EarlyStopper | None = None,
) -> str | None:
    """The round loop of :func:`train`; returns why it stopped early (budget, early stopping), if it did."""
    saved = fed.next_round - 1 if checkpoint_dir is not None else None
    # disable=None: tqdm hides the bar when stderr is not a terminal (CI logs), keeping the round lines
    bar = tqdm(range(fed.next_round, config.rounds + 1), desc="rounds", unit="round",
               disable=None if progress else True)
    try:
        for r in bar:
            try:
                record = fed.run_round(r)
            except BudgetExhaustedError as exc:
                stopped = f"stopped before round {r}: {exc}"
                log.warning("%s", stopped)
                if progress:
                    tqdm.write(stopped)
                return stopped
            halt = stopper.update(fed, record) if stopper is not None else None  # early stopping
            if progress:
                tqdm.write(format_round(record, config.rounds))
            if on_round is not None:
                on_round(record)
            if checkpoint_dir is not None:
                fed.save(checkpoint_dir)  # atomic: a Ctrl-C here leaves the previous round's file whole
                saved = r
            if halt:
                return halt
    except KeyboardInterrupt:
        bar.close()
        raise TrainingInterrupted(fed.next_round - 1, checkpoint_dir, saved) from None
    return None
