"""Anyone can recompute epsilon from a report, and nobody who reads it can beat the reported epsilon.

The recomputations here use ``dp_accounting`` directly (its accountants and event classes, not our
``dp.accounting``), from the JSON report as written to disk: the events each observer entry carries, and
separately the events rebuilt from the stated mechanism (noise multiplier, sampling, counts per round).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from fl.config import PrivacyConfig, TrainConfig
from fl.layers.noise import GaussianNoise
from fl.privacy.accounting import DpFedAvgAccounting, SurvivorFloor
from fl.report import write_json
from fl.spec import RoundInfo
from fl.training.loop import Federation, train

TOL = 1e-3
CLASSES: dict[str, type[dp_event.DpEvent]] = {
    "NoOpDpEvent": dp_event.NoOpDpEvent,
    "GaussianDpEvent": dp_event.GaussianDpEvent,
    "PoissonSampledDpEvent": dp_event.PoissonSampledDpEvent,
    "SampledWithoutReplacementDpEvent": dp_event.SampledWithoutReplacementDpEvent,
    "SelfComposedDpEvent": dp_event.SelfComposedDpEvent,
    "ComposedDpEvent": dp_event.ComposedDpEvent,
}


def build(data: Mapping[str, Any]) -> dp_event.DpEvent:
    """A dp_accounting event from the report's JSON, by the test's own whitelist."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "class_name":
            continue
        if isinstance(value, Mapping):
            value = build(value)
        elif isinstance(value, list):
            value = [build(v) for v in value]
        kwargs[key] = value
    return CLASSES[data["class_name"]](**kwargs)


def pld(event: dp_event.DpEvent, delta: float, interval: float = 1e-3) -> float:
    return float(PLDAccountant(value_discretization_interval=interval).compose(event).get_epsilon(delta))


def rdp(event: dp_event.DpEvent, delta: float, relation: str) -> float:
    acc = RdpAccountant(neighboring_relation=NeighboringRelation[relation.upper()])
    return float(acc.compose(event).get_epsilon(delta))


def recompute(entry: Mapping[str, Any]) -> float:
    """Epsilon of one observer entry, from its event, relation and accountant, by dp_accounting alone."""
    event = build(entry["event"])
    if entry["accountant_used"].startswith("rdp"):
        return rdp(event, entry["delta"], entry["neighboring_relation"])
    assert entry["neighboring_relation"] == "add_or_remove_one"
    return pld(event, entry["delta"], entry["pld_value_discretization_interval"])


def run(tmp_path: Path, spec: str, **kw: Any) -> dict[str, Any]:
    pkw = {k: kw.pop(k) for k in list(kw) if k in PrivacyConfig.__dataclass_fields__}
    base: dict[str, Any] = dict(dataset="breast_cancer", clients=6, model="logreg", rounds=4, seed=0,
                                insecure_seeded_randomness=True)
    base.update(kw)
    config = TrainConfig(privacy=PrivacyConfig(spec=spec, **pkw), **base)
    path = tmp_path / "report.json"
    write_json(train(config, baseline=False), path)
    return dict(json.loads(path.read_text()))


def training_epsilon(report: dict[str, Any]) -> float:
    """The epsilon training spent: the headline also adds the preprocessing statistics (basic composition)."""
    final = report["final"]
    if "epsilon_preprocessing" in final:
        assert final["epsilon"] == pytest.approx(final["epsilon_training"] + final["epsilon_preprocessing"])
        return float(final["epsilon_training"])
    return float(final["epsilon"])


def observers(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["observer"]: o for o in report["privacy"]["observers"]}


def check_entries(report: Mapping[str, Any]) -> None:
    """Every observer entry recomputes to its epsilon; the headline is the largest."""
    entries = report["privacy"]["observers"]
    assert entries
    for entry in entries:
        assert recompute(entry) == pytest.approx(entry["epsilon"], abs=TOL)
    assert training_epsilon(report) == pytest.approx(max(e["epsilon"] for e in entries), abs=1e-12)


