"""Benchmark: SecAgg+ at cohort scale, in the one-process simulation (``fl.runners.local``).

Rows (default parameters: ``SecAggPlus()`` finds k and t for 10% corrupt, 10% dropout, 40-bit security,
30-bit correctness): n clients with 16-bit inputs of d values in the ring Z_2^(16 + ceil(log2 n)); a
``dropout`` fraction drops after sharing its keys (the costliest case for the server, which must rebuild
every dropped client's pairwise masks).

* ``round_s``: the whole in-memory round (all parties in this process, masked inputs streamed into the
  server's running sum);
* ``server_unmask_s``: the server's own work in the unmask phase (reconstruct secrets, remove masks);
* ``limit_unmask_s``: in the same run, the time to AES-CTR-expand and add exactly the masks the server
  must remove (the survivors' self masks and the dropped clients' pairwise masks) -- the floor;
* ``limit_kex_s``: in the same run, the X25519 + HKDF for exactly the ``dropped_pairs`` (one per dropped
  client and surviving neighbour: the seed of that pair's mask exists only as a DH secret). The
  protocol cannot unmask below ``limit_unmask_s + limit_kex_s``; the ``floor`` column is that over
  ``limit_unmask_s``, the best ``ratio`` any implementation of this protocol can reach here;
* ``client_s``: median per-client protocol time (all its steps); ``client_peak_bytes``: peak memory
  traced (tracemalloc) during one client's steps;
* ``expansion``: bytes one client sends and receives on the wire (:mod:`secagg.wire`) over the raw
  16-bit input (2 bytes per value). The n = 2^10, d = 2^20 row runs the protocol at d = 2^12 and
  extrapolates: every message but the masked input is independent of d, and the masked input's size is
  encoded for the full d (``--full-expansion`` runs it for real).

``--json PATH`` writes ``{"rows": [...]}``; ``--quick`` runs small rows only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import ValueSpec
from fl.sums.secagg import SecAggPlus
from secagg import wire
from secagg._hazmat import kex, prg
from secagg.machine import ClientMachine, Message, ServerMachine
from secagg.masking.messages import MaskedInput
from secagg.masking.server import SecAggServer
from secagg.ring import ring_bits_for

INPUT_BITS = 16


@dataclass
class _Probe:
    """What the instrumented machines record."""

    traced: int
    client_s: dict[int, float] = field(default_factory=dict)
    peak: int = 0
    unmask_s: float = 0.0
    wire_bytes: int = 0
    masked_bytes: int = 0
    server: SecAggServer | None = None


class _TimedClient:
    def __init__(self, inner: ClientMachine, probe: _Probe) -> None:
        self._inner, self._probe = inner, probe

    @property
    def cid(self) -> int:
        return self._inner.cid

    def _count(self, msgs: Sequence[Message], incoming: Message | None) -> None:
        if self.cid != self._probe.traced:
            return
        for m in ([incoming] if incoming is not None else []) + list(msgs):
            size = len(wire.dumps(m))
            self._probe.wire_bytes += size
            if isinstance(m, MaskedInput):
                self._probe.masked_bytes += size

    def _timed(self, fn: Any, *args: Any) -> list[Message]:
        traced = self.cid == self._probe.traced
        if traced:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            out: list[Message] = fn(*args)
        finally:
            self._probe.client_s[self.cid] = self._probe.client_s.get(self.cid, 0.0) + time.perf_counter() - t0
            if traced:
                self._probe.peak = max(self._probe.peak, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
        self._count(out, args[0] if args else None)
        return out

    def start(self) -> list[Message]:
        return self._timed(self._inner.start)

    def receive(self, msg: Message) -> list[Message]:
        return self._timed(self._inner.receive, msg)


class _TimedServer:
    def __init__(self, inner: SecAggServer, probe: _Probe) -> None:
        self._inner, self._probe = inner, probe
        probe.server = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def receive(self, msg: Message) -> list[Message]:
        return self._inner.receive(msg)

    def end_phase(self) -> list[Message]:
        unmask = self._inner.phase == "unmask"
        t0 = time.perf_counter()
        out = self._inner.end_phase()
        if unmask:
            self._probe.unmask_s += time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class _Timed:
    """A SecureSum whose machines are instrumented (the protocol itself is untouched)."""

    inner: SecAggPlus
    probe: _Probe

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> Any:
        return _TimedClient(self.inner.client(cid, value, spec=spec, session=session, round=round), self.probe)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        srv = self.inner.server(cids, spec=spec, session=session, round=round)
        assert isinstance(srv, SecAggServer)
        return _TimedServer(srv, self.probe)  # type: ignore[return-value]

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return {}


def _dropped_pairs(server: SecAggServer) -> int:
    """(dropped, surviving neighbour) pairs: each is one mask to remove and one X25519 to find its seed."""
    survivors = set(server.included)
    dropped = set(server.graph.cohort) - survivors
    return sum(len(server.graph.neighbours(w) & survivors) for w in dropped)


def _limit(server: SecAggServer, d: int, dtype: Any) -> float:
    """Time to expand and add the masks the server removed: the AES-CTR + add floor of unmasking."""
    count = len(server.included) + _dropped_pairs(server)
    acc = np.zeros(d, dtype=dtype)
    exp = prg.MaskExpander(d, dtype)
    seeds = [os.urandom(32) for _ in range(64)]
    t0 = time.perf_counter()
    for i in range(count):
        exp.add(acc, seeds[i % 64], -1)
    return time.perf_counter() - t0


def _kex_floor(server: SecAggServer) -> float:
    """Time for the X25519 + HKDF of exactly the dropped pairs (parsed keys, batched): what the protocol
    adds to :func:`_limit` -- a dropped client's pairwise seeds exist only as DH secrets."""
    pairs = _dropped_pairs(server)
    me = kex.generate_private(os.urandom)
    peers = [kex.parse_public(kex.public_bytes(kex.generate_private(os.urandom))) for _ in range(64)]
    ctxs = [os.urandom(44) for _ in range(64)]
    t0 = time.perf_counter()
    for i in range(0, pairs, 64):
        m = min(64, pairs - i)
        kex.agree_many(me, peers[:m], label=b"privagg/bench/kex-floor", contexts=ctxs[:m])
    return time.perf_counter() - t0


