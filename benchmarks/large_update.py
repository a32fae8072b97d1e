"""Large updates through SecAgg+: d = 1e8 float32 values per client, in memory and over the wire codec.

Each client holds a float32 update of ``d`` values (language-model adapters), quantizes it in blocks
into one ring array (``secagg.ring.Quantizer``, 16-bit values), and runs a SecAgg+ round with ``n``
clients. Two transports:

- ``memory``: every party in this process, messages handed over as objects; the server folds each
  masked input into its running sum as it arrives.
- ``wire``: each client in its own process; every message crosses a pipe as ``secagg.wire`` frames
  (:func:`secagg.wire.dumps_stream`: no frame holds more than 2^24 values, the limit of one Flower
  message array; the receiver's :class:`secagg.wire.StreamDecoder` fills one pre-allocated array).

It checks that the unmasked sum equals the sum of the clients' ring encodings exactly, and reports the
peak resident memory of each client process (``resource.getrusage``; wire mode) or of the whole process
(memory mode), against the bound 3 x d x 4 bytes per client. The clients' updates and rounding noise are
seeded (``numpy`` generators) so the expected sum can be recomputed: a benchmark seam, not how a client
draws rounding noise in production (there it comes from a CSPRNG).

``--through train`` runs the same size through the training loop instead: a real ``fl.train(model=...,
sites=...)`` with one ``nn.Linear`` of d parameters, ``privacy=["clip", "secagg+"]`` (Quantize implied),
n sites, one round, in a child process. Each client's update is encoded block by block
(:mod:`fl.blocks`); tracemalloc (which sees numpy's buffers, not torch's) gives each client's peak extra
memory for its update: max(encode, held encoding + masking), against 3 x d x 4 bytes. The trainer's
own torch memory (model copies, gradients) is reported apart, as the process's RSS. Exactness: the
SecAgg+ sum equals the ring sum of the clients' clipped, quantized updates, and the global model moved by
exactly its decoded mean (bit for bit, block by block).

    python benchmarks/large_update.py [--d 100000000] [--n 5] [--transport wire|memory|both] [--json out.json]
    python benchmarks/large_update.py --through train [--d 100000000] [--n 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from secagg import wire
from secagg.machine import Message
from secagg.masking.client import SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.server import SecAggServer
from secagg.ring import Quantizer

log = logging.getLogger("large_update")
BLOCK = 1 << 20  # values quantized (and regenerated for the check) per block
SESSION = b"large-update-bench"
BOUND = 1.0


def quantizer(n: int) -> Quantizer:
    return Quantizer(bound=BOUND, value_bits=16, cohort=n)


def update_block(cid: int, start: int, stop: int) -> NDArray[np.float32]:
    """Client ``cid``'s update values ``start:stop`` (seeded per block so any block can be regenerated)."""
    gen = np.random.default_rng([cid, start])
    return np.clip(gen.standard_normal(stop - start, dtype=np.float32) * 0.2, -BOUND, BOUND)


def encode_into(q: Quantizer, x: NDArray[np.float32], out: NDArray[np.uint32], cid: int) -> None:
    """Quantize ``x`` block by block into ``out`` (ring words): O(block) temporaries, not O(d)."""
    for start in range(0, x.size, BLOCK):
        stop = min(x.size, start + BLOCK)
        noise = np.random.default_rng([cid, start, 1]).random
        out[start:stop] = q.encode(x[start:stop], noise)


def client_value(cid: int, d: int, n: int) -> NDArray[np.uint32]:
    """The client's float32 update (d x 4 bytes) and its ring encoding; the float copy is dropped after."""
    x = np.empty(d, dtype=np.float32)
    for start in range(0, d, BLOCK):
        x[start : start + BLOCK] = update_block(cid, start, min(d, start + BLOCK))
    ring = np.empty(d, dtype=np.uint32)
    encode_into(quantizer(n), x, ring, cid)
    del x
    return ring


def make_client(cid: int, d: int, n: int) -> SecAggClient:
    q = quantizer(n)
    return SecAggClient(
        cid, client_value(cid, d, n), session=SESSION, round=0, modulus=q.modulus, size=d, threshold=None,
        min_cohort=n, graph=GraphSpec(complete=False, dropout=0.0, corrupt=0.2),
    )


