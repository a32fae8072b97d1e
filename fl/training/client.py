"""The client side of a run: one site's rows, a model to train, its trainer, its encoder.

``ClientSide.update(global_params, round)`` trains from the global model on this site's data and returns
the update encoded by the client half of every privacy layer (ready for the secure sum) with the
training result (public metadata; DP-SGD reports its own steps, rate and noise there). A client side
holds nothing of any other site and no server state, so it lives for a whole run: in memory beside the
others (:class:`fl.training.loop.Federation`), or one per Flower SuperNode
(:mod:`fl.runners.flower`), built by :meth:`ClientSide.for_site` from the job's config alone, or by
:meth:`ClientSide.for_own_data` from the node's own table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from torch import nn

from dp.accounting import calibrate_noise
from fl.blocks import Blocks
from fl.config import TrainConfig
from fl.data.sites import Dataset
from fl.data.stats import FederatedStats
from fl.errors import NonFiniteUpdateError
from fl.pipeline import BoundPipeline
from fl.privacy.plan import Calibrator, PrivacyPlan
from fl.spec import ClientTrainer, RandomSource, TrainResult
from fl.training.models import build_model, flatten_parameters
from fl.training.seeds import derive_seed, party_rng
from fl.training.setup import RunPlan, Sites, load_sites, plan_run

__all__ = ["ClientSide", "Worker"]


class Worker:
    """The module a client trains in place; in memory one worker serves every client side in turn.

    It keeps the float32 copy of the round's global parameters, so the clients of one round convert
    them once.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flat = flatten_parameters(model)
        self._start: tuple[NDArray[np.float64], torch.Tensor] | None = None

    @classmethod
    def for_config(cls, config: TrainConfig, data: Dataset, *, prototype: nn.Module | None = None) -> Worker:
        """The run's model (``config.model``), or a copy of a user's ``prototype`` module."""
        return cls(build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden,
                               seed=config.seed, prototype=prototype))

    @property
    def size(self) -> int:
        return int(self.flat.numel())

    def load(self, params: NDArray[np.float64]) -> None:
        """Set the module's parameters to ``params`` (all clients of a round share the start)."""
        if self._start is None or self._start[0] is not params:
            self._start = (params, torch.from_numpy(params).to(torch.float32))
        self.flat.copy_(self._start[1])

    def delta(self, params: NDArray[np.float64]) -> NDArray[np.float64]:
        return self.flat.numpy().astype(np.float64) - params

    def delta_blocks(self, params: NDArray[np.float64], weight: float = 1.0) -> Blocks:
        """``delta(params) * weight`` read block by block (the same float64 values, never a whole copy)."""
        flat = self.flat.numpy()

        def read(start: int, stop: int) -> NDArray[np.float64]:
            return (flat[start:stop].astype(np.float64) - params[start:stop]) * weight

        return Blocks(int(flat.size), read)


