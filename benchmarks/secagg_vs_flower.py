"""Benchmark: privagg's SecAgg / SecAgg+ against Flower 1.41's SecAgg+ on the same work.

Both run in this process, one client after another (the time a real client spends is its own share):

* **ours**: the sans-IO machines from :mod:`fl.sums.secagg` (``SecAggPlus(neighbours=k)`` for the sparse
  graph, ``SecAgg`` for the complete graph) after ``Quantize(bits=20, bound=1)``, driven phase by phase.
* **peer**: Flower's own ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (client), unchanged: the
  workflow's stages are called on a ``LegacyContext`` with a FedAvg strategy, and an in-process ``Grid``
  delivers each message straight to the destination node's ``secaggplus_mod`` (no network, no SuperLink).
  Flower quantizes to 2^22 levels over its fixed clipping range [-8, 8] and masks mod 2^32.

Same work: n clients with float vectors of d values in [-1, 1]; the sparse graph has k neighbours
(Flower: ``num_shares = k + 1``), the reconstruction threshold t is the same absolute count for both;
dropouts happen after key sharing, before the masked input (the case that costs the server most: it must
rebuild every dropped client's pairwise masks). Timings:

* client mask: median over clients of the masked-input step (decrypt shares, expand and add masks);
* server unmask: the server's own work in the unmask phase (reconstruct secrets, remove masks), clients'
  time excluded;
* round: the whole round, all parties in one process;
* upload: bytes of one client's masked input on the wire (ours: :mod:`secagg.wire`; Flower: the
  serialized masked arrays).

Run with the benchmark venv (flwr installed): ``.venv-bench/bin/python benchmarks/secagg_vs_flower.py``;
``--quick`` for a smoke run, ``--json PATH`` to write ``{"rows": [...]}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from dp.rng import SecureRandom
from fl.layers.clip import Quantize
from fl.pipeline import Pipeline
from fl.spec import RoundInfo, ValueSpec
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg import wire
from secagg.errors import AbortError
from secagg.masking.messages import MaskedInput, ShareDelivery

SESSION = b"benchmark-session"


@dataclass
class Result:
    client_mask_s: float
    server_unmask_s: float
    round_s: float
    upload_bytes: int
    max_error: float
    note: str = ""


# ----------------------------------------------------------------------------------------------- ours
def run_ours(xs: np.ndarray, dropped: set[int], *, k: int | None, t: int) -> Result:
    n, d = xs.shape
    ssum: SecAgg | SecAggPlus = SecAgg(threshold=t) if k is None else SecAggPlus(threshold=t, neighbours=k)
    bound = Pipeline([Quantize(bits=20, bound=1.0)], sum=ssum).bind(ValueSpec(size=d, cohort=n))
    rng = SecureRandom.for_testing("bench")
    enc = [bound.encode(xs[c], rng) for c in range(n)]
    spec = bound.sum_spec
    t0 = time.perf_counter()
    server = ssum.server(list(range(n)), spec=spec, session=SESSION, round=0)
    clients = {c: ssum.client(c, enc[c], spec=spec, session=SESSION, round=0) for c in range(n)}
    for c in range(n):
        for m in clients[c].start():
            server.receive(m)
    for m in server.end_phase():
        for r in clients[m.recipient].receive(m):
            server.receive(r)
    mask_times: list[float] = []
    upload = 0
    for m in server.end_phase():
        assert isinstance(m, ShareDelivery)
        ts = time.perf_counter()
        out = clients[m.recipient].receive(m)
        mask_times.append(time.perf_counter() - ts)
        if m.recipient in dropped:
            continue
        for r in out:
            assert isinstance(r, MaskedInput)
            upload = len(wire.dumps(r))
            server.receive(r)
    for m in server.end_phase():
        for r in clients[m.recipient].receive(m):
            server.receive(r)
    ts = time.perf_counter()
    server.end_phase()
    unmask = time.perf_counter() - ts
    round_s = time.perf_counter() - t0
    assert server.result is not None
    info = RoundInfo(round=0, planned=tuple(range(n)), included=server.included, population=n, sample_rate=1.0)
    total = bound.decode(server.result, info, rng)
    want = xs[list(server.included)].sum(axis=0)
    return Result(statistics.median(mask_times), unmask, round_s, upload, float(np.max(np.abs(total - want))))


# ----------------------------------------------------------------------------------------------- peer
def run_peer(xs: np.ndarray, dropped: set[int], *, k: int | None, t: int) -> Result:
    """Flower's SecAggPlusWorkflow + secaggplus_mod, in process."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
    from flwr.supercore.logger import FLOWER_LOGGER
    from flwr.supercore.task_identity import TaskIdentity

    FLOWER_LOGGER.setLevel(logging.ERROR)

    TaskIdentity.run_id = 1  # what a ServerApp process sets at start-up
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    n, d = xs.shape
    node_ids = list(range(1, n + 1))  # Flower node ids (0 is the SuperLink)
    idx = {nid: i for i, nid in enumerate(node_ids)}
    contexts = {
        nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in node_ids
    }
    stage_of = {}
    timings: dict[str, list[float]] = {}
    upload = [0]

    def fit(msg: Message, ctxt: Context) -> Message:
        # The ClientApp's "training": return this client's vector as its update, weight 1.
        nid = msg.metadata.dst_node_id
        res = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([xs[idx[nid]]]),
            num_examples=1,
            metrics={},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    class InProcessGrid:
        """Delivers each message to the destination node's secaggplus_mod and returns the replies."""

        run = None

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            replies = []
            for original in messages:
                # A network copies each message; in process we copy it too (the mod mutates its content).
                msg = copy.deepcopy(original)
                msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                msg.metadata.__dict__["_src_node_id"] = 0
                nid = msg.metadata.dst_node_id
                stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if stage == Stage.COLLECT_MASKED_VECTORS and idx[nid] in dropped:
                    # The node drops: it still runs its step (as ours does) but the reply is lost.
                    ts = time.perf_counter()
                    secaggplus_mod(msg, contexts[nid], fit)
                    timings.setdefault(stage, []).append(time.perf_counter() - ts)
                    continue
                ts = time.perf_counter()
                reply = secaggplus_mod(msg, contexts[nid], fit)
                timings.setdefault(stage, []).append(time.perf_counter() - ts)
                if stage == Stage.COLLECT_MASKED_VECTORS:
                    masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                    upload[0] = sum(len(b) for b in masked)  # type: ignore[union-attr, arg-type]
                replies.append(reply)
            return replies

    grid = InProcessGrid()
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n, accept_failures=True
    )
    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(nid, grid, 1))  # type: ignore[arg-type]
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: 1}),
            MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(ndarrays_to_parameters([np.zeros(d)]), True),
        }
    )
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
        client_manager=manager,
    )
    num_shares: int | float = 1.0 if k is None else k + 1
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=t, max_weight=1.0, timeout=None)
    wstate = WorkflowState()
    t0 = time.perf_counter()
    stage_time = {}
    for name, step in (
        ("setup", workflow.setup_stage),
        ("share", workflow.share_keys_stage),
        ("masked", workflow.collect_masked_vectors_stage),
        ("unmask", workflow.unmask_stage),
    ):
        before = sum(sum(v) for v in timings.values())
        ts = time.perf_counter()
        ok = step(grid, context, wstate)  # type: ignore[arg-type]
        client_part = sum(sum(v) for v in timings.values()) - before
        stage_time[name] = time.perf_counter() - ts - client_part
        if not ok:
            raise RuntimeError(f"Flower's workflow halted in stage {name!r}")
    round_s = time.perf_counter() - t0
    del stage_of
    params = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], True)
    )
    survivors = [i for i in range(n) if i not in dropped]
    mean = params[0]
    err = float(np.max(np.abs(mean * len(survivors) - xs[survivors].sum(axis=0))))
    return Result(
        statistics.median(timings[Stage.COLLECT_MASKED_VECTORS]), stage_time["unmask"], round_s, upload[0], err
    )