def make_server(cids: list[int], d: int, n: int) -> SecAggServer:
    q = quantizer(n)
    return SecAggServer(cids, session=SESSION, round=0, modulus=q.modulus, size=d, threshold=None,
                        graph=GraphSpec(complete=False, dropout=0.0, corrupt=0.2))


def expected_sum(cids: list[int], d: int, n: int, modulus: int) -> Callable[[int, int], NDArray[np.uint64]]:
    """Block ``start:stop`` of the exact ring sum of every client's encoding."""
    q = quantizer(n)

    def block(start: int, stop: int) -> NDArray[np.uint64]:
        total = np.zeros(stop - start, dtype=np.uint64)
        for cid in cids:
            noise = np.random.default_rng([cid, start, 1]).random
            total += q.encode(update_block(cid, start, stop), noise)
        return total & np.uint64(modulus - 1)

    return block


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---- the phase loop, over either transport ------------------------------------------------------
def run_round(server: SecAggServer, deliver: Callable[[int, list[Message]], Iterable[Message]],
              starts: Callable[[], Iterable[Message]]) -> None:
    """Drive one round: every server message goes to its client; every reply is folded in at once."""
    for msg in starts():
        server.receive(msg)
    outbox = list(server.start()) or server.end_phase()
    while not server.done:
        by_client: dict[int, list[Message]] = {}
        for m in outbox:
            by_client.setdefault(m.recipient, []).append(m)
        outbox = []
        for cid in sorted(by_client):
            for reply in deliver(cid, by_client.pop(cid)):
                outbox += server.receive(reply)
        if not outbox and not server.done:
            outbox = server.end_phase()


def run_memory(d: int, n: int) -> dict[str, Any]:
    cids = list(range(n))
    base = peak_rss()
    t0 = time.perf_counter()
    clients = {c: make_client(c, d, n) for c in cids}
    server = make_server(cids, d, n)

    def deliver(cid: int, msgs: list[Message]) -> Iterable[Message]:
        for m in msgs:
            yield from clients[cid].receive(m)

    run_round(server, deliver, lambda: [m for c in cids for m in clients[c].start()])
    secs = time.perf_counter() - t0
    return {"transport": "memory", "seconds": round(secs, 1), "process_peak_rss": peak_rss(), "base_rss": base,
            **check(server, cids, d, n)}


def _client_process(cid: int, d: int, n: int, conn: Connection) -> None:
    """A client in its own process: frames in, frames out, one frame at a time."""
    base = peak_rss()
    machine = make_client(cid, d, n)
    dec = wire.StreamDecoder(max_total=d)
    sent = 0

    def send(msgs: Iterable[Message]) -> None:
        nonlocal sent
        for m in msgs:
            for frame in wire.dumps_stream(m):
                sent += len(frame)
                conn.send_bytes(frame)
        conn.send_bytes(b"")  # end of this batch

    send(machine.start())
    while True:
        frame = conn.recv_bytes()
        if frame == b"STOP":
            break
        replies: list[Message] = []
        while frame:
            msg = dec.feed(frame)
            if msg is not None:
                replies += machine.receive(msg)
            frame = conn.recv_bytes()
        send(replies)
        del replies
    conn.send(json.dumps({"peak_rss": peak_rss(), "base_rss": base, "bytes_sent": sent}))