class ClientSide:
    """One site of a run: its rows, the worker it trains, its trainer and the bound pipeline's client half.

    ``weight``: the averaging weight this client applies before encoding (``n_k / n_mean`` or 1);
    ``plan`` / ``population`` are what the node checks against its own policy before it contributes.
    """

    def __init__(
        self,
        cid: int,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        config: TrainConfig,
        run: RunPlan,
        weight: float,
        population: int,
        worker: Worker,
    ) -> None:
        self.cid = cid
        self.features = features
        self.labels = labels
        self.config = config
        self.run = run
        self.weight = weight
        self.population = population
        self.worker = worker
        self.trainer: ClientTrainer = run.trainer

    @classmethod
    def for_site(
        cls, config: TrainConfig, cid: int, *, calibrate: Calibrator = calibrate_noise,
        stats: FederatedStats | None = None,
    ) -> ClientSide:
        """Client ``cid``'s side of the run ``config`` describes, rebuilt deterministically (a SuperNode).

        Its privacy plan is calibrated for this client only (DP-SGD: one calibration, not one per site);
        ``calibrate``: a memo of :func:`dp.accounting.calibrate_noise` (see :func:`fl.privacy.plan.build_plan`).
        ``stats``: the run's one preprocessing release (a Flower job carries it), reused, never recomputed.
        """
        sites = load_sites(config, stats=stats)
        if not 0 <= cid < sites.population:
            raise ValueError(f"client {cid} is not in this run's {sites.population} clients")
        worker = Worker.for_config(config, sites.data)
        run = plan_run(config, size=worker.size, sites=sites, only=cid, calibrate=calibrate)
        idx = torch.from_numpy(sites.parts[cid])
        return cls(
            cid, torch.from_numpy(sites.data.x_train)[idx], torch.from_numpy(sites.data.y_train)[idx],
            config=config, run=run, weight=run.weight(sites, cid), population=sites.population, worker=worker,
        )

    @classmethod
    def for_own_data(
        cls, config: TrainConfig, cid: int, frame: pd.DataFrame, *, stats: FederatedStats, sizes: Sequence[int],
        classes: Sequence[str], name: str = "", calibrate: Calibrator = calibrate_noise,
    ) -> ClientSide:
        """Client ``cid``'s side built from ONE site's own table (a SuperNode with its own CSV).

        ``frame``: this site's rows, cleaned by the run's missing-value rule; ``stats``: the run's one
        preprocessing release; ``sizes``: every site's n_k (public metadata: the weighting and the
        per-client calibrations depend on them); ``classes``: the run's label values. Nothing of another
        site is loaded: the other sites appear only as their row counts.
        """
        if not 0 <= cid < len(sizes) or sizes[cid] != len(frame):
            raise ValueError(f"client {cid} has {len(frame)} rows, but the run lists n_k = {list(sizes)}")
        index = {c: i for i, c in enumerate(classes)}
        labels = frame[stats.schema.target].astype(str)
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"site {name or cid} holds label value(s) {unknown} that the run's classes "
                             f"{list(classes)} lack")
        x = stats.transform(frame)
        data = Dataset(name=name or f"client-{cid}", x_train=x, y_train=np.array(labels.map(index), dtype=np.int64),
                       x_test=np.zeros((0, x.shape[1]), dtype=np.float32), y_test=np.zeros(0, dtype=np.int64),
                       feature_names=stats.feature_names, classes=tuple(classes),
                       parts=tuple(np.arange(n, dtype=np.int64) for n in sizes),  # only the own part indexes rows
                       guarantees=(stats.guarantee,), stats=stats)
        sites = Sites(data, data.parts, {cid: data.name})
        worker = Worker.for_config(config, data)
        run = plan_run(config, size=worker.size, sites=sites, only=cid, calibrate=calibrate)
        return cls(cid, torch.from_numpy(x), torch.from_numpy(data.y_train), config=config, run=run,
                   weight=run.weight(sites, cid), population=sites.population, worker=worker)

    @property
    def plan(self) -> PrivacyPlan:
        return self.run.plan

    @property
    def bound(self) -> BoundPipeline:
        return self.run.bound

    def rng(self, round: int) -> RandomSource:
        """This client's layer randomness for ``round`` (a CSPRNG; seeded only via the test seam)."""
        return party_rng(self.config, round, self.cid)

    def train(self, global_params: NDArray[np.float64], round: int) -> tuple[NDArray[np.float64], TrainResult]:
        """Train from ``global_params`` on this site's rows; the raw delta, checked finite, and the result."""
        result = self._fit(global_params, round)
        delta = self.worker.delta(global_params)
        self._check_finite(bool(np.all(np.isfinite(delta))), round)
        return delta, result

    def _fit(self, global_params: NDArray[np.float64], round: int) -> TrainResult:
        """Load ``global_params`` into the worker and train it on this site's rows."""
        if global_params.shape != (self.worker.size,):
            raise ValueError(
                f"global model has {global_params.size} parameters, client {self.cid} expects {self.worker.size}"
            )
        self.worker.load(global_params)
        return self.trainer.train(
            self.worker.model, self.features, self.labels, cid=self.cid, round=round,
            seed=derive_seed(self.config.seed, "train", round, self.cid),
        )

    def _check_finite(self, finite: bool, round: int) -> None:
        if not finite:
            raise NonFiniteUpdateError(
                f"client {self.cid}'s update has NaN/Inf values in round {round}; it is rejected. Lower the "
                f"learning rate or check that client's data for NaN/Inf"
            )

    def update(
        self, global_params: NDArray[np.float64], round: int, layer_state: Any = None
    ) -> tuple[NDArray[Any], TrainResult]:
        """Train, weight and encode: what this client hands to the secure sum in ``round``, with its result.

        ``layer_state``: the round's public state of stateful layers (e.g. aclip's clip norm), from the server.

        Raises :class:`~fl.errors.NonFiniteUpdateError` (nothing is sent) if training diverged.
        """
        result = self._fit(global_params, round)
        delta = self.worker.delta_blocks(global_params, self.weight)  # block by block: no float64 copy of d values
        self._check_finite(delta.all_finite(), round)
        return self.bound.encode(delta, self.rng(round), layer_state), result
