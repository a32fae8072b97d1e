"""Round latency of secure aggregation over real Flower processes on loopback: ours vs Flower's SecAgg+.

One SuperLink and 3 SuperNodes run as processes on 127.0.0.1 with TLS (throw-away certificates). In one
run it measures, on the same work (a secure sum of d = 1e5 words from 3 clients per round, 8 rounds;
``--quick``: d = 1e3, 2 rounds):

* ``flower SecAgg+ workflow`` -- the peer: Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod`` (legacy
  API), FedAvg rounds whose clients return a d-float vector (4 exchanges per round); on stock SuperNodes
  and on ours;
* ``privagg secagg+`` -- our protocol driven by :mod:`fl.runners.flower` (50 ms reply pulls), one round
  after another (4 exchanges per round) and with 4 rounds in flight (:mod:`fl.runners.flower.pipeline`:
  R rounds in R + 3 exchanges); on stock SuperNodes and on SuperNodes started the way
  ``privagg flower supernode`` starts them (0.1 s idle poll instead of 3 s, and each ClientApp forked
  from a warm process instead of a fresh interpreter per message);
* ``privagg mod+workflow, FedAvg app`` -- :mod:`fl.runners.flower.mod` / :mod:`fl.runners.flower.workflow`
  in a user's own Flower app (Message API FedAvg, clients return a d-float vector), on both kinds of node;
* ``in-memory secagg+`` -- :func:`fl.runners.local.run_secure_sum` on the same vectors: the protocol's
  own compute.

The table gives seconds per round (the run's wall time over its rounds), the ratio to the peer on stock
SuperNodes, Flower exchanges per round, and for our runs the split into client compute, server compute
and Flower transport (everything else: polling, process start-up, HTTPS). ``--json PATH`` writes
``{"rows": [{"configuration", "ours", "patched", "s_per_round", ...}]}``.

    .venv-flower/bin/python benchmarks/flower_round_latency.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PEER_APP = '''"""Flower's own SecAgg+ on a d-word vector (benchmark peer)."""
import json, os, time
import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp


class VectorClient(NumPyClient):
    def __init__(self, size):
        self.size = size

    def fit(self, parameters, config):
        return [np.full(self.size, 0.001, dtype=np.float32)], 1, {}


def client_fn(context: Context):
    return VectorClient(int(context.run_config["size"])).to_client()


client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    size, n, rounds = (int(context.run_config[k]) for k in ("size", "clients", "rounds"))
    t0 = time.time()
    while len(list(grid.get_node_ids())) < n and time.time() - t0 < 120:
        time.sleep(0.2)
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
                      min_available_clients=n,
                      initial_parameters=ndarrays_to_parameters([np.zeros(size, dtype=np.float32)]))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=n - 1,
                                                               timeout=120))
    t1 = time.time()
    workflow(grid, legacy)
    seconds = time.time() - t1
    out = context.run_config["out"]
    with open(out + ".tmp", "w") as fh:
        json.dump({"seconds": seconds, "rounds": rounds}, fh)
    os.replace(out + ".tmp", out)
'''


MOD_APP = '''"""privagg_mod + SecureAggregation in a Flower app (Message API FedAvg) on a d-float vector."""
import json, os, time
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl.runners.flower.mod import privagg_mod
from fl.runners.flower.workflow import SecureAggregation

client_app = ClientApp(mods=[privagg_mod])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    glob = msg.content["arrays"].to_numpy_ndarrays()[0]
    arrays = ArrayRecord([glob + np.float32(0.001)])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    size, n, rounds = (int(context.run_config[k]) for k in ("size", "clients", "rounds"))
    t0 = time.time()
    while len(list(grid.get_node_ids())) < n and time.time() - t0 < 120:
        time.sleep(0.2)
    sa = SecureAggregation(protocol="secagg+", threshold=0.7, start_timeout=120, phase_timeout=120)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    t1 = time.time()
    strategy.start(grid=sa.wrap(grid), initial_arrays=ArrayRecord([np.zeros(size, dtype=np.float32)]),
                   num_rounds=rounds)
    seconds = time.time() - t1
    assert len(sa.history) == rounds and all(len(h.included) == n for h in sa.history)
    assert np.allclose(sa.history[-1].mean_update, 0.001, atol=1e-6)
    out = context.run_config["out"]
    with open(out + ".tmp", "w") as fh:
        json.dump({"seconds": seconds, "rounds": rounds}, fh)
    os.replace(out + ".tmp", out)