def run_wire(d: int, n: int) -> dict[str, Any]:
    cids = list(range(n))
    ctx = mp.get_context("fork")
    pipes: dict[int, Connection] = {}
    procs: list[Any] = []
    t0 = time.perf_counter()
    for c in cids:  # forked before any large array exists
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_client_process, args=(c, d, n, theirs), daemon=True)
        p.start()
        pipes[c] = mine
        procs.append(p)
    server = make_server(cids, d, n)
    dec = wire.StreamDecoder(max_total=d)
    received = 0

    def collect(cid: int) -> Iterable[Message]:
        nonlocal received
        while frame := pipes[cid].recv_bytes():
            received += len(frame)
            msg = dec.feed(frame)
            if msg is not None:
                yield msg

    def deliver(cid: int, msgs: list[Message]) -> Iterable[Message]:
        for m in msgs:
            for frame in wire.dumps_stream(m):
                pipes[cid].send_bytes(frame)
        pipes[cid].send_bytes(b"")
        yield from collect(cid)

    run_round(server, deliver, lambda: [m for c in cids for m in collect(c)])
    secs = time.perf_counter() - t0
    stats = []
    for c in cids:
        pipes[c].send_bytes(b"STOP")
        stats.append(json.loads(pipes[c].recv()))
    for p in procs:
        p.join(timeout=60)
    return {"transport": "wire", "seconds": round(secs, 1), "client_peak_rss": [s["peak_rss"] for s in stats],
            "client_base_rss": [s["base_rss"] for s in stats],
            "server_peak_rss": peak_rss(), "bytes_from_clients": received,
            "frames_limit_values": wire.MAX_ITEMS, **check(server, cids, d, n)}


def check(server: SecAggServer, cids: list[int], d: int, n: int) -> dict[str, Any]:
    """Exactness: the unmasked sum equals the ring sum of the encodings, block by block."""
    assert server.done and server.result is not None
    total = server.result
    modulus = quantizer(n).modulus
    block = expected_sum(cids, d, n, modulus)
    exact = all(
        np.array_equal(np.asarray(total[s : min(d, s + BLOCK)], dtype=np.uint64), block(s, min(d, s + BLOCK)))
        for s in range(0, d, BLOCK)
    )
    return {"exact": bool(exact), "included": list(server.included)}


# ---- through fl.train: the privacy layers and the training loop --------------------------------
CLIP = 1.0


