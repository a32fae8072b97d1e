"""The federated ledgers: DP-FedAvg (client level) and DP-SGD (example level, per client)."""

from __future__ import annotations

import json
import math

import pytest

from dp.accounting import PLD_FAST, compute_epsilon
from fl.layers.noise import GaussianNoise
from fl.privacy.accounting import DpFedAvgAccounting, DpSgdAccounting, SurvivorFloor
from fl.spec import RoundInfo, TrainResult


def rinfo(r: int, planned: int, included: int, *, q: float = 1.0, sampling: str = "fixed",
          population: int | None = None) -> RoundInfo:
    return RoundInfo(round=r, planned=tuple(range(planned)), included=tuple(range(included)),
                     population=population or planned, sample_rate=q, sampling=sampling)  # type: ignore[arg-type]


def fedavg(z: float, *, placement: str = "server", shares: int = 1, **kw: object) -> DpFedAvgAccounting:
    noise = GaussianNoise(multiplier=z, placement=placement, shares=shares)  # type: ignore[arg-type]
    return DpFedAvgAccounting(noise=noise, clip=kw.pop("clip", 1.0), size=8, delta=1e-5, **kw)  # type: ignore[arg-type]


def test_fedavg_ledger_matches_the_accountant_and_reports_everything() -> None:
    acc = fedavg(1.2, clip=0.5)
    for r in range(1, 6):
        rec = acc.record(rinfo(r, 10, 10, q=0.1, sampling="poisson", population=100), {})
    expected = compute_epsilon(noise_multiplier=1.2, delta=1e-5, sample_rate=0.1, steps=5, pld_interval=PLD_FAST)
    assert rec["epsilon"] == pytest.approx(expected)
    assert rec["noise_multiplier"] == 1.2 and rec["sample_rate"] == 0.1 and rec["steps"] == 5
    rep = acc.report()
    assert rep["accountant"] == "pld" and rep["delta"] == 1e-5
    mech = rep["mechanisms"][0]
    assert mech["noise_multiplier"] == 1.2 and mech["steps"] == 5 and mech["sample_rate"] == 0.1
    (obs,) = rep["observers"]
    assert obs["observer"] == "released model" and obs["knows_schedule"] is False
    assert obs["epsilon"] == pytest.approx(expected)


def test_fedavg_budget_stops_before_overspending() -> None:
    eps_one = compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=1.0, steps=3, pld_interval=PLD_FAST)
    acc = fedavg(2.0, epsilon=eps_one + 1e-6)
    for r in range(1, 4):
        ok, _ = acc.can_run(rinfo(r, 5, 5))
        assert ok
        acc.record(rinfo(r, 5, 5), {})
    ok, why = acc.can_run(rinfo(4, 5, 5))
    assert not ok
    assert "round 4" in why and "budget" in why and "--epsilon" in why
    assert acc.spent()[0] <= eps_one + 1e-6


def test_distributed_dropouts_show_up_as_weaker_epsilon() -> None:
    full = fedavg(2.0, placement="clients", shares=10)
    dropped = fedavg(2.0, placement="clients", shares=10)
    central = fedavg(2.0)
    for r in range(1, 4):
        full.record(rinfo(r, 10, 10), {})
        rec = dropped.record(rinfo(r, 10, 6), {})
        central.record(rinfo(r, 10, 6), {})
    assert rec["noise_multiplier"] == pytest.approx(2.0 * math.sqrt(0.6))
    assert dropped.spent()[0] > full.spent()[0]
    assert central.spent()[0] == pytest.approx(full.spent()[0])
    comp = dropped.report()["mechanisms"][0]["composition"]
    assert comp[0]["noise_multiplier"] == pytest.approx(2.0 * math.sqrt(0.6))


def test_server_observer_of_distributed_noise_gets_no_amplification() -> None:
    """Flaw 1: the server knows the sample; its epsilon must be the unamplified Gaussian of every round."""
    acc = fedavg(1.0, placement="clients", shares=20)
    for r in range(1, 21):
        acc.record(rinfo(r, 20, 20, q=0.2, sampling="poisson", population=100), {})
    eps = acc.epsilons()
    plain = compute_epsilon(noise_multiplier=1.0, delta=1e-5, sample_rate=1.0, steps=20, pld_interval=PLD_FAST)
    amplified = compute_epsilon(noise_multiplier=1.0, delta=1e-5, sample_rate=0.2, steps=20, pld_interval=PLD_FAST)
    assert eps["server"] == pytest.approx(plain)
    assert eps["released model"] == pytest.approx(amplified)
    assert acc.spent()[0] == pytest.approx(plain)  # the headline covers the strongest observer
    assert eps["server"] > 2 * eps["released model"]


def test_budget_worst_case_uses_the_rounds_own_threshold() -> None:
    """Flaw 3: with Poisson sampling a round's threshold is a fraction of *its* planned count, which can be
    far below the expected count: the worst case must be the sum's real minimum for that round."""
    floor = SurvivorFloor(threshold=0.7)
    acc = fedavg(3.0, placement="clients", shares=10, floor=floor, epsilon=10.0)
    small = rinfo(1, 4, 4, q=0.1, sampling="poisson", population=100)  # 4 planned, expected 10
    assert acc.worst_case(small).n_included == floor(4) == 3  # not ceil(0.7 * 10) = 7
    assert floor(10) == 7 and floor(1) == 1 and floor(0) == 0
    z_worst = 3.0 * math.sqrt(3 / 10)
    spent = compute_epsilon(noise_multiplier=z_worst, delta=1e-5, sample_rate=1.0, steps=1, pld_interval=PLD_FAST)
    tight = fedavg(3.0, placement="clients", shares=10, floor=floor, epsilon=spent * 0.999)
    assert not tight.can_run(small)[0]
    assert fedavg(3.0, placement="clients", shares=10, floor=floor, epsilon=spent * 1.001).can_run(small)[0]


def test_secagg_plus_floor_is_the_share_group_threshold() -> None:
    from secagg.masking.graph import GraphSpec

    graph = GraphSpec(complete=False, neighbours=4)
    floor = SurvivorFloor(threshold=0.5, graph=graph)
    assert floor(100) == 3  # a group of k + 1 = 5 needs ceil(0.5 * 5) = 3 survivors; nothing stops fewer overall


def test_fixed_cohort_uses_without_replacement() -> None:
    acc = fedavg(3.0)
    acc.record(rinfo(1, 10, 10, q=0.1, population=100), {})
    assert acc.report()["accountant_used"].startswith("rdp")
    assert acc.report()["observers"][0]["neighboring_relation"] == "replace_one"


def test_ledger_state_round_trips_through_json() -> None:
    acc = fedavg(1.5, placement="clients", shares=5)
    for r in range(1, 4):
        acc.record(rinfo(r, 5, 3 + r % 2), {})
    again = fedavg(1.5, placement="clients", shares=5)
    again.load_state(json.loads(json.dumps(acc.state())))
    assert again.epsilons() == acc.epsilons() and again.rounds == 3
    with pytest.raises(ValueError, match="observers"):
        fedavg(1.5).load_state(acc.state())


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
