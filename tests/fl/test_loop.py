"""The training loop: FedSGD == synchronous SGD, n_k weighting, resume == uninterrupted, bad updates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fl.config import PrivacyConfig, TrainConfig
from fl.spec import TrainResult
from fl.training.loop import Federation, train
from fl.training.models import build_model, get_flat, set_flat


def test_fedsgd_equals_synchronous_sgd_on_the_union() -> None:
    """One full-batch local step, all clients, n_k weights, FedAvg lr 1 == full-batch SGD on all data."""
    lr, rounds = 0.5, 4
    cfg = TrainConfig(dataset="breast_cancer", clients=4, partition="dirichlet:1.0", model="logreg",
                      rounds=rounds, local_epochs=1, batch_size=10**9, lr=lr, seed=3)
    fed = Federation(cfg)
    sizes = sorted(fed.client_sizes.values())
    assert sizes[0] != sizes[-1], "the test needs unequal client sizes to exercise n_k weighting"
    for r in range(1, rounds + 1):
        fed.run_round(r)

    central = build_model("logreg", fed.data.num_features, fed.data.num_classes, seed=3)
    x = torch.from_numpy(fed.data.x_train)
    y = torch.from_numpy(fed.data.y_train)
    union = torch.from_numpy(np.concatenate(fed.parts))
    opt = torch.optim.SGD(central.parameters(), lr=lr)
    for _ in range(rounds):
        opt.zero_grad()
        nn.functional.cross_entropy(central(x[union]), y[union]).backward()
        opt.step()
    np.testing.assert_allclose(fed.params, get_flat(central), atol=2e-6)


def test_sample_weighting_and_uniform_weighting() -> None:
    base = TrainConfig(dataset="breast_cancer", clients=3, partition="dirichlet:0.8", rounds=1, seed=1)
    results = {}
    for weighting in ("samples", "uniform"):
        fed = Federation(replace(base, weighting=weighting))
        start = fed.params.copy()
        deltas = {}
        for cid in range(3):
            enc, _ = fed.client_update(cid, 1, start)
            deltas[cid] = enc / fed.weight(cid)
        fed.run_round(1)
        results[weighting] = (fed.params - start, deltas, fed.client_sizes)
    step, deltas, sizes = results["samples"]
    n = sum(sizes.values())
    np.testing.assert_allclose(step, sum(sizes[c] / n * deltas[c] for c in deltas), atol=1e-9)
    step_u, deltas_u, _ = results["uniform"]
    np.testing.assert_allclose(step_u, sum(deltas_u.values()) / 3, atol=1e-9)
    assert not np.allclose(step, step_u)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="breast_cancer", clients=5, partition="dirichlet:0.5", rounds=6, seed=7, cohort=4,
                      dropout=0.2, insecure_seeded_randomness=True,
                      privacy=PrivacyConfig(spec="clip,quantize", clip=5.0))
    full = train(cfg, baseline=False)
    first = train(replace(cfg, rounds=3), checkpoint_dir=tmp_path, baseline=False)
    assert len(first["rounds"]) == 3
    resumed = train(cfg, checkpoint_dir=tmp_path, resume=True, baseline=False)
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, 7))
    assert resumed["final"] == full["final"]
    a, b = Federation(cfg), Federation(cfg)
    a.load(tmp_path)
    for r in range(1, 7):
        b.run_round(r)
    np.testing.assert_array_equal(a.params, b.params)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig(rounds=1, seed=0)
    train(cfg, checkpoint_dir=tmp_path, baseline=False)
    with pytest.raises(ValueError, match="lr"):
        train(replace(cfg, rounds=2, lr=0.5), checkpoint_dir=tmp_path, resume=True, baseline=False)


class NanForClient:
    """A trainer that poisons one client's update with NaN."""

    def __init__(self, inner: Any, bad: int) -> None:
        self.inner, self.bad = inner, bad

    def train(self, model: Any, features: Any, labels: Any, *, cid: int, round: int, seed: int) -> TrainResult:
        res = self.inner.train(model, features, labels, cid=cid, round=round, seed=seed)
        if cid == self.bad:
            flat = get_flat(model)
            flat[0] = np.nan
            set_flat(model, flat)
        return res


def test_nan_update_is_rejected_and_model_stays_finite(caplog: pytest.LogCaptureFixture) -> None:
    fed = Federation(TrainConfig(clients=4, rounds=1, seed=0))
    fed.trainer = NanForClient(fed.trainer, bad=2)
    record = fed.run_round(1)
    assert record["rejected"] == 1  # a count: which client is the server's knowledge only
    assert fed.server_log == [{"round": 1, "rejected": [2]}]
    assert record["included"] == 3
    assert np.all(np.isfinite(fed.params))
    assert "NaN" in caplog.text


def test_poisson_sampling_and_fixed_cohort() -> None:
    fed = Federation(TrainConfig(clients=10, cohort=4, seed=0, dataset="digits"))
    picks = [fed.sample(r) for r in range(1, 6)]
    assert all(len(p) == 4 and len(set(p)) == 4 for p in picks)
    assert len(set(picks)) > 1
    fed_q = Federation(TrainConfig(clients=10, sample_rate=0.3, seed=0, dataset="digits"))
    sizes = [len(fed_q.sample(r)) for r in range(1, 40)]
    assert 1.5 < np.mean(sizes) < 4.5
    assert fed_q.round_info(1, (0,), (0,)).sampling == "poisson"


def test_fedadam_trains() -> None:
    rep = train(TrainConfig(rounds=8, server_opt="fedadam", server_lr=0.05, seed=0), baseline=False)
    assert rep["final"]["accuracy"] > 0.9


def test_report_shape_and_breast_cancer_bar() -> None:
    rep = train(TrainConfig(dataset="breast_cancer", clients=5, partition="dirichlet:0.5", rounds=20,
                            model="logreg", seed=0))
    assert {"config", "rounds", "final", "baseline", "guarantees"} <= set(rep)
    assert {"round", "accuracy", "loss"} <= set(rep["rounds"][0])
    assert rep["final"]["accuracy"] >= 0.96
    assert rep["baseline"]["centralized_accuracy"] > 0.95
    assert [g["layer"] for g in rep["guarantees"]] == ["federated-statistics", "plain-sum"]  # preprocessing stays


def test_dp_resume_keeps_the_ledger_and_refuses_new_rounds(tmp_path: Path) -> None:
    cfg = TrainConfig(clients=5, rounds=4, seed=2, insecure_seeded_randomness=True,
                      privacy=PrivacyConfig(spec="clip,noise", clip=1.0, epsilon=3.0))
    full = train(cfg, baseline=False)
    # interrupt after round 2: rewrite the checkpoint from a 2-round run with the same calibration
    ck = tmp_path / "half"
    fed = Federation(cfg)
    for r in (1, 2):
        fed.run_round(r)
    fed.save(ck)
    resumed = train(cfg, checkpoint_dir=ck, resume=True, baseline=False)
    assert resumed["final"]["epsilon"] == pytest.approx(full["final"]["epsilon"], rel=1e-9)
    assert resumed["final"]["accuracy"] == full["final"]["accuracy"]
    assert resumed["guarantees"] == full["guarantees"]
    with pytest.raises(ValueError, match="same --rounds"):
        train(replace(cfg, rounds=8), checkpoint_dir=ck, resume=True, baseline=False)