def released(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["rounds"] if r.get("included", 0) > 0 and "epsilon" in r]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_recompute_central_noise_with_poisson_sampling(tmp_path: Path, accountant: str) -> None:
    rep = run(tmp_path, "clip,noise", noise_multiplier=1.0, sample_rate=0.5, accountant=accountant)
    check_entries(rep)
    assert observers(rep)["released model"]["accountant_used"] == accountant
    mech = rep["privacy"]["mechanisms"][0]
    z, q, n = mech["noise_multiplier"], mech["sample_rate"], len(released(rep))
    assert (mech["sampling"], q, mech["steps"]) == ("poisson", 0.5, n)
    stated = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), n)
    delta = rep["privacy"]["delta"]  # training's share of the run's delta (the statistics take the rest)
    again = pld(stated, delta) if accountant == "pld" else rdp(stated, delta, "add_or_remove_one")
    assert again == pytest.approx(training_epsilon(rep), abs=TOL)
    assert set(observers(rep)) == {"released model"}


def test_recompute_central_noise_with_fixed_cohort(tmp_path: Path) -> None:
    rep = run(tmp_path, "clip,noise", noise_multiplier=2.0, cohort=3)
    check_entries(rep)
    entry = observers(rep)["released model"]
    assert entry["neighboring_relation"] == "replace_one"
    mech = rep["privacy"]["mechanisms"][0]
    # replace-one: one client's clipped update replaced by another moves the sum by 2 x clip
    inner = dp_event.GaussianDpEvent(mech["noise_multiplier"] / 2)
    stated = dp_event.SelfComposedDpEvent(dp_event.SampledWithoutReplacementDpEvent(6, 3, inner), mech["steps"])
    assert rdp(stated, 1e-5, "replace_one") == pytest.approx(training_epsilon(rep), abs=TOL)


def test_recompute_distributed_noise_with_dropouts(tmp_path: Path) -> None:
    rep = run(tmp_path, "clip,dnoise,secagg", noise_multiplier=1.0, dropout=0.3, threshold=0.5)
    check_entries(rep)
    mech = rep["privacy"]["mechanisms"][0]
    rounds = released(rep)
    assert any(r["included"] < r["planned"] for r in rounds), "the seeded run has dropouts"
    # the server knows who was sampled: each released round is an unamplified Gaussian carrying the noise
    # of the shares that survived
    z, shares = mech["noise_multiplier"], mech["shares"]
    stated = dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(z * math.sqrt(r["included"] / shares)) for r in rounds]
    )
    server = observers(rep)["server"]
    assert server["knows_schedule"] is True
    assert pld(stated, rep["privacy"]["delta"]) == pytest.approx(server["epsilon"], abs=TOL)
    assert training_epsilon(rep) == pytest.approx(server["epsilon"])


def test_recompute_dp_sgd(tmp_path: Path) -> None:
    rep = run(tmp_path, "dp-sgd", epsilon=1.0, clients=3, rounds=2)
    check_entries(rep)
    per_client = []
    for c in rep["privacy"]["mechanisms"][0]["clients"].values():
        step = dp_event.PoissonSampledDpEvent(c["sample_rate"], dp_event.GaussianDpEvent(c["noise_multiplier"]))
        per_client.append(pld(dp_event.SelfComposedDpEvent(step, c["steps"]), rep["privacy"]["delta"]))
    assert max(per_client) == pytest.approx(training_epsilon(rep), abs=TOL)
    assert training_epsilon(rep) <= 1.0


def test_recompute_discrete_gaussian_charges_the_grid_rounding() -> None:
    d, g, clip, z = 4096, 1.0 / 128, 1.0, 1.5
    noise = GaussianNoise(multiplier=z, placement="clients", shares=4, discrete=True, granularity=g)
    acc = DpFedAvgAccounting(noise=noise, clip=clip, size=d, delta=1e-5)
    for r in range(1, 6):
        acc.record(RoundInfo(round=r, planned=(0, 1, 2, 3), included=(0, 1, 2, 3)[: 3 + r % 2], population=4,
                             sample_rate=1.0), {})
    rep = json.loads(json.dumps({"privacy": acc.report(), "final": {"epsilon": acc.spent()[0]}}))
    check_entries(rep)
    mech = rep["privacy"]["mechanisms"][0]
    sens = clip + g * math.sqrt(d)  # randomized rounding moves each coordinate by < g
    assert mech["l2_sensitivity"] == pytest.approx(sens)
    stated = dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(z * clip * math.sqrt((3 + r % 2) / 4) / sens) for r in range(1, 6)]
    )
    assert pld(stated, rep["privacy"]["delta"]) == pytest.approx(training_epsilon(rep), abs=TOL)