def linear_shape(d: int) -> tuple[int, int]:
    """(features, classes) of an ``nn.Linear`` with ``classes * (features + 1)`` = d parameters (or close)."""
    root = max(2, math.isqrt(d))
    for c in range(root, max(1, root // 2), -1):
        if d % c == 0 and d // c >= 2:
            return d // c - 1, c
    return max(1, d // root - 1), root


def _rss_now() -> int:
    """This process's current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0) and return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_now()


def _peak_rss_since_reset() -> int:
    """VmHWM: the peak RSS since the last :func:`_reset_peak_rss`, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class _Meter:
    """Wraps the client side's encode and the SecAgg+ client machine with tracemalloc peaks (child only)."""

    def __init__(self) -> None:
        self.encode: dict[int, int] = {}
        self.held: dict[int, int] = {}
        self.mask: dict[int, int] = {}
        self.trainer_rss: list[int] = []
        self.encode_rss: dict[int, int] = {}
        self.mask_rss: dict[int, int] = {}
        self.fit_end = 0
        self.checks: dict[str, bool] = {}
        self.included: list[int] = []

    @staticmethod
    def _peak_of(fn: Callable[[], Any]) -> tuple[Any, int, int]:
        """``fn()`` with its peak extra memory: numpy's (tracemalloc) and the whole process's (RSS)."""
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        rss = _reset_peak_rss()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base, _peak_rss_since_reset() - rss

    def install(self) -> None:
        from fl.training import client as client_mod
        from fl.training import loop, server

        meter, side_cls = self, client_mod.ClientSide
        fit, update = side_cls._fit, side_cls.update
        receive, run_sum, finish = SecAggClient.receive, loop.run_secure_sum, server.ServerSide.finish_round

        def fit_w(side: Any, params: Any, rnd: int) -> Any:
            out, _, rss = meter._peak_of(lambda: fit(side, params, rnd))
            meter.trainer_rss.append(rss)
            meter.fit_end = _reset_peak_rss()  # the encode's RSS peak is measured from here
            return out

        def update_w(side: Any, *a: Any, **k: Any) -> Any:
            (value, result), peak, _ = meter._peak_of(lambda: update(side, *a, **k))
            meter.encode[side.cid], meter.held[side.cid] = peak, int(value.nbytes)
            meter.encode_rss[side.cid] = _peak_rss_since_reset() - meter.fit_end
            return value, result

        def receive_w(machine: Any, msg: Any) -> Any:
            out, peak, rss = meter._peak_of(lambda: receive(machine, msg))
            meter.mask[machine._cid] = max(meter.mask.get(machine._cid, 0), peak)
            meter.mask_rss[machine._cid] = max(meter.mask_rss.get(machine._cid, 0), rss)
            return out

        def run_sum_w(ssum: Any, values: Any, **k: Any) -> Any:
            outcome = run_sum(ssum, values, **k)
            meter.checks["sum"] = _ring_sum_matches(values, outcome.total, k["spec"].modulus)
            meter.included = list(outcome.included)
            return outcome

        def finish_w(srv: Any, rnd: int, planned: Any, outcome: Any, results: Any, **k: Any) -> Any:
            before = srv.params
            record = finish(srv, rnd, planned, outcome, results, **k)
            meter.checks["mean"] = _mean_matches(srv, before, outcome)
            return record

        side_cls._fit, side_cls.update = fit_w, update_w  # type: ignore[method-assign]
        SecAggClient.receive = receive_w  # type: ignore[method-assign]
        loop.run_secure_sum, server.ServerSide.finish_round = run_sum_w, finish_w  # type: ignore[method-assign]


def _ring_sum_matches(values: Any, total: NDArray[np.uint64], modulus: int) -> bool:
    """The secure sum equals the ring sum of every client's encoding, block by block."""
    mask = np.uint64(modulus - 1)
    for s in range(0, total.size, BLOCK):
        e = min(total.size, s + BLOCK)
        want = np.zeros(e - s, dtype=np.uint64)
        for v in values.values():
            want += np.asarray(v[s:e], dtype=np.uint64)
        if not np.array_equal(np.asarray(total[s:e], dtype=np.uint64), want & mask):
            return False
    return True


def _mean_matches(srv: Any, before: NDArray[np.float64], outcome: Any) -> bool:
    """The global model moved by exactly the decoded mean of the sum (FedAvg, server lr 1), block by block."""
    q = srv.run.bound.pipeline.layers[-1].quantizer(srv.run.bound.specs[-2])
    n = len(outcome.included)
    denom = sum(srv.weight(c) for c in outcome.included)
    lr = srv.server_opt.lr
    for s in range(0, before.size, BLOCK):
        e = min(before.size, s + BLOCK)
        want = before[s:e] + lr * (q.decode(outcome.total[s:e], n) / denom)
        if not np.array_equal(srv.params[s:e], want):
            return False
    return True


def _train_child(d: int, n: int, conn: Connection) -> None:
    """One fl.train run of d parameters over n sites, measured; sends its row back as JSON."""
    import torch

    import fl

    torch.manual_seed(0)
    features, classes = linear_shape(d)
    model = torch.nn.Linear(features, classes)
    gen = np.random.default_rng(0)
    rows = 4
    sites = {f"site-{k}": (gen.standard_normal((rows, features), dtype=np.float32),
                           np.arange(k * rows, (k + 1) * rows) % classes) for k in range(n)}
    meter = _Meter()
    meter.install()
    base = _rss_now()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fl.train(model=model, sites=sites, rounds=1, privacy=["clip", "secagg+"], privacy_options={"clip": CLIP},
                      num_classes=classes, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), batch_size=rows)
    secs = time.perf_counter() - t0
    tracemalloc.stop()
    size = sum(p.numel() for p in result.model.parameters())
    client = {c: max(meter.encode[c], meter.held[c] + meter.mask.get(c, 0)) for c in meter.encode}
    client_rss = {c: max(meter.encode_rss[c], meter.held[c] + meter.mask_rss.get(c, 0)) for c in meter.encode}
    conn.send(json.dumps({
        "through": "train", "d": int(size), "n": n, "linear": [features, classes], "seconds": round(secs, 1),
        "exact": bool(meter.checks.get("sum") and meter.checks.get("mean")), "checks": meter.checks,
        "included": meter.included,
        "client_encode_peak": meter.encode, "client_held": meter.held, "client_mask_peak": meter.mask,
        "client_peak": client, "client_peak_ratio": max(client.values()) / (3 * size * 4),
        "client_encode_rss": meter.encode_rss, "client_mask_rss": meter.mask_rss, "client_peak_rss": client_rss,
        "client_peak_rss_ratio": max(client_rss.values()) / (3 * size * 4),
        "trainer_rss_growth": meter.trainer_rss, "process_base_rss": base, "process_peak_rss": peak_rss(),
    }))


def run_train(d: int, n: int) -> dict[str, Any]:
    """:func:`_train_child` in a fresh process (its own peak RSS and tracemalloc); the row it measured."""
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_train_child, args=(d, n, theirs), daemon=True)
    p.start()
    row: dict[str, Any] = json.loads(mine.recv())
    p.join(timeout=60)
    return row


def print_train(row: dict[str, Any]) -> None:
    d, bound = row["d"], 3 * row["d"] * 4
    f, c = row["linear"]
    print(f"train: fl.train(nn.Linear({f}, {c}): d={d:,}, n={row['n']}, clip+secagg+, 1 round) "
          f"exact={row['exact']} in {row['seconds']} s")
    for cid in sorted(row["client_peak"], key=int):
        print(f"  client {cid}: peak {row['client_peak'][cid] / 2**20:,.0f} MiB = "
              f"{row['client_peak'][cid] / bound:.2f} x (3 d 4 bytes) "
              f"(encode {row['client_encode_peak'][cid] / 2**20:,.0f} MiB; masking "
              f"{row['client_held'][cid] / 2**20:,.0f} MiB held + {row['client_mask_peak'].get(cid, 0) / 2**20:,.0f})")
    rss, enc, mask = (max(row[k].values()) / 2**20 for k in ("client_peak_rss", "client_encode_rss", "client_mask_rss"))
    print(f"  by RSS (VmHWM reset before each step): client peak {rss:,.0f} MiB = {row['client_peak_rss_ratio']:.2f} "
          f"x (3 d 4 bytes) (encode {enc:,.0f} MiB; masking held + {mask:,.0f} MiB)")
    train = max(row["trainer_rss_growth"]) / 2**20
    print(f"  trainer (torch, not in the privacy layers' share): peak RSS +{train:,.0f} "
          f"MiB in a client's training; process peak RSS {row['process_peak_rss'] / 2**30:,.2f} GiB "
          f"for {row['n']} clients + server + model copies (base {row['process_base_rss'] / 2**30:,.2f} GiB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=float, default=1e8, help="values per client (default: %(default)g)")
    ap.add_argument("--n", type=int, default=5, help="clients (default: %(default)s)")
    ap.add_argument("--transport", choices=("wire", "memory", "both"), default="both")
    ap.add_argument("--through", choices=("machines", "train"), default="machines",
                    help="drive the secagg machines directly, or run fl.train (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    d, n = int(args.d), args.n
    if args.through == "train":
        row = run_train(d, n)
        print_train(row)
        if args.json is not None:
            args.json.write_text(json.dumps(row, indent=2))
        return 0 if row["exact"] and max(row["client_peak_ratio"], row["client_peak_rss_ratio"]) <= 1.0 else 1
    bound = 3 * d * 4
    rows = []
    for transport in ("memory", "wire") if args.transport == "both" else (args.transport,):
        row = run_wire(d, n) if transport == "wire" else run_memory(d, n)
        rows.append(row)
        print(f"{transport}: d={d:,} n={n} exact={row['exact']} in {row['seconds']} s")
        if transport == "wire":
            for c, (rss, base) in enumerate(zip(row["client_peak_rss"], row["client_base_rss"], strict=True)):
                print(f"  client {c} peak RSS {rss / 2**20:,.0f} MiB = {rss / bound:.2f} x (3 d 4 bytes); "
                      f"{(rss - base) / 2**20:,.0f} MiB above the {base / 2**20:,.0f} MiB interpreter")
            print(f"  server peak RSS {row['server_peak_rss'] / 2**20:,.0f} MiB; "
                  f"{row['bytes_from_clients'] / 2**20:,.0f} MiB received in frames of <= 2^24 values")
        else:
            per = (row["process_peak_rss"] - row["base_rss"]) / (n + 1)
            print(f"  process peak RSS {row['process_peak_rss'] / 2**20:,.0f} MiB for {n} clients + server: "
                  f"{per / bound:.2f} x (3 d 4 bytes) per party")
    if args.json is not None:
        args.json.write_text(json.dumps({"d": d, "n": n, "rows": rows}, indent=2))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