# ----------------------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (n=10, d=1e4)")
    ap.add_argument("--json", metavar="PATH", help="write {'rows': [...]} to PATH")
    ap.add_argument("--k", type=int, default=16, help="SecAgg+ neighbours (Flower: num_shares = k + 1)")
    ap.add_argument(
        "--example-k", type=int, default=2, help="extra n=100, d=1e6 rows with this k (Flower's example: 2); 0 = off"
    )
    ap.add_argument("--threshold", type=float, default=0.5, help="t as a fraction of the share group")
    ap.add_argument("--debug", action="store_true", help="raise the peer's errors instead of noting them")
    ap.add_argument("--no-peer", action="store_true", help="skip Flower")
    ap.add_argument(
        "--peer-complete-max-n",
        type=int,
        default=100,
        help="largest n for which Flower's complete graph runs (it is slow)",
    )
    args = ap.parse_args()
    ns, ds, drops = (
        ([10], [10_000], [0.0, 0.1]) if args.quick else ([10, 50, 100], [10_000, 100_000, 1_000_000], [0.0, 0.1])
    )
    load_start = os.getloadavg()[0]
    configs: list[tuple[str, int, int, float, int | None]] = [
        ("sparse", n, d, p, args.k) for n in ns for d in ds for p in drops
    ]
    configs += [("complete", n, ds[0], p, None) for n in ns for p in drops]
    if args.example_k and not args.quick:
        # Flower's example configuration (num_shares=3, reconstruction_threshold=2: k = 2), at the target size.
        configs += [("sparse", 100, 1_000_000, p, args.example_k) for p in drops]
    rows = []
    head = (
        f"{'graph':8} {'n':>4} {'d':>8} {'drop':>5} {'k':>3} {'t':>3} | {'mask ms':>16} {'unmask s':>16} "
        f"{'round s':>16} {'upload MB':>12} | {'max err ours/peer':>20} | ratios peer/ours mask unmask round upload"
    )
    print(head)
    print("-" * len(head))
    for graph, n, d, p, k_req in configs:
        k = None if k_req is None else min(k_req, n - 1)
        group = n if k is None or k >= n - 1 else k + 1
        t = max(2, math.ceil(args.threshold * group))
        if k is not None and k >= n - 1:
            k_ours: int | None = None  # k >= n - 1 is the complete graph
        else:
            k_ours = k
        rng = np.random.default_rng(n * 1000 + d)
        xs = rng.uniform(-1, 1, size=(n, d))
        dropped = set(range(n - round(p * n), n))
        try:
            ours = run_ours(xs, dropped, k=k_ours, t=t)
        except AbortError as exc:  # e.g. a tiny k where one neighbourhood loses too many clients
            print(f"{graph:8} {n:>4} {d:>8} {p:>5.0%} {group - 1:>3} {t:>3} | ours aborted cleanly: {exc}")
            continue
        peer: Result | None = None
        note = ""
        if args.no_peer:
            note = "peer skipped (--no-peer)"
        elif graph == "complete" and n > args.peer_complete_max_n:
            note = f"peer skipped: complete graph above n={args.peer_complete_max_n}"
        else:
            try:
                peer = run_peer(xs, dropped, k=k, t=t)
            except Exception as exc:  # report why, never a number we did not measure
                if args.debug:
                    raise
                note = f"peer failed: {type(exc).__name__}: {exc}"
        row: dict[str, Any] = {
            "graph": graph,
            "n": n,
            "d": d,
            "dropout": p,
            "k": group - 1,
            "t": t,
            "ours_client_mask_s": ours.client_mask_s,
            "ours_server_unmask_s": ours.server_unmask_s,
            "ours_round_s": ours.round_s,
            "ours_upload_bytes": ours.upload_bytes,
            "ours_max_error": ours.max_error,
            "peer_client_mask_s": peer.client_mask_s if peer else None,
            "peer_server_unmask_s": peer.server_unmask_s if peer else None,
            "peer_round_s": peer.round_s if peer else None,
            "peer_upload_bytes": peer.upload_bytes if peer else None,
            "peer_max_error": peer.max_error if peer else None,
            "note": note,
        }
        rows.append(row)

        def pair(a: float, b: float | None, fmt: str) -> str:
            return f"{format(a, fmt)}/{format(b, fmt) if b is not None else '-'}"

        def ratio(a: float, b: float | None) -> str:
            return f"{b / a:6.1f}x" if b is not None and a > 0 else "     -"

        print(
            f"{graph:8} {n:>4} {d:>8} {p:>5.0%} {group - 1:>3} {t:>3} | "
            f"{pair(ours.client_mask_s * 1e3, peer.client_mask_s * 1e3 if peer else None, '.1f'):>16} "
            f"{pair(ours.server_unmask_s, peer.server_unmask_s if peer else None, '.3f'):>16} "
            f"{pair(ours.round_s, peer.round_s if peer else None, '.2f'):>16} "
            f"{pair(ours.upload_bytes / 1e6, peer.upload_bytes / 1e6 if peer else None, '.2f'):>12} | "
            f"{pair(ours.max_error, peer.max_error if peer else None, '.1e'):>20} | "
            f"{ratio(ours.client_mask_s, peer.client_mask_s if peer else None)} "
            f"{ratio(ours.server_unmask_s, peer.server_unmask_s if peer else None)} "
            f"{ratio(ours.round_s, peer.round_s if peer else None)} "
            f"{ratio(ours.upload_bytes, peer.upload_bytes if peer else None)}" + (f"  [{note}]" if note else ""),
            flush=True,
        )
    load_end = os.getloadavg()[0]
    print(f"\nload average (1 min) at start/end: {load_start:.1f}/{load_end:.1f} on {os.cpu_count()} CPU(s)")
    for r in rows:
        if (r["graph"], r["n"], r["d"], r["dropout"]) == ("sparse", 100, 1_000_000, 0.1):
            for label, key, bound_ in (
                ("server unmask <= 0.4 s", "ours_server_unmask_s", 0.4),
                ("client masking <= 40 ms", "ours_client_mask_s", 0.040),
                ("upload <= 4 MB", "ours_upload_bytes", 4_000_100),
            ):
                met = "met" if r[key] <= bound_ else "MISSED"
                print(f"target {label:26} (sparse k={r['k']}, n=100, d=1e6, 10%): {met} ({r[key]:.4g})")
        if (r["graph"], r["n"], r["d"], r["dropout"]) == ("complete", 100, 10_000, 0.1):
            met = "met" if r["ours_round_s"] <= 10 else "MISSED"
            print(f"target {'full SecAgg round <= 10 s':26} (n=100, d=1e4, 10%): {met} ({r['ours_round_s']:.3g} s)")
    print(
        "values are ours/peer; ratios are peer/ours (higher = ours faster/smaller). 'k' = neighbours "
        "(n-1 = complete graph); dropouts happen after key sharing."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
