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


@pytest.mark.flower
@pytest.mark.slow
def test_three_supernodes_train_on_their_own_csvs_over_flower(tmp_path: Path) -> None:
    """Real processes, TLS: 3 SuperNodes, each with only its own CSV; clip + dnoise + SecAgg+ for 2 rounds
    after a statistics round; the model, the release and the ledger equal the in-memory --site run."""
    from fl.runners.flower import FlowerJob, LocalCluster, NodePolicy
    from fl.runners.flower.processes import group_alive

    sites, test = split_sites(tmp_path)
    memory, job_config = configs(sites, test, SPECS["dnoise"])
    c = LocalCluster(tmp_path / "cluster", 3, tls=True, fleet_poll=0.1, sites=sites,
                     policy=NodePolicy(allow_insecure_seeded_randomness=True))  # the seam, for the comparison
    try:
        c.start(timeout=60)
        job = FlowerJob(task="train", out=str(tmp_path / "out"), config=job_config.as_dict(), join_timeout=60,
                        start_timeout=90, phase_timeout=30)
        result = c.run(job, timeout=240)
        app = (c.workdir / "app" / "pyproject.toml").read_text()
    finally:
        c.stop()
        started = [p.pid for p in [c.superlink, *c.nodes.values()] if p is not None]
        assert started and not [pid for pid in started if group_alive(pid)]
    assert not [p for _, p in sites if str(p) in app or p.parent.name in app]  # no node is told any site's path
    ref = Federation(memory)
    for r in (1, 2):
        ref.run_round(r)
    np.testing.assert_array_equal(np.load(result["params_file"]), ref.params)
    report = result["report"]
    assert report["ledger"] == json.loads(json.dumps(ref.ledger.as_list(), default=str))
    assert report["ledger"][0]["stage"] == "preprocessing"  # the statistics round's entry, round 0
    assert report["sites"] == {"0": "hospital-a", "1": "hospital-b", "2": "hospital-c"}
    assert [r["included_sites"] for r in result["rounds"]] == [["hospital-a", "hospital-b", "hospital-c"]] * 2
    assert report["final"]["accuracy"] == pytest.approx(ref.history[-1]["accuracy"])
    assert report["final"]["epsilon"] == pytest.approx(ref.report(baseline=None)["final"]["epsilon"])
    phases = [(e["round"], e["phase"]) for e in result["exchanges"]]
    assert phases[:4] == [(0, "advertise"), (0, "share"), (0, "masked"), (0, "unmask")]  # the statistics round
    assert "per_client" in report and report["per_client"] == {}  # no per-site metrics from the nodes


# ---- the real ServerApp and ClientApp functions in one process (no Flower processes) ----------------------
def _own_contexts(tmp_path: Path, sites: list[tuple[str, Path]], job: Any, *, policy: Path | None = None) -> Any:
    from tests.adversary.flower_harness import node_context

    contexts = {}
    for cid, (name, path) in enumerate(sites):
        ctx = node_context(tmp_path, 100 + cid, cid, len(sites), job.to_json(), policy=policy)
        ctx.node_config.update({site.DATA_PATH_KEY: str(path), site.SITE_NAME_KEY: name})
        contexts[100 + cid] = ctx
    return contexts


@pytest.fixture
def _as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.adversary.flower_harness import server_identity

    server_identity(monkeypatch)


