"""Over Flower the preprocessing statistics are released once: the job carries them, every process reuses them.

Before, each ClientApp process (and the ServerApp) summed the statistics itself, each with fresh DP noise:
several releases, charged as one, and nodes standardizing with different numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fl.data.sites as sites_mod
from fl.cli.flower import release_statistics
from fl.config import PrivacyConfig, TrainConfig
from fl.data.stats import DataError, FederatedStats
from fl.runners.flower import FlowerJob, JobError
from fl.runners.flower.job import job_stats
from fl.training.client import ClientSide

CONFIG = TrainConfig(dataset="breast_cancer", clients=3, rounds=1, privacy=PrivacyConfig(spec="dp-sgd", epsilon=2.0))


def test_the_release_round_trips_through_json_exactly() -> None:
    raw = release_statistics(CONFIG)
    assert raw is not None
    job = FlowerJob(task="train", config=CONFIG.as_dict(), stats=raw)
    again = FlowerJob.from_json(job.to_json())
    stats = job_stats(again)
    assert isinstance(stats, FederatedStats)
    assert stats.to_json() == raw  # JSON, no pickle, nothing lost
    params = stats.guarantee.params  # a tenth of epsilon = 2, against the worst observer (plain sum: the server)
    assert stats.event is not None and max(params["epsilon"], params["epsilon_server"]) == pytest.approx(0.2, rel=1e-3)


def test_every_process_standardizes_with_the_one_release(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = release_statistics(CONFIG)  # the CLI releases once, when it writes the job
    calls: list[Any] = []
    real = sites_mod.federated_statistics
    monkeypatch.setattr(sites_mod, "federated_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    stats = FederatedStats.from_json(raw or {})
    a = ClientSide.for_site(CONFIG, 0, stats=stats)
    b = ClientSide.for_site(CONFIG, 0, stats=FederatedStats.from_json(raw or {}))  # another (cold) process
    assert calls == []  # no process sums (and releases) the statistics again
    assert np.array_equal(a.features.numpy(), b.features.numpy())
    c = ClientSide.for_site(CONFIG, 0)  # the old path: a fresh, differently noised release per process
    assert calls == [1] and not np.array_equal(a.features.numpy(), c.features.numpy())


def test_a_malformed_release_is_refused_naming_the_fix() -> None:
    raw = dict(release_statistics(CONFIG) or {})
    raw["std"] = [0.0] * len(raw["std"])
    with pytest.raises(DataError, match="rerun the job"):
        FederatedStats.from_json(raw)
    with pytest.raises(JobError, match="stats must be an object"):
        FlowerJob(task="train", config=CONFIG.as_dict(), stats=[1, 2])  # type: ignore[arg-type]
