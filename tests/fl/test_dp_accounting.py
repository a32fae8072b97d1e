"""The federated ledgers: DP-FedAvg (client level) and DP-SGD (example level, per client)."""

from __future__ import annotations

import math

import pytest

from dp.accounting import PLD_FAST, compute_epsilon
from fl.dp_accounting import DpFedAvgAccounting, DpSgdAccounting
from fl.spec import RoundInfo, TrainResult


def rinfo(r: int, planned: int, included: int, *, q: float = 1.0, sampling: str = "fixed",
          population: int | None = None) -> RoundInfo:
    return RoundInfo(round=r, planned=tuple(range(planned)), included=tuple(range(included)),
                     population=population or planned, sample_rate=q, sampling=sampling)  # type: ignore[arg-type]


def test_fedavg_ledger_matches_the_accountant_and_reports_everything() -> None:
    acc = DpFedAvgAccounting(noise_multiplier=1.2, delta=1e-5, clip=0.5)
    for r in range(1, 6):
        rec = acc.record(rinfo(r, 10, 10, q=0.1, sampling="poisson", population=100), {})
    expected = compute_epsilon(noise_multiplier=1.2, delta=1e-5, sample_rate=0.1, steps=5, pld_interval=PLD_FAST)
    assert rec["epsilon"] == pytest.approx(expected)
    assert rec["noise_multiplier"] == 1.2 and rec["sample_rate"] == 0.1 and rec["steps"] == 5
    rep = acc.report()
    assert rep["accountant"] == "pld" and rep["delta"] == 1e-5
    mech = rep["mechanisms"][0]
    assert mech["noise_multiplier"] == 1.2 and mech["steps"] == 5 and mech["sample_rate"] == 0.1


def test_fedavg_budget_stops_before_overspending() -> None:
    eps_one = compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=1.0, steps=3, pld_interval=PLD_FAST)
    acc = DpFedAvgAccounting(noise_multiplier=2.0, delta=1e-5, clip=1.0, epsilon=eps_one + 1e-6)
    for r in range(1, 4):
        ok, _ = acc.can_run(rinfo(r, 5, 5))
        assert ok
        acc.record(rinfo(r, 5, 5), {})
    ok, why = acc.can_run(rinfo(4, 5, 5))
    assert not ok
    assert "round 4" in why and "budget" in why and "--epsilon" in why
    assert acc.spent()[0] <= eps_one + 1e-6


def test_distributed_dropouts_show_up_as_weaker_epsilon() -> None:
    full = DpFedAvgAccounting(noise_multiplier=2.0, delta=1e-5, clip=1.0, placement="clients", shares=10)
    dropped = DpFedAvgAccounting(noise_multiplier=2.0, delta=1e-5, clip=1.0, placement="clients", shares=10)
    central = DpFedAvgAccounting(noise_multiplier=2.0, delta=1e-5, clip=1.0, placement="server")
    for r in range(1, 4):
        full.record(rinfo(r, 10, 10), {})
        rec = dropped.record(rinfo(r, 10, 6), {})
        central.record(rinfo(r, 10, 6), {})
    assert rec["noise_multiplier"] == pytest.approx(2.0 * math.sqrt(0.6))
    assert dropped.spent()[0] > full.spent()[0]
    assert central.spent()[0] == pytest.approx(full.spent()[0])
    comp = dropped.report()["mechanisms"][0]["composition"]
    assert comp[0]["noise_multiplier"] == pytest.approx(2.0 * math.sqrt(0.6))


def test_fixed_cohort_uses_without_replacement() -> None:
    acc = DpFedAvgAccounting(noise_multiplier=3.0, delta=1e-5, clip=1.0)
    acc.record(rinfo(1, 10, 10, q=0.1, population=100), {})
    assert acc.report()["accountant_used"].startswith("rdp")


def dpsgd_result(z: float, q: float, steps: int) -> TrainResult:
    return TrainResult(num_samples=100, steps=steps, loss=0.5,
                       extra={"dp_sgd": {"noise_multiplier": z, "sample_rate": q, "steps": steps}})


def test_dpsgd_ledger_per_client_and_worst_case() -> None:
    acc = DpSgdAccounting(delta=1e-5, planned={0: (1.0, 0.1, 10), 1: (2.0, 0.5, 2)})
    for _ in range(3):
        rec = acc.record(rinfo(1, 2, 2), {0: dpsgd_result(1.0, 0.1, 10), 1: dpsgd_result(2.0, 0.5, 2)})
    e0 = compute_epsilon(noise_multiplier=1.0, delta=1e-5, sample_rate=0.1, steps=30, pld_interval=PLD_FAST)
    e1 = compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=0.5, steps=6, pld_interval=PLD_FAST)
    assert rec["epsilon"] == pytest.approx(max(e0, e1))
    assert rec["dp_sgd_clients"]["0"]["steps"] == 30
    clients = acc.report()["mechanisms"][0]["clients"]
    assert clients["0"]["epsilon"] == pytest.approx(e0) and clients["1"]["sample_rate"] == 0.5


def test_dpsgd_budget_and_missing_stats() -> None:
    e = compute_epsilon(noise_multiplier=1.0, delta=1e-5, sample_rate=0.2, steps=10, pld_interval=PLD_FAST)
    acc = DpSgdAccounting(delta=1e-5, planned={0: (1.0, 0.2, 5)}, epsilon=e + 1e-9)
    assert acc.can_run(rinfo(1, 1, 1))[0]
    acc.record(rinfo(1, 1, 1), {0: dpsgd_result(1.0, 0.2, 5)})
    assert acc.can_run(rinfo(2, 1, 1))[0]
    acc.record(rinfo(2, 1, 1), {0: dpsgd_result(1.0, 0.2, 5)})
    ok, why = acc.can_run(rinfo(3, 1, 1))
    assert not ok and "client 0" in why
    with pytest.raises(ValueError, match="DpSgdTrainer"):
        acc.record(rinfo(3, 1, 1), {0: TrainResult(num_samples=1, steps=1, loss=0.0)})


def test_dpsgd_guarantee_for_the_ledger() -> None:
    acc = DpSgdAccounting(delta=1e-5, planned={0: (1.0, 0.2, 5)})
    acc.record(rinfo(1, 1, 1), {0: dpsgd_result(1.0, 0.2, 5)})
    (g,) = acc.guarantees()
    assert "example level" in g.property and g.params["epsilon"] == pytest.approx(acc.spent()[0])