@pytest.mark.usefixtures("_as_server")
@pytest.mark.parametrize(("standardize", "in_flight"), [("federated", 1), ("public", 1), ("federated", 2)])
def test_serve_on_the_nodes_own_csvs_without_a_test_set(tmp_path: Path, standardize: str, in_flight: int) -> None:
    """The ServerApp over in-process nodes: a statistics round (or, ``--standardize public``, none), then
    training; with no server test data the report says "no evaluation set" and no round carries an accuracy.
    ``in_flight=2``: the training rounds agree their keys ahead (the release travels with open and model)."""
    from fl.runners.flower import FlowerJob, NodePolicy
    from fl.runners.flower.link import Progress
    from fl.runners.flower.serverapp import NO_EVALUATION, serve
    from tests.adversary.flower_harness import InProcessGrid

    sites, test = split_sites(tmp_path)
    _, job_config = configs(sites, test, SPECS["dnoise"], rounds=1)
    bounds = public_bounds()  # without server data the public ranges must be declared (--bounds)
    job = FlowerJob(task="train", out=str(tmp_path / "out"), join_timeout=5, start_timeout=60, phase_timeout=30,
                    config=dataclasses.replace(job_config, test_site=None, feature_bounds=bounds,
                                               standardize=standardize).as_dict(),
                    poll_interval=0.0, rounds_in_flight=in_flight)
    policy = NodePolicy(allow_insecure_seeded_randomness=True).save(tmp_path / "policy.json")
    (tmp_path / "out").mkdir()
    result = serve(InProcessGrid(_own_contexts(tmp_path, sites, job, policy=policy)), job,  # type: ignore[arg-type]
                   Progress(tmp_path / "out"))
    report = result["report"]
    assert report["evaluation"] == NO_EVALUATION
    assert "accuracy" not in result["rounds"][0] and "accuracy" not in report["final"]
    assert result["rounds"][0]["included_sites"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert report["ledger"][0]["stage"] == "preprocessing" and report["final"]["epsilon"] > 0
    statistics_round = [e for e in result["exchanges"] if e["round"] == 0]
    if standardize == "public":  # public ranges only: no node is asked for anything before round 1
        assert not statistics_round and "public-standardization" in json.dumps(report["ledger"][0])
    else:
        assert len(statistics_round) == 4 and "federated-statistics" in json.dumps(report["ledger"][0])


def public_bounds() -> tuple[tuple[str, float, float], ...]:
    """Declared public ranges of breast_cancer's columns (0 to twice the largest value: a format fact here)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True).data
    return tuple((str(c), 0.0, 2.0 * float(data[c].max())) for c in data.columns)


def _stats_request_for(sites: list[tuple[str, Path]], job_config: TrainConfig) -> dict[str, Any]:
    tables = [site.own_table({site.DATA_PATH_KEY: str(p), site.SITE_NAME_KEY: n}, job_config) for n, p in sites]
    hellos = {c: {"site": t.name, **site.own_hello(t, job_config, len(sites))} for c, t in enumerate(tables) if t}
    own = site.own_sites(hellos, job_config)
    return site.stats_request(job_config, own, site.server_test_frame(job_config, own.schema))[1]


@pytest.mark.usefixtures("_as_server")
def test_a_node_releases_its_statistics_once_and_pins_the_release(tmp_path: Path) -> None:
    """A malicious ServerApp asks a node for its statistics twice (a second, freshly noised release of its
    data), or switches the preprocessing release between rounds: the node refuses both."""
    from fl.runners.flower import FlowerJob
    from fl.runners.flower.clientapp import _own_release
    from fl.runners.flower.job import START
    from fl.runners.flower.policy import PolicyError
    from tests.adversary.flower_harness import deliver, instruction

    sites, test = split_sites(tmp_path)
    _, job_config = configs(sites, test, SPECS["dnoise"], rounds=1)
    job_config = dataclasses.replace(job_config, insecure_seeded_randomness=False)  # the default policy's terms
    job = FlowerJob(task="train", out=str(tmp_path / "out"), config=job_config.as_dict())
    ctx = _own_contexts(tmp_path, sites, job)[100]
    ask = {**_stats_request_for(sites, job_config), "round": 0, "session": b"s" * 16}
    first = deliver(instruction(100, START, ask, message_id="a"), ctx)
    assert not first.has_error() and len(first.content["privagg"]["msgs"]) == 1  # its advertise message
    again = deliver(instruction(100, START, {**ask, "session": b"t" * 16}, message_id="b"), ctx)
    assert again.has_error() and "already released its statistics" in again.error.reason
    seeded = FlowerJob(task="train", out=str(tmp_path / "out"),
                       config=dataclasses.replace(job_config, insecure_seeded_randomness=True).as_dict())
    ctx2 = _own_contexts(tmp_path / "x", sites, seeded)[101]  # the default policy: no seeded randomness
    refused = deliver(instruction(101, START, ask, message_id="c"), ctx2)
    assert refused.has_error() and "insecure_seeded_randomness" in refused.error.reason
    _own_release(ctx, {site.OWN_KEY: '{"stats": 1}'})
    with pytest.raises(PolicyError, match="another preprocessing release"):
        _own_release(ctx, {site.OWN_KEY: '{"stats": 2}'})


def test_a_node_reads_only_the_file_its_own_config_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job names the target, drops and missing rule, never a path: a job that lists other sites' files
    (or a test CSV) still makes the node read exactly its own file, and report only public metadata."""
    import pandas as pd

    sites, test = split_sites(tmp_path)
    memory, _ = configs(sites, test, SPECS["dnoise"])  # the in-memory config, with every site's path in it
    opened: list[str] = []
    real = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    table = site.own_table({site.DATA_PATH_KEY: str(sites[1][1]), site.SITE_NAME_KEY: "hospital-b"}, memory)
    assert opened == [str(sites[1][1])]
    assert table is not None and site.own_table({}, memory) is None
    hello = site.own_hello(table, memory, 3)
    assert set(hello) == {"rows", "classes", "numeric", "categorical", "values"}
    assert hello["rows"] == len(real(sites[1][1])) and hello["classes"] == ["0", "1"]
    assert json.loads(hello["values"]) == {}  # no categorical columns here; under DP never the values


def test_sites_whose_column_kinds_differ_are_refused(tmp_path: Path) -> None:
    hellos = {0: {"site": "a", "rows": 3, "classes": ["0", "1"], "numeric": ["x", "y"], "categorical": []},
              1: {"site": "b", "rows": 4, "classes": ["1"], "numeric": ["x"], "categorical": ["y"]}}
    with pytest.raises(site.SiteMismatchError, match=r"site 'b': numeric \['x'\], text \['y'\]"):
        site.own_sites(hellos, TrainConfig(target="label"))
    own = site.own_sites({0: hellos[0], 1: {**hellos[1], "numeric": ["x", "y"], "categorical": []}},
                         TrainConfig(target="label"))
    assert own.sizes == [3, 4] and own.classes == ["0", "1"] and own.names == {0: "a", 1: "b"}


def test_cli_jobs_on_own_data_carry_no_site_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli import flower as flower_cli

    sites, test = split_sites(tmp_path)
    parser = argparse_parser()
    flags = ["--target", "target", "--privacy", "clip,dnoise,secagg+", "--clip", "1", "--noise-multiplier", "1"]
    local = parser.parse_args(["local", *flags, *[f"--site={n}={p}" for n, p in sites], "--test-data", str(test)])
    job = flower_cli._job(local)
    assert job.stats is None and job.num_clients == 3 and not job.config["sites"]
    assert job.config["test_site"] == str(test.resolve())
    assert not [p for _, p in sites if str(p) in job.to_json()]
    assert flower_cli.local_sites(_config(local)) == [(n, p.resolve()) for n, p in sites]
    remote = parser.parse_args(["run", "--insecure", *flags, f"--site=a={sites[0][1]}"])
    assert flower_cli.run(remote) == 2 and "pass --own-data instead" in capsys.readouterr().err
    own = flower_cli._job(parser.parse_args(["run", "--insecure", *flags, "--own-data", "--clients", "3"]))
    assert own.stats is None and own.num_clients == 3  # the launcher read no data


def argparse_parser() -> Any:
    import argparse

    from fl.cli import flower as flower_cli

    parser = argparse.ArgumentParser(prog="privagg flower")
    flower_cli.add_arguments(parser)
    return parser


def _config(args: Any) -> TrainConfig:
    from fl.cli.main import config_from_args

    return config_from_args(args)