def run_row(n: int, d: int, dropout: float, *, full_d: int | None = None, seed: int = 0) -> dict[str, Any]:
    """One round; ``full_d``: report the expansion for this d (masked input encoded at full size)."""
    bits = ring_bits_for(INPUT_BITS, n)
    rng = np.random.default_rng(seed)
    values = {c: rng.integers(0, 1 << INPUT_BITS, size=d, dtype=np.uint64) for c in range(n)}
    spec = ValueSpec(size=d, cohort=n, domain="ring", modulus=1 << bits, value_bits=INPUT_BITS)
    plus = SecAggPlus()
    plus.bind(spec)
    k, t = plus._graph().parameters(n, None)
    drops = rng.choice(n, size=round(dropout * n), replace=False)
    probe = _Probe(traced=int(next(c for c in range(n) if c not in set(drops.tolist()))))
    schedule = DropoutSchedule({int(c): "masked" for c in drops})
    t0 = time.perf_counter()
    out = run_secure_sum(_Timed(plus, probe), values, spec=spec, session=os.urandom(16), dropouts=schedule)
    round_s = time.perf_counter() - t0
    want = sum((values[c] for c in out.included), np.zeros(d, dtype=np.uint64)) % np.uint64(1 << bits)
    assert np.array_equal(out.total, want), "the secure sum is wrong"
    assert probe.server is not None
    limit = _limit(probe.server, d, np.uint32 if bits <= 32 else np.uint64)
    kex_floor = _kex_floor(probe.server)
    wire_bytes = probe.wire_bytes
    if full_d is not None:
        y = np.random.default_rng(1).integers(0, 1 << bits, size=full_d, dtype=np.uint64).astype(np.uint32)
        full_masked = len(wire.dumps(MaskedInput(0, -1, b"s" * 16, 0, y)))
        wire_bytes += full_masked - probe.masked_bytes
        d_report = full_d
    else:
        d_report = d
    return {
        "n": n,
        "d": d_report,
        "measured_d": d,
        "dropout": dropout,
        "k": k,
        "t": t,
        "round_s": round(round_s, 3),
        "server_unmask_s": round(probe.unmask_s, 4),
        "limit_unmask_s": round(limit, 4),
        "limit_kex_s": round(kex_floor, 4),
        "dropped_pairs": _dropped_pairs(probe.server),
        "client_s": round(statistics.median(probe.client_s.values()), 5),
        "client_peak_bytes": probe.peak,
        "expansion": round(wire_bytes / (d_report * INPUT_BITS / 8), 4),
        "included": len(out.included),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write {'rows': [...]} to this path")
    ap.add_argument("--quick", action="store_true", help="small rows only (smoke test)")
    ap.add_argument("--full-expansion", action="store_true", help="run n=2^10, d=2^20 for real (slow)")
    args = ap.parse_args(argv)
    if args.quick:
        plan: list[tuple[int, int, float, int | None]] = [(100, 1000, 0.05, None), (256, 256, 0.05, 1 << 20)]
    else:
        exp_d = (1 << 20) if args.full_expansion else (1 << 12)
        plan = [(1000, 100_000, 0.05, None), (10_000, 10_000, 0.05, None), (1 << 10, exp_d, 0.05, 1 << 20)]
    load = os.getloadavg()[0]
    print(f"load: {load:.2f} (1-min average, {os.cpu_count()} cores)")
    print(f"{'n':>6} {'d':>8} {'drop':>5} {'k':>4} {'t':>4} {'round s':>8} {'unmask s':>9} {'limit s':>8} "
          f"{'ratio':>6} {'floor':>6} {'client ms':>9} {'client MB':>9} {'expansion':>9}")
    rows = []
    for n, d, drop, full_d in plan:
        row = run_row(n, d, drop, full_d=full_d)
        rows.append(row)
        ratio = row["server_unmask_s"] / max(row["limit_unmask_s"], 1e-9)
        floor = 1 + row["limit_kex_s"] / max(row["limit_unmask_s"], 1e-9)
        print(f"{n:>6} {row['d']:>8} {drop:>5.2f} {row['k']:>4} {row['t']:>4} {row['round_s']:>8.2f} "
              f"{row['server_unmask_s']:>9.3f} {row['limit_unmask_s']:>8.3f} {ratio:>6.2f} {floor:>6.2f} "
              f"{1e3 * row['client_s']:>9.2f} {row['client_peak_bytes'] / 2**20:>9.2f} {row['expansion']:>9.3f}"
              + (f"  (protocol at d={row['measured_d']}, masked input encoded at d={row['d']})"
                 if row["measured_d"] != row["d"] else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "load_1min": [load, os.getloadavg()[0]], "cores": os.cpu_count()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
