"""The in-memory federated loop: sample, train locally, secure-sum through the pipeline, update, evaluate.

A run has two halves. Each site's :class:`~fl.training.client.ClientSide` turns the global model into an
encoded update; the :class:`~fl.training.server.ServerSide` samples, decodes, averages, applies the server
optimizer, evaluates and keeps the ledger. :class:`Federation` composes one server side with every
site's client side (sharing one worker model) and runs a round between them with the in-memory runner
(:func:`fl.runners.local.run_secure_sum`); :func:`train` runs the rounds, with checkpoints and a JSON
report. The Flower runner uses the same halves across machines (:mod:`fl.runners.flower`).

Hooks: a change to what a client does goes into :class:`~fl.training.client.ClientSide`; a change to
what the server does with a round's sum into :class:`~fl.training.server.ServerSide`; the round
sequence itself (early stopping, callbacks) into :func:`_run_rounds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
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

from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import Dataset
from fl.data.stats import FederatedStats
from fl.errors import BudgetExhaustedError, CheckpointError, NonFiniteUpdateError, TrainingInterrupted
from fl.pipeline import BoundPipeline
from fl.privacy.ledger import Ledger
from fl.privacy.plan import PrivacyPlan
from fl.runners.local import DropoutSchedule, SumOutcome, run_secure_sum
from fl.spec import ClientTrainer, RandomSource, RoundInfo, TrainResult
from fl.training.client import ClientSide, Worker
from fl.training.early_stop import EarlyStopper
from fl.training.models import build_model, set_flat
from fl.training.seeds import derive_seed
from fl.training.seeds import derive_seed as _seed  # noqa: F401  (the name benchmarks/loop_overhead.py imports)
from fl.training.server import CHECKPOINT, ServerSide, evaluate, majority_rate, saved_statistics
from fl.training.setup import RunPlan, Sites, load_sites, plan_run
from secagg.errors import AbortError

__all__ = [
    "CHECKPOINT",
    "BudgetExhaustedError",
    "CheckpointError",
    "Federation",
    "NonFiniteUpdateError",
    "TrainingInterrupted",
    "baseline_model",
    "centralized_baseline",
    "evaluate",
    "format_round",
    "majority_rate",
    "saved_statistics",
    "train",
]

log = logging.getLogger(__name__)


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



TORCH_BASELINES = {"cnn": "same CNN", "mlp-ln": "same MLP with LayerNorm"}  # families sklearn has no twin of


def baseline_model(config: TrainConfig) -> str:
    """What the centralized baseline trains, as the summary names it ("same CNN, no privacy")."""
    if config.model in TORCH_BASELINES:
        return f"{TORCH_BASELINES[config.model]}, no privacy"
    if config.model == "logreg":
        return "scikit-learn logistic regression, no privacy"
    return f"scikit-learn MLP ({config.hidden}, {config.hidden}), no privacy"


def centralized_baseline(data: Dataset, config: TrainConfig) -> float:
    """Test accuracy of the same model family trained centrally, without privacy.

    ``logreg`` and ``mlp``: scikit-learn's LogisticRegression and MLPClassifier (two hidden layers of
    ``hidden``), fitted to convergence. ``cnn`` and ``mlp-ln``: the same torch architecture
    (:func:`_torch_baseline`), since scikit-learn has no convolution or LayerNorm.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    if config.model in TORCH_BASELINES:
        return _torch_baseline(data, config)
    clf: Any
    if config.model == "logreg":
        clf = LogisticRegression(max_iter=2000)
    else:
        clf = MLPClassifier(hidden_layer_sizes=(config.hidden, config.hidden), max_iter=500, random_state=config.seed)
    with _sigint_not_swallowed():
        clf.fit(data.x_train, data.y_train)
    return float(clf.score(data.x_test, data.y_test))


CENTRAL_ADAM_LR = 1e-3  # scikit-learn MLPClassifier's default, as the mlp baseline uses


def _torch_baseline(data: Dataset, config: TrainConfig) -> float:
    """The run's own architecture (built by :func:`build_model` from ``config.seed``, the federation's
    starting model) trained on every training row without privacy, for ``rounds * local_epochs`` epochs
    (as many passes over each row as a full-participation federated run makes) in batches of
    ``batch_size``, with Adam at ``CENTRAL_ADAM_LR``, like the scikit-learn MLP baseline. Not the run's
    own ``lr``: a step size tuned for averaging several clients' updates (the CLI's default 1.0) makes
    central SGD diverge (digits CNN, the CLI defaults, 20 epochs: 0.33 test accuracy at lr 1.0, 0.96 with Adam at 1e-3).
    Deterministic: the model and the shuffling are seeded by ``config.seed``."""
    from fl.training.trainers import PlainTrainer

    model = build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden, seed=config.seed)
    trainer = PlainTrainer(epochs=config.rounds * config.local_epochs, lr=CENTRAL_ADAM_LR,
                           batch_size=config.batch_size, optimizer="adam")
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    with _torch_threads(2):
        trainer.train(model, x, y, cid=-1, round=0, seed=config.seed)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()
    return float(np.mean(predicted == data.y_test)) if len(data.y_test) else math.nan



