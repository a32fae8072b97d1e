"""The privagg ClientApp trains on each SuperNode's own CSV (issue 16, requirement 2).

Each node loads ONLY the file its own node config names; the preprocessing statistics are released once,
by a statistics round (round 0) through the run's secure sum with the DP noise each node adds itself;
every later start carries that release with the sites' n_k. The result equals the in-memory
``privagg train --site NAME=PATH ... --test-site PATH`` run for the same seed, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl.config import PrivacyConfig, TrainConfig
from fl.data.stats import default_session
from fl.runners.flower import site
from fl.runners.local import run_secure_sum
from fl.training.loop import Federation

SPECS = {"dp-sgd": PrivacyConfig(spec="dp-sgd,secagg+", epsilon=4.0, threshold=0.6),
         "dnoise": PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0, threshold=0.6)}


def split_sites(tmp_path: Path, k: int = 3) -> tuple[list[tuple[str, Path]], Path]:
    """breast_cancer split into ``k`` site CSVs (each in a directory of its own) and a server test CSV."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    test, rest = frame.iloc[:100], frame.iloc[100:]
    sites = []
    for i, part in enumerate(np.array_split(np.arange(len(rest)), k)):
        folder = tmp_path / f"node{i}"
        folder.mkdir()
        path = folder / f"hospital-{'abc'[i]}.csv"
        rest.iloc[part].to_csv(path, index=False)
        sites.append((f"hospital-{'abc'[i]}", path))
    test.to_csv(tmp_path / "test.csv", index=False)
    return sites, tmp_path / "test.csv"


def configs(sites: list[tuple[str, Path]], test: Path, privacy: PrivacyConfig,
            rounds: int = 2) -> tuple[TrainConfig, TrainConfig]:
    """(the in-memory ``--site`` config, the Flower job's config: no site path, one client per node)."""
    memory = TrainConfig(sites=tuple((n, str(p)) for n, p in sites), test_site=str(test), target="target",
                         rounds=rounds, seed=5, insecure_seeded_randomness=True, privacy=privacy)
    return memory, dataclasses.replace(memory, sites=(), clients=len(sites))


def simulate_flower(sites: list[tuple[str, Path]], job: TrainConfig) -> tuple[Any, list[Any]]:
    """The Flower own-data protocol with the real node and server functions, the sums run in memory."""
    tables = [site.own_table({site.DATA_PATH_KEY: str(p), site.SITE_NAME_KEY: n}, job) for n, p in sites]
    assert all(t is not None for t in tables)
    hellos = {cid: {"site": t.name, **site.own_hello(t, job, len(sites))} for cid, t in enumerate(tables) if t}
    own = site.own_sites(hellos, job)
    test = site.server_test_frame(job, own.schema)
    plan, request = site.stats_request(job, own, test)
    contrib = {cid: site.stats_contribution(t, job, cid, len(sites), request[site.STATS_KEY])
               for cid, t in enumerate(tables) if t}
    ssum, spec, _ = contrib[0]
    outcome = run_secure_sum(ssum, {c: v[2] for c, v in contrib.items()}, spec=spec,
                             session=default_session(job.seed), round=0)
    stats = site.release_from_total(plan, job, outcome.total, outcome.included, test)
    classes = site.run_classes(own, test)
    fed = Federation(job, dataset=site.server_dataset(own, stats, test, classes), own_parts=True)
    start = site.own_start_fields(stats, own, classes)
    sides = [site.own_client_side(t, job, cid, start[site.OWN_KEY], calibrate=_calibrate())
             for cid, t in enumerate(tables) if t]
    for r in range(1, job.rounds + 1):
        planned = fed.sample(r)
        values, results = {}, {}
        for cid in planned:
            values[cid], results[cid] = sides[cid].update(fed.params, r)
        out = run_secure_sum(fed.plan.pipeline.sum, values, spec=fed.bound.sum_spec, session=fed.session(r), round=r)
        fed.finish_round(r, planned, out, results)
    return fed, sides


def _calibrate() -> Any:
    from dp.accounting import calibrate_noise

    return calibrate_noise


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_own_data_protocol_equals_in_memory_site_run(tmp_path: Path, spec: str) -> None:
    sites, test = split_sites(tmp_path)
    memory, job = configs(sites, test, SPECS[spec])
    fed, sides = simulate_flower(sites, job)
    ref = Federation(memory)
    for r in range(1, memory.rounds + 1):
        ref.run_round(r)
    assert fed.data.stats is not None and ref.data.stats is not None
    assert fed.data.stats.to_json() == ref.data.stats.to_json()  # the one release, bit for bit
    for cid, side in enumerate(sides):
        np.testing.assert_array_equal(side.features.numpy(), ref.client(cid).features.numpy())
        assert side.weight == ref.client(cid).weight
    np.testing.assert_array_equal(fed.params, ref.params)
    assert json.dumps(fed.ledger.as_list(), default=str) == json.dumps(ref.ledger.as_list(), default=str)
    assert fed.ledger.as_list()[0]["stage"] == "preprocessing"  # the round-0 entry
    assert fed.server.report(baseline=None, per_client={})["sites"] == {"0": "hospital-a", "1": "hospital-b",
                                                                         "2": "hospital-c"}