'''


def _peer_app(directory: Path, *, size: int, clients: int, rounds: int, out: Path, code: str = PEER_APP) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "peer_secaggplus.py").write_text(code)
    (directory / "pyproject.toml").write_text("\n".join([
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "peer-secaggplus"', 'version = "1.0.0"', 'description = "benchmark peer"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "privagg"', "",
        "[tool.flwr.app.components]", 'serverapp = "peer_secaggplus:server_app"',
        'clientapp = "peer_secaggplus:client_app"', "",
        "[tool.flwr.app.config]", f"size = {size}", f"clients = {clients}", f"rounds = {rounds}",
        f'out = "{out}"', "",
    ]))
    return directory


def _wait_file(path: Path, timeout: float, procs: list[Any]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return dict(json.loads(path.read_text()))
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"Flower process {p.pid} exited with {p.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"the peer wrote no {path} in {timeout:g}s")


def _ours(cluster: Any, work: Path, *, size: int, rounds: int, poll: float, label: str,
          in_flight: int = 1) -> dict[str, Any]:
    from fl.runners.flower import FlowerJob

    job = FlowerJob(task="sum", out=str(work / label.replace(" ", "_")), clients=cluster.n, size=size, rounds=rounds,
                    protocol="secagg+", threshold=0.7, poll_interval=poll, join_timeout=120, start_timeout=120,
                    phase_timeout=120, rounds_in_flight=in_flight)
    t0 = time.perf_counter()
    res = cluster.run(job, timeout=1800)
    total = time.perf_counter() - t0
    if not all(r.get("exact") for r in res["rounds"]) or len(res["rounds"]) != rounds:
        raise RuntimeError(f"{label}: a round's sum was not exact: {res['rounds']}")
    ex = res["exchanges"]
    flower_exchanges = len({e["bundle"] for e in ex}) if in_flight > 1 else len(ex)
    bundles: dict[int, dict[str, float]] = {}
    for i, e in enumerate(ex):  # one Flower exchange may carry several rounds' phases: count its time once
        b = bundles.setdefault(e["bundle"] or -1 - i, {"wall": 0.0, "client": 0.0, "server": 0.0})
        b["wall"] = max(b["wall"], e["wall_s"])
        b["client"] = max(b["client"], e["client_max_s"])
        b["server"] += e["server_s"]
    client = sum(b["client"] for b in bundles.values()) / rounds
    server = sum(b["server"] for b in bundles.values()) / rounds
    wall = sum(b["wall"] for b in bundles.values()) / rounds
    return {
        "name": label, "seconds_per_round": res["seconds"] / rounds, "client_compute_s": client,
        "server_compute_s": server, "transport_s": max(0.0, wall - client),
        "exchanges_per_round": flower_exchanges / rounds, "total_s": total, "ours": True,
    }


def _our_rows(cluster: Any, work: Path, *, size: int, rounds: int, nodes: str, patched: bool) -> list[dict[str, Any]]:
    """Our SecAgg+ on ``cluster``: one round after another, then 4 rounds in flight."""
    labels = {1: f"privagg secagg+ ({nodes} SuperNodes)", 4: f"privagg secagg+, 4 rounds in flight ({nodes})"}
    return [{**_ours(cluster, work, size=size, rounds=rounds, poll=0.05, in_flight=k, label=label), "patched": patched}
            for k, label in labels.items()]


def _train_row(cluster: Any, work: Path, *, rounds: int, in_flight: int, nodes: str) -> dict[str, Any]:
    """A small training job over ``cluster`` (logreg on breast_cancer, clip + distributed noise + SecAgg+):
    its rounds one after another (``in_flight=1``) or with the next round's key agreement ahead (2)."""
    from fl.config import PrivacyConfig, TrainConfig
    from fl.runners.flower import FlowerJob

    label = f"privagg training, {'keys ahead' if in_flight == 2 else 'sequential'} ({nodes})"
    config = TrainConfig(dataset="breast_cancer", clients=cluster.n, rounds=rounds, model="logreg",
                         privacy=PrivacyConfig(spec="clip,dnoise,secagg+", clip=1.0, noise_multiplier=1.0,
                                               threshold=0.7))
    # a job id of its own: the nodes refuse the same job's rounds twice (their record of released rounds)
    job = FlowerJob(task="train", out=str(work / label.replace(" ", "_")), config=config.as_dict(),
                    poll_interval=0.05, join_timeout=120, start_timeout=300, phase_timeout=120,
                    rounds_in_flight=in_flight, job_id=f"{label} {work.name}")
    res = cluster.run(job, timeout=1800)
    if len(res["rounds"]) != rounds or any("aborted" in r for r in res["rounds"]):
        raise RuntimeError(f"{label}: a round did not complete: {res['rounds']}")
    ex = res["exchanges"]
    flower_exchanges = len({e["bundle"] for e in ex}) if in_flight > 1 else len(ex)
    return {"name": label, "seconds_per_round": res["seconds"] / rounds, "exchanges_per_round":
            flower_exchanges / rounds, "ours": True, "patched": nodes != "stock"}


def _in_memory(size: int, clients: int, rounds: int) -> dict[str, Any]:
    from fl.runners.flower import FlowerJob
    from fl.runners.flower.job import sum_protocol, sum_value
    from fl.runners.local import run_secure_sum

    job = FlowerJob(task="sum", clients=clients, size=size, rounds=rounds, protocol="secagg+", threshold=0.7)
    ssum, spec = sum_protocol(job)
    times = []
    for r in range(1, rounds + 1):
        values = {c: sum_value(job, r, c) for c in range(clients)}
        t0 = time.perf_counter()
        run_secure_sum(ssum, values, spec=spec, session=bytes(16), round=r)
        times.append(time.perf_counter() - t0)
    return {"name": "in-memory secagg+ (protocol compute)", "seconds_per_round": float(np.mean(times))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d = 1e3, 1 round (smoke run)")
    ap.add_argument("--size", type=int, help="vector length (default 1e5, --quick 1e3)")
    ap.add_argument("--rounds", type=int,
                    help="rounds per configuration (default 8, --quick 2); rounds in flight amortise their 3 extra "
                         "exchanges over the run: R rounds take R + 3")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip Flower's own SecAgg+")
    ap.add_argument("--train", action="store_true",
                    help="also time a small training job on stock SuperNodes, sequential and with key agreement ahead")
    ap.add_argument("--short", action="store_true",
                    help="only the peer on stock SuperNodes and our SecAgg+ rows (no mod+workflow app rows)")
    ap.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    args = ap.parse_args(argv)
    size = args.size or (1000 if args.quick else 100_000)
    rounds = args.rounds or (2 if args.quick else 8)

    from fl.runners.flower import LocalCluster, NodePolicy

    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="privagg-flower-bench-"))
    print(f"secure sum of d={size} words from {args.clients} clients, {rounds} round(s) each; loopback, TLS; "
          f"work dir {work}", flush=True)
    rows.append(_in_memory(size, args.clients, rounds))
    def peer_row(cluster: Any, label: str) -> dict[str, Any]:
        out = work / f"peer-{label}.json"
        app = _peer_app(work / f"peer-app-{label}", size=size, clients=args.clients, rounds=rounds, out=out)
        t0 = time.perf_counter()
        cluster.submit_app(app)
        res = _wait_file(out, 900, [cluster.superlink])
        return {"name": f"flower SecAgg+ workflow ({label} SuperNodes)",
                "seconds_per_round": res["seconds"] / rounds, "total_s": time.perf_counter() - t0}

    def mod_row(cluster: Any, label: str) -> dict[str, Any]:
        """privagg_mod + SecureAggregation.wrap under Flower's Message API FedAvg (a user's own app)."""
        out = work / f"mod-{label}.json"
        app = _peer_app(work / f"mod-app-{label}", size=size, clients=args.clients, rounds=rounds, out=out,
                        code=MOD_APP)
        t0 = time.perf_counter()
        cluster.submit_app(app)
        res = _wait_file(out, 900, [cluster.superlink])
        return {"name": f"privagg mod+workflow, FedAvg app ({label})", "seconds_per_round": res["seconds"] / rounds,
                "total_s": time.perf_counter() - t0, "ours": True}

    # This benchmark also runs Flower's own SecAgg+ app on the same nodes: their policy trusts any app.
    bench_policy = NodePolicy(allow_any_app=True)
    with LocalCluster(work / "stock", args.clients, tls=True, policy=bench_policy) as cluster:
        if not args.no_peer:
            rows.append({**peer_row(cluster, "stock"), "patched": False})
        rows += _our_rows(cluster, work, size=size, rounds=rounds, nodes="stock", patched=False)
        if not args.short:
            rows.append({**mod_row(cluster, "stock"), "patched": False})
        if args.train:
            rows += [_train_row(cluster, work, rounds=rounds, in_flight=k, nodes="stock") for k in (1, 2)]
    with LocalCluster(work / "tuned", args.clients, tls=True, fleet_poll=0.1, policy=bench_policy) as cluster:
        rows += _our_rows(cluster, work, size=size, rounds=rounds, nodes="privagg", patched=True)
        if not args.short:
            rows.append({**mod_row(cluster, "privagg SuperNodes"), "patched": True})
            if not args.no_peer:
                rows.append({**peer_row(cluster, "privagg"), "patched": True})
    peer = next((r["seconds_per_round"] for r in rows if r["name"].startswith("flower")), None)
    print()
    print(f"{'configuration':<52} {'s/round':>8} {'vs peer':>8} {'exch/r':>6} {'client':>7} {'server':>7} "
          f"{'transport':>9}")
    for r in rows:
        r["size"], r["clients"], r["rounds"] = size, args.clients, rounds
        r["configuration"], r["s_per_round"] = r["name"], r["seconds_per_round"]  # the JSON row keys
        r.setdefault("ours", False)
        if peer:
            r["ratio_vs_flower"] = r["seconds_per_round"] / peer
        ratio = f"{r['ratio_vs_flower']:.3g}x" if "ratio_vs_flower" in r else "-"
        split = [f"{r[k]:.2f}" if k in r else "-" for k in ("client_compute_s", "server_compute_s", "transport_s")]
        exch = f"{r['exchanges_per_round']:.3g}" if "exchanges_per_round" in r else "-"
        print(f"{r['name']:<52} {r['seconds_per_round']:>8.3g} {ratio:>8} {exch:>6} {split[0]:>7} {split[1]:>7} "
              f"{split[2]:>9}")
    print("\nclient/server: protocol compute per round (slowest client per phase, summed); transport: the rest of "
          "each phase's wall time (SuperNode polling, one flwr-clientapp process per message, HTTPS).")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