class Federation:
    """One in-memory run: the server side and every site's client side, composed.

    The attributes runners and tests read (``params``, ``plan``, ``bound``, ``history``, ``ledger`` ...)
    are the server side's; :meth:`client` is a site's client side, built on first use.
    """

    def __init__(
        self, config: TrainConfig, *, dataset: Dataset | None = None, stats: FederatedStats | None = None,
        model: nn.Module | None = None, own_parts: bool = False,
    ) -> None:
        """``model``: a user's module to federate (copied; else ``config.model``). ``own_parts``: the given
        ``dataset``'s own ``parts`` are the clients (a user's sites), instead of re-partitioning it."""
        self.config = config
        self.sites: Sites = load_sites(config, dataset=dataset, stats=stats, own_parts=own_parts)
        data = self.sites.data
        self.x_train = torch.from_numpy(data.x_train)
        self.y_train = torch.from_numpy(data.y_train)
        model = build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden, seed=config.seed,
                            prototype=model)
        self._worker = Worker.for_config(config, data, prototype=model)
        self.run_plan: RunPlan = plan_run(config, size=self._worker.size, sites=self.sites)
        self.server = ServerSide(config, self.sites, self.run_plan, model)
        self._trainer: ClientTrainer = self.run_plan.trainer
        self._clients: dict[int, ClientSide] = {}

    # ---- the client sides -----------------------------------------------------------------------
    def client(self, cid: int) -> ClientSide:
        """Site ``cid``'s client side (its rows, the shared worker model, the run's trainer)."""
        side = self._clients.get(cid)
        if side is None:
            idx = torch.from_numpy(self.sites.parts[cid])
            side = ClientSide(
                cid, self.x_train[idx], self.y_train[idx], config=self.config, run=self.run_plan,
                weight=self.run_plan.weight(self.sites, cid), population=self.population, worker=self._worker,
            )
            side.trainer = self._trainer
            self._clients[cid] = side
        return side

    @property
    def trainer(self) -> ClientTrainer:
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: ClientTrainer) -> None:
        """Replace every client side's trainer (tests inject faulty trainers here)."""
        self._trainer = trainer
        for side in self._clients.values():
            side.trainer = trainer

    @property
    def layer_state(self) -> Any:
        """The public state of the pipeline's stateful layers (e.g. aclip's clip norm), held by the server."""
        return self.server.layer_state

    def client_update(self, cid: int, round: int, params: NDArray[np.float64]) -> tuple[NDArray[Any], TrainResult]:
        """Client ``cid``'s encoded update from ``params`` (see :meth:`ClientSide.update`)."""
        return self.client(cid).update(params, round, self.server.layer_state)

    # ---- the server side ------------------------------------------------------------------------
    @property
    def data(self) -> Dataset:
        return self.sites.data

    @data.setter
    def data(self, data: Dataset) -> None:
        """Replace the run's data set with one that has the same training rows (e.g. the test rows split
        into validation and test by early stopping); the server side evaluates on its new test rows."""
        old = self.sites.data
        if data.x_train.shape != old.x_train.shape or not np.array_equal(data.y_train, old.y_train):
            raise ValueError("a federation's training rows cannot change; only its held-out rows")
        self.sites = dataclasses.replace(self.sites, data=data)
        self.server.sites = self.sites
        self.server.x_test, self.server.y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    @property
    def parts(self) -> tuple[NDArray[np.int64], ...]:
        return self.sites.parts

    @property
    def site_names(self) -> Mapping[int, str]:
        return self.sites.site_names

    @property
    def population(self) -> int:
        return self.sites.population

    @property
    def client_sizes(self) -> dict[int, int]:
        return self.sites.client_sizes

    @property
    def plan(self) -> PrivacyPlan:
        return self.run_plan.plan

    @property
    def bound(self) -> BoundPipeline:
        return self.run_plan.bound

    @property
    def model(self) -> nn.Module:
        return self.server.model

    @property
    def x_test(self) -> torch.Tensor:
        return self.server.x_test

    @property
    def y_test(self) -> torch.Tensor:
        return self.server.y_test

    @property
    def params(self) -> NDArray[np.float64]:
        return self.server.params

    @params.setter
    def params(self, value: NDArray[np.float64]) -> None:
        self.server.params = value

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.server.history

    @property
    def ledger(self) -> Ledger:
        return self.server.ledger

    @property
    def server_log(self) -> list[dict[str, Any]]:
        return self.server.server_log

    @property
    def next_round(self) -> int:
        return self.server.next_round

    def sample(self, round: int) -> tuple[int, ...]:
        return self.server.sample(round)

    def rng(self, round: int, who: object) -> RandomSource:
        return self.server.rng(round, who)

    def session(self, round: int) -> bytes:
        return self.server.session(round)

    def weight(self, cid: int) -> float:
        return self.server.weight(cid)

    def round_info(self, round: int, planned: Sequence[int], included: Sequence[int]) -> RoundInfo:
        return self.server.round_info(round, planned, included)

    def finish_round(
        self, round: int, planned: Sequence[int], outcome: SumOutcome, results: Mapping[int, TrainResult],
        *, rejected: Sequence[int] = (),
    ) -> dict[str, Any]:
        return self.server.finish_round(round, planned, outcome, results, rejected=rejected)

    def evaluate(self) -> dict[str, float]:
        return self.server.evaluate()

    def save(self, directory: Path) -> None:
        self.server.save(directory)

    def load(self, directory: Path) -> None:
        self.server.load(directory)

    # ---- one round in memory --------------------------------------------------------------------
    def _updates(
        self, round: int, planned: Sequence[int]
    ) -> tuple[dict[int, NDArray[Any]], dict[int, TrainResult], list[int]]:
        """Every planned client's encoded update and result; clients whose training diverged are rejected."""
        values: dict[int, NDArray[Any]] = {}
        results: dict[int, TrainResult] = {}
        rejected: list[int] = []
        for cid in planned:
            try:
                values[cid], results[cid] = self.client_update(cid, round, self.params)
            except NonFiniteUpdateError as exc:
                log.warning("%s", exc)
                rejected.append(cid)
        return values, results, rejected

    def _dropouts(self, round: int, cids: Sequence[int]) -> DropoutSchedule | None:
        if self.config.dropout <= 0:
            return None
        drop_rng = np.random.default_rng(derive_seed(self.config.seed, "dropout", round))
        return DropoutSchedule.random(sorted(cids), self.config.dropout, drop_rng, phases=4)

    def run_round(self, round: int) -> dict[str, Any]:
        """One synchronous round in memory. Raises ``BudgetExhaustedError`` before a round that would overspend."""
        planned = self.sample(round)
        self.server.check_budget(round, planned)
        values, results, rejected = self._updates(round, planned)
        need = self.server.min_included(len(values))  # below the sum's own floor nothing may be summed
        if len(values) < need:
            why = (f"only {len(values)} client update(s) this round; the secure sum needs at least {need} "
                   "(a sum of fewer would reveal them): nothing is released")
            log.warning("round %d skipped: %s", round, why)
            return self.server.release_nothing(round, planned, "skipped", why)
        try:
            outcome = run_secure_sum(
                self.plan.pipeline.sum, values, spec=self.bound.sum_spec, session=self.session(round),
                round=round, dropouts=self._dropouts(round, list(values)),
            )
        except AbortError as exc:
            log.warning("round %d: %s", round, exc)
            return self.server.release_nothing(round, planned, "aborted", str(exc))
        return self.finish_round(round, planned, outcome, results, rejected=rejected)

    # ---- report ---------------------------------------------------------------------------------
    def client_accuracy(self) -> dict[str, dict[str, float | int]]:
        """The current model's accuracy on each client's own training rows (per-site numbers)."""
        model = self.server.model
        set_flat(model, self.params)
        model.eval()
        out: dict[str, dict[str, float | int]] = {}
        with torch.no_grad():
            for cid, rows in enumerate(self.parts):
                idx = torch.from_numpy(rows)
                pred = model(self.x_train[idx]).argmax(dim=1)
                out[str(cid)] = {"accuracy": float((pred == self.y_train[idx]).float().mean()), "samples": len(rows)}
        return out

    def report(self, *, baseline: float | None, stopped: str | None = None) -> dict[str, Any]:
        """The JSON-ready report (the server side's, with per-site diagnostics from the raw data)."""
        return self.server.report(baseline=baseline, per_client=self.client_accuracy(), stopped=stopped)


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
                            ("sample_rate", "q", ".3g"), ("steps", "steps", "d"), ("clip", "clip", ".4g"),
                            ("clipped_fraction", "clipped", ".2f")):
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
    on_finish: Callable[[Federation, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds in memory and return the JSON-ready report.

    ``checkpoint_dir``: write a checkpoint after every round; with ``resume=True`` continue from it and
    end with exactly the model an uninterrupted run would have (same seed, test seam for noise).
    ``baseline``: also compute the centralized baseline and (``federated_baseline``, default: the same
    as ``baseline``) the identical federated run without privacy layers, so the report shows what
    privacy cost. Ctrl-C raises :class:`TrainingInterrupted` saying how to resume. ``on_finish(fed,
    report)`` sees the finished federation (e.g. to save its model) before any baseline twin runs.
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
        if base is not None:
            report["baseline"]["centralized_model"] = baseline_model(config)
        if stopper is not None:
            stopper.finish(fed, report)  # the best round's model and its numbers
        if on_finish is not None:
            on_finish(fed, report)
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
