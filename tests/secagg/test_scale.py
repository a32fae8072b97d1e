"""SecAgg+ at cohort scale: own-neighbourhood clients, batched reconstruction, streaming in-memory rounds."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg._hazmat import shamir
from secagg.machine import SERVER
from secagg.masking import graph as g
from secagg.masking.client import SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.messages import AdvertiseKeys, KeyDirectory, ShareKeys
from secagg.memory import DropoutSchedule
from tests.secagg.rounds import Masked, plus


@settings(max_examples=40, deadline=None)
@given(sets=st.lists(st.lists(st.integers(1, 10**6), min_size=1, max_size=30, unique=True), min_size=1, max_size=6))
def test_batched_lagrange_equals_one_set_at_a_time(sets: list[list[int]]) -> None:
    point_sets = [tuple(sorted(s)) for s in sets]
    assert shamir.lagrange_batch(point_sets) == [shamir.lagrange_at_zero(p) for p in point_sets]


@settings(max_examples=60, deadline=None)
@given(top=st.integers(1, 120), data=st.data())
def test_gap_formula_equals_lagrange(top: int, data: st.DataObject) -> None:
    xs = sorted(data.draw(st.sets(st.integers(1, top), min_size=1, max_size=top)) | {top})
    secret = bytes(range(32))
    ys = shamir.split(secret, xs, threshold=len(xs), coefficients=list(range(7, 7 + len(xs) - 1)))
    if shamir.dense_points(tuple(xs)):
        assert shamir.combine_points(list(zip(xs, ys, strict=True))) == secret
    assert shamir.combine(list(zip(xs, ys, strict=True)), threshold=len(xs)) == secret


def test_batched_reconstruction_recovers_secrets() -> None:
    secrets = [bytes([i]) * 32 for i in range(5)]
    rng = np.random.default_rng(3)
    shares, sets = [], []
    for i, sec in enumerate(secrets):
        xs = sorted(rng.choice(np.arange(1, 200), size=7, replace=False).tolist())
        ys = shamir.split(sec, xs, threshold=5, coefficients=[11 * i + j for j in range(4)])
        keep = [0, 2, 3, 5, 6]
        shares.append([ys[j] for j in keep])
        sets.append(tuple(xs[j] for j in keep))
    coeffs = shamir.lagrange_batch(sets)
    assert [shamir.combine_with(c, y) for c, y in zip(coeffs, shares, strict=True)] == secrets
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine_with(coeffs[0], [shares[0][0] + 1, *shares[0][1:]])


def _sum(d: int, graph: GraphSpec) -> Masked:
    """SecAggPlus's defaults over Z_2^26 (room for 300 16-bit values), threshold from the graph."""
    return Masked(1 << 26, d, threshold=None, graph=graph)


def test_default_parameters_sum_exactly_with_dropouts_at_every_phase() -> None:
    n, d = 300, 64
    ssum = _sum(d, plus())
    k, t = ssum.graph.parameters(n, None)
    assert k < n - 1 and 2 <= t <= k + 1  # sparse by default
    rng = np.random.default_rng(5)
    values = {c: rng.integers(0, 1 << 16, size=d, dtype=np.uint64) for c in range(n)}
    drops = DropoutSchedule.random(list(range(n)), 0.05, rng, phases=4)
    out = ssum.run(values, session=b"scale-test", dropouts=drops, reorder=rng)
    want = sum((values[c] for c in out.included), np.zeros(d, dtype=np.uint64)) % np.uint64(1 << 26)
    assert np.array_equal(out.total, want)
    assert len(out.included) >= n - len(drops.drops)


def test_in_memory_round_streams_masked_inputs() -> None:
    """Issue 12 item 7: the runner must not hold every masked input (nor a copy of every input) at once.

    Holding them is n * d * 4 bytes here (3.2 MB) plus as much again for the clients' working copies; a
    streaming round needs a few d-vectors. Fails on the batching runner.
    """
    n, d = 40, 20_000
    ssum = _sum(d, plus(4))
    values = {c: np.full(d, c, dtype=np.uint64) for c in range(n)}
    tracemalloc.start()
    try:
        out = ssum.run(values, session=b"stream", round=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(out.total, np.full(d, sum(range(n)), dtype=np.uint64))
    assert peak < 0.25 * n * d * 4, f"peak {peak / 2**20:.2f} MB: masked inputs are being held"


def _directory_for(cid: int, n: int, session: bytes, spec: GraphSpec) -> tuple[SecAggClient, KeyDirectory]:
    cohort = tuple(range(n))
    gr = spec.build(cohort, threshold=None, session=session, round=0)
    group = sorted(gr.group(cid))
    kw: dict[str, Any] = dict(
        session=session, round=0, modulus=1 << 26, size=8, threshold=None, graph=spec, min_cohort=n
    )
    machines = {v: SecAggClient(v, np.zeros(8, dtype=np.uint64), **kw) for v in group}
    ads = {}
    for v, m in machines.items():
        (ad,) = m.start()
        assert isinstance(ad, AdvertiseKeys)
        ads[v] = ad
    directory = KeyDirectory(
        SERVER, cid, session, 0, cohort, tuple(group),
        tuple(ads[v].c_pk for v in group), tuple(ads[v].s_pk for v in group), tuple(b"" for _ in group),
        tuple(ads[v].b_commit for v in group),
    )
    return machines[cid], directory


def test_a_client_in_a_large_cohort_evaluates_only_its_neighbourhood(monkeypatch: pytest.MonkeyPatch) -> None:
    """O(k + log n) per client: at n = 10^5 the client touches about k + 1 permutation points, never n."""
    n, session = 100_000, b"big-cohort"
    spec = GraphSpec(complete=False)
    client, directory = _directory_for(777, n, session, spec)
    k = spec.parameters(n, None)[0]
    evaluated = [0]
    once = g._FeistelPermutation._once

    def counting(self: Any, x: Any, inverse: bool) -> Any:
        evaluated[0] += len(x)
        return once(self, x, inverse)

    def no_materialise(self: Any) -> None:
        raise AssertionError("a client must not build the whole graph")

    monkeypatch.setattr(g._FeistelPermutation, "_once", counting)
    monkeypatch.setattr(g.NeighbourGraph, "materialise", no_materialise)
    (out,) = client.receive(directory)
    assert isinstance(out, ShareKeys) and len(out.recipients) == k
    assert evaluated[0] <= 8 * (k + 1)  # work counted, not timed (benchmarks/secagg_scale.py times it)