def client_ids_in(obj: Any) -> list[Any]:
    """Every list of integers anywhere in ``obj`` (a schedule would show up as one)."""
    if isinstance(obj, Mapping):
        return [x for v in obj.values() for x in client_ids_in(v)]
    if isinstance(obj, list):
        if obj and all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
            return [obj]
        return [x for v in obj for x in client_ids_in(v)]
    return []


def run_recording_schedule(config: TrainConfig, tmp_path: Path) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
    fed = Federation(config)
    schedule: list[tuple[int, ...]] = []
    sample = fed.sample

    def recording(r: int) -> tuple[int, ...]:
        schedule.append(sample(r))
        return schedule[-1]

    fed.sample = recording  # type: ignore[method-assign]
    for r in range(1, config.rounds + 1):
        fed.run_round(r)
    write_json(fed.report(baseline=None), tmp_path / "r.json")
    return json.loads((tmp_path / "r.json").read_text()), schedule


def test_report_holds_no_schedule_and_the_seed_does_not_replay_it(tmp_path: Path) -> None:
    """Flaw 1: the sample came from a seeded numpy generator and the ledger listed the included ids, so
    anyone with the report replayed the schedule and the amplification by sampling did not hold."""
    config = TrainConfig(dataset="breast_cancer", clients=10, rounds=8, sample_rate=0.3, seed=0,
                         privacy=PrivacyConfig(spec="clip,noise", noise_multiplier=1.0))
    rep, schedule = run_recording_schedule(config, tmp_path)
    for part in ("rounds", "ledger", "guarantees", "privacy"):
        assert client_ids_in(rep[part]) == [], f"client ids in the report's {part}"
    # the old derivation from the public seed does not give the real sample
    old = [tuple(int(c) for c in np.flatnonzero(
        np.random.default_rng(int.from_bytes(__import__("hashlib").sha256(f"0:sample:{r}".encode()).digest()[:8],
                                             "big") >> 1).random(10) < 0.3)) for r in range(1, 9)]
    assert old != schedule
    # and two runs with the same seed draw different samples (CSPRNG, not the seed)
    again = Federation(config)
    assert [again.sample(r) for r in range(1, 9)] != schedule
    (entry,) = rep["privacy"]["observers"]
    assert entry["observer"] == "released model" and entry["knows_schedule"] is False


def test_observer_who_knows_the_schedule_gets_no_more_than_reported(tmp_path: Path) -> None:
    """The server knows the sample. Replaying it -- each client's unamplified Gaussians over exactly the
    rounds it was in -- must never exceed the epsilon the report states for the server observer."""
    config = TrainConfig(dataset="breast_cancer", clients=10, rounds=8, sample_rate=0.3, seed=1,
                         insecure_seeded_randomness=True,
                         privacy=PrivacyConfig(spec="clip,dnoise,secagg", noise_multiplier=1.0))
    rep, schedule = run_recording_schedule(config, tmp_path)
    by_round = {r["round"]: r for r in released(rep)}
    shares = rep["privacy"]["mechanisms"][0]["shares"]
    z = rep["privacy"]["mechanisms"][0]["noise_multiplier"]
    worst = 0.0
    for cid in range(10):
        mine = [dp_event.GaussianDpEvent(z * math.sqrt(by_round[r]["included"] / shares))
                for r, planned in enumerate(schedule, start=1) if cid in planned and r in by_round]
        if mine:
            worst = max(worst, pld(dp_event.ComposedDpEvent(mine), rep["privacy"]["delta"]))
    assert worst > 0
    reported = observers(rep)["server"]["epsilon"]
    assert worst <= reported + TOL
    assert rep["final"]["epsilon"] >= reported
    # amplified accounting (what the old report claimed) would be below what this observer really gets
    assert observers(rep)["released model"]["epsilon"] < worst


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_budget_stop_never_overspends_with_poisson_sampling_and_dropouts(seed: int) -> None:
    """Flaw 3: the pre-round worst case assumed ceil(0.7 * expected) survivors, while SecAgg's threshold is
    0.7 of the round's own planned count, so a small round could spend more than the budget allowed."""
    config = TrainConfig(dataset="breast_cancer", clients=10, rounds=12, sample_rate=0.3, dropout=0.3, seed=seed,
                         privacy=PrivacyConfig(spec="clip,dnoise,secagg", epsilon=3.0))
    rep = train(config, baseline=False)
    spent = [r["epsilon"] for r in rep["rounds"] if "epsilon" in r]
    assert spent and max(spent) <= 3.0 + 1e-9
    assert rep["final"].get("epsilon", 0.0) <= 3.0 + 1e-9


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_survivor_floor_is_the_secagg_servers_own_threshold(graph: str) -> None:
    from secagg.masking.graph import GraphSpec
    from secagg.masking.server import SecAggServer

    spec = GraphSpec(complete=True) if graph == "complete" else GraphSpec(complete=False, neighbours=4)
    floor = SurvivorFloor(threshold=0.7, graph=spec)
    for n in range(3, 40, 3):
        server = SecAggServer(list(range(n)), session=b"s" * 16, round=1, modulus=2**20, size=4, threshold=0.7,
                              graph=spec)
        assert floor(n) == server.threshold  # every share group keeps >= t, so >= t clients survive


