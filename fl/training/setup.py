"""What both halves of a run derive from its config: the sites and the privacy plan.

A client side and a server side built from the same :class:`~fl.config.TrainConfig` compute the same
public facts here (how many clients, each one's sample count, the pipeline bound for the largest cohort,
the weighting), so a SuperNode that builds only its own client side agrees with the server bit for bit.
Sample counts and the population are public metadata; the rows themselves stay with their site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dp.accounting import calibrate_noise
from fl.config import TrainConfig
from fl.data.sites import Dataset, load_federated, partition
from fl.data.stats import FederatedStats
from fl.pipeline import BoundPipeline
from fl.privacy.plan import Calibrator, PrivacyPlan, build_plan
from fl.spec import ClientTrainer, ValueSpec
from fl.training.class_weights import ClassWeights, apply_class_weights, resolve_class_weights
from fl.training.trainers import PlainTrainer

__all__ = ["RunPlan", "Sites", "load_sites", "plan_run"]


@dataclass(frozen=True)
class Sites:
    """The run's data and how it is split: ``parts[cid]`` are client ``cid``'s rows of ``data.x_train``."""

    data: Dataset
    parts: tuple[NDArray[np.int64], ...]
    site_names: Mapping[int, str]

    @property
    def population(self) -> int:
        return len(self.parts)

    @property
    def client_sizes(self) -> dict[int, int]:
        """Each client's sample count n_k (public metadata)."""
        return {k: len(p) for k, p in enumerate(self.parts)}

    @property
    def mean_size(self) -> float:
        return float(np.mean([len(p) for p in self.parts]))


def load_sites(
    config: TrainConfig, *, dataset: Dataset | None = None, stats: FederatedStats | None = None,
    own_parts: bool = False,
) -> Sites:
    """Load the run's sites: per-site files or a split table, or split an in-memory ``dataset``.

    Each site keeps its rows; standardization statistics are federated (:mod:`fl.data.stats`), or reused
    from a checkpoint (``stats``) so a resumed run never releases them twice.
    """
    if dataset is None or own_parts:  # the data's own sites are the clients
        data = dataset if dataset is not None else load_federated(config, stats=stats)
        return Sites(data, tuple(data.parts), dict(enumerate(data.site_names)))
    parts = partition(dataset, config.partition, config.clients, seed=config.seed)
    return Sites(dataset, tuple(parts), {})


@dataclass(frozen=True)
class RunPlan:
    """The privacy plan bound for this run, with the trainer and weighting it implies."""

    plan: PrivacyPlan
    bound: BoundPipeline
    trainer: ClientTrainer
    weighting: Literal["samples", "uniform"]
    max_cohort: int
    stats_budget: tuple[float, float] | None
    class_weights: ClassWeights | None = None  # the run's one class-weight vector (--class-weight), if any

    def weight(self, sites: Sites, cid: int) -> float:
        """Client ``cid``'s averaging weight: ``n_k / n_mean`` under ``"samples"``, else 1."""
        return sites.client_sizes[cid] / sites.mean_size if self.weighting == "samples" else 1.0


def _check_sampling(config: TrainConfig, population: int) -> None:
    if config.cohort is not None and not 1 <= config.cohort <= population:
        raise ValueError(f"--cohort must be between 1 and the number of clients ({population})")
    if config.sample_rate is not None and not 0 < config.sample_rate <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {config.sample_rate}")


def statistics_budget(data: Dataset) -> tuple[float, float] | None:
    """(epsilon, delta) the DP preprocessing statistics spent (worst observer), or None without DP."""
    stats = getattr(data, "stats", None)
    if stats is None or stats.event is None:
        return None
    params = stats.guarantee.params
    return max(float(params["epsilon"]), float(params.get("epsilon_server", 0.0))), float(params["delta"])


def training_budget(config: TrainConfig, stats: tuple[float, float] | None) -> TrainConfig:
    """The config whose ``--epsilon`` is what training may spend: the budget less the statistics' epsilon.

    The statistics and training compose (basic composition: epsilons and deltas add), so ``--epsilon E
    --delta D`` stay the totals the report states (the statistics take a share of both)."""
    eps = config.privacy.epsilon
    if stats is None or eps is None:
        return config
    left, delta_left = eps - stats[0], config.privacy.delta - stats[1]
    if left <= 1e-3 * eps or delta_left <= 0:
        raise ValueError(
            f"--epsilon {eps:g} --delta {config.privacy.delta:g} leaves nothing for training after the "
            f"preprocessing statistics spent ({stats[0]:.3g}, {stats[1]:.3g}): raise --epsilon or lower --stats-epsilon"
        )
    return replace(config, privacy=replace(config.privacy, epsilon=left, delta=delta_left))


def plan_run(
    config: TrainConfig, *, size: int, sites: Sites, only: int | None = None, calibrate: Calibrator = calibrate_noise
) -> RunPlan:
    """Build and bind the privacy plan for a model of ``size`` parameters over ``sites``.

    ``only``: a client side's own plan; per-client calibration (DP-SGD) is done for that client alone
    (the result for it is the same number the server's plan holds: it depends only on its own n_k).
    """
    population = sites.population
    _check_sampling(config, population)
    stats_budget = statistics_budget(sites.data)
    sizes = sites.client_sizes
    plan = build_plan(
        training_budget(config, stats_budget), size=size, population=population,
        client_sizes={only: sizes[only]} if only is not None else sizes, calibrate=calibrate,
        smallest_client=min(sizes.values(), default=1),
    )
    trainer = plan.trainer or PlainTrainer(
        epochs=config.local_epochs, lr=config.client_lr, batch_size=config.batch_size, optimizer=config.optimizer
    )
    weights = resolve_class_weights(config, sites.data)  # from public numbers or the released statistics only
    trainer = apply_class_weights(trainer, weights)
    # Rings are sized for the most clients a round can have (all of them under Poisson sampling).
    max_cohort = config.cohort if (config.cohort and config.sample_rate is None) else population
    bound = plan.pipeline.bind(ValueSpec(size=size, cohort=max_cohort))
    return RunPlan(plan, bound, trainer, plan.weighting or config.weighting, max_cohort, stats_budget, weights)
