"""DP end to end through fl.training.loop.train: DP-SGD clients, DP-FedAvg with dropouts, budget stops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl.config import PrivacyConfig, TrainConfig
from fl.training.dp_sgd import DpSgdTrainer
from fl.training.loop import train


def test_dp_sgd_trainer_reports_what_it_did() -> None:
    t = DpSgdTrainer(noise_multiplier={3: 1.5}, max_grad_norm=1.0, batch_size=16, epochs=2, lr=0.1,
                     seeded_noise_for_testing=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    res = t.train(model, x, y, cid=3, round=1, seed=7)
    stats = res.extra["dp_sgd"]
    assert res.steps == stats["steps"] == 2 * math.ceil(50 / 16)
    assert stats["sample_rate"] == pytest.approx(16 / 50)
    assert stats["noise_multiplier"] == 1.5 and stats["mode"] == "direct"
    with pytest.raises(ValueError, match="client 4"):
        t.train(model, x, y, cid=4, round=1, seed=7)


def cfg(spec: str, **kw: object) -> TrainConfig:
    pkw = {k: kw.pop(k) for k in list(kw) if k in PrivacyConfig.__dataclass_fields__}
    base = dict(dataset="breast_cancer", clients=4, partition="iid", model="logreg", rounds=3, seed=0,
                insecure_seeded_randomness=True)
    base.update(kw)
    return TrainConfig(privacy=PrivacyConfig(spec=spec, **pkw), **base)  # type: ignore[arg-type]


def test_dp_sgd_run_meets_budget_and_reports_per_client_figures() -> None:
    config = cfg("dp-sgd", epsilon=1.0, delta=1e-5, dpsgd_batch_size=32)
    report = train(config, baseline=False)
    assert report["final"]["epsilon"] <= 1.0
    assert report["final"]["epsilon"] > 0.9  # calibrated for exactly these rounds
    priv = report["privacy"]
    # training gets 9/10 of delta, the preprocessing statistics the rest: the run's total is the 1e-5 asked for
    assert priv["accountant"] == "pld" and priv["delta"] == pytest.approx(9e-6)
    assert report["final"]["delta"] == pytest.approx(1e-5)
    clients = priv["mechanisms"][0]["clients"]
    assert len(clients) == 4
    for c in clients.values():
        assert {"noise_multiplier", "sample_rate", "steps"} <= set(c)
        assert c["steps"] == 3 * math.ceil(1 / c["sample_rate"]) or c["sample_rate"] == 1.0
    last = report["rounds"][-1]
    assert {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps"} <= set(last)
    again = train(config, baseline=False)
    assert again["final"]["accuracy"] == report["final"]["accuracy"]  # the seeded test seam repeats


def test_central_dp_fedavg_with_secagg_plus() -> None:
    report = train(cfg("clip,noise,secagg+", noise_multiplier=0.8, clip=1.0, rounds=2), baseline=False)
    rounds = report["rounds"]
    assert len(rounds) == 2
    assert rounds[-1]["noise_multiplier"] == 0.8 and rounds[-1]["steps"] == 2
    assert report["privacy"]["mechanisms"][0]["placement"] == "central"
    layers = [g["layer"] for g in report["guarantees"]]
    assert any("noise" in name for name in layers)


def test_distributed_noise_survives_dropouts_within_budget() -> None:
    # calibrated so the budget holds even if only the SecAgg threshold of clients survives each round
    config = cfg("clip,dnoise,secagg", epsilon=2.0, rounds=4, clients=5, dropout=0.2, threshold=0.6)
    report = train(config, baseline=False)
    released = [r for r in report["rounds"] if "epsilon" in r]
    eps = [r["epsilon"] for r in released]
    assert report["final"]["epsilon"] <= 2.0
    assert eps == sorted(eps)
    mech = report["privacy"]["mechanisms"][0]
    assert mech["placement"] == "distributed" and mech["min_included"] == 3
    z = mech["noise_multiplier"]
    dropped = [r for r in released if r["included"] < r["planned"]]
    assert dropped, "the seeded run has rounds with dropouts"
    for r in released:  # each round is charged the noise of its survivors only
        assert r["noise_multiplier"] == pytest.approx(z * math.sqrt(r["included"] / r["planned"]))