def test_budget_stop_holds_when_the_fewest_possible_clients_survive() -> None:
    """Flaw 3, played as an adversary: for every planned count a Poisson round can have, whenever the ledger
    lets the round run, ending it with the fewest survivors SecAgg accepts stays within the budget. The old
    worst case (ceil(0.7 * expected) survivors, or all planned when fewer were planned) failed this at e.g.
    4 planned of 10 expected: it assumed 4 survivors, SecAgg accepts 3."""
    floor = SurvivorFloor(threshold=0.7)
    noise = GaussianNoise(multiplier=1.2, placement="clients", shares=10)
    for n in range(1, 31):
        acc = DpFedAvgAccounting(noise=noise, clip=1.0, size=8, delta=1e-5, epsilon=6.0, floor=floor)
        for r in range(1, 100):
            planned = tuple(range(n))
            info = RoundInfo(round=r, planned=planned, included=planned, population=100, sample_rate=0.1,
                             sampling="poisson")
            if not acc.can_run(info)[0]:
                break
            acc.record(RoundInfo(round=r, planned=planned, included=planned[: floor(n)], population=100,
                                 sample_rate=0.1, sampling="poisson"), {})
            assert acc.spent()[0] <= 6.0 + 1e-9, f"{n} planned, {floor(n)} survivors overspent"
        assert acc.rounds >= 1 or n <= 5  # a tiny round alone would overspend: refused before it runs


def test_epsilon_is_the_total_including_the_preprocessing_statistics() -> None:
    """``--epsilon E`` is what the run spends in all: the DP statistics take a tenth, training the rest, and
    the headline adds them (basic composition) -- it never hides the statistics' release."""
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=2, seed=0, insecure_seeded_randomness=True,
                         privacy=PrivacyConfig(spec="dp-sgd", epsilon=1.0))
    final = train(config, baseline=False, progress=False)["final"]
    # a tenth of the budget against the released model; without a secure sum the server sees each site's
    # vector with only its noise share, so its (worst-observer) epsilon is larger -- and that is charged
    assert final["epsilon_preprocessing"] >= 0.1 - 1e-6
    assert final["epsilon_training"] <= 1.0 - final["epsilon_preprocessing"] + 1e-6
    assert final["epsilon"] == pytest.approx(final["epsilon_training"] + final["epsilon_preprocessing"])
    assert final["epsilon"] <= 1.0 + 1e-6
    assert final["delta"] == pytest.approx(1e-5)  # training's 9e-6 plus the statistics' 1e-6: the total asked for


def test_statistics_budget_at_or_above_the_total_is_refused() -> None:
    config = TrainConfig(dataset="breast_cancer", clients=3, rounds=2, seed=0, stats_epsilon=1.5,
                         privacy=PrivacyConfig(spec="dp-sgd", epsilon=1.0))
    with pytest.raises(ValueError, match="leaves nothing for training"):
        train(config, baseline=False, progress=False)
