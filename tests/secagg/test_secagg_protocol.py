"""Protocol properties of SecAgg / SecAgg+: exact sums under dropouts at every phase, clean aborts below t,
the server's view (uniform masked inputs, never both kinds of share for one client)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import stats

from secagg.errors import AbortError
from secagg.machine import Message
from secagg.masking.graph import GraphSpec
from secagg.masking.messages import MaskedInput, UnmaskResponse
from secagg.memory import DropoutSchedule
from tests.secagg.rounds import Masked, plus, recording

SESSION = b"test-session"


def _expected(
    cids: list[int], drops: dict[int, int], phases: tuple[str, ...], t: int, graph: Any
) -> tuple[str | None, int, set[int]]:
    """(abort phase or None, answered count at abort, included set), mirroring the protocol's rules."""
    sets: list[set[int]] = []
    live = set(cids)
    for p in range(len(phases)):
        live = {c for c in live if drops.get(c, 99) > p}
        sets.append(live)
    u2 = sets[1]
    u3 = sets[2]

    def needs(live_set: set[int], idx: int) -> list[int]:
        if idx <= 1:
            return sorted(live_set)
        return sorted(u3) + [w for w in sorted(u2 - u3) if graph.neighbours(w) & u3]

    for idx, (name, s) in enumerate(zip(phases, sets, strict=True)):
        whose = needs(s, idx)
        worst = min((len(graph.group(u) & s) for u in whose), default=0)
        if worst < t:
            return name, worst, set()
    return None, 0, u3


def _run_case(
    threshold: float | int, graph: GraphSpec, n: int, drops: dict[int, int], seed: int, bits: int = 24,
    authenticated: bool = False,
) -> None:
    d = 17
    modulus = 1 << bits
    adapter = Masked(modulus, d, threshold=threshold, graph=graph, authenticated=authenticated)
    rng = np.random.default_rng(seed)
    cids = sorted(int(c) for c in rng.choice(1000, size=n, replace=False))
    values = {c: rng.integers(0, modulus, d, dtype=np.uint64) for c in cids}
    seen: list[Message] = []
    servers: list[Any] = []
    probe = adapter.server(cids, session=SESSION, round=seed)
    t = probe.threshold  # type: ignore[attr-defined]
    phases = probe.phases
    drop_by_cid = {cids[i % n]: p for i, p in drops.items()}
    want_phase, want_answered, want_included = _expected(cids, drop_by_cid, phases, t, probe.graph)  # type: ignore[attr-defined]
    sched = DropoutSchedule(dict(drop_by_cid.items()))
    event(f"abort in {want_phase}" if want_phase else f"sum of {len(want_included)} of {n}")
    if want_phase is not None:
        with pytest.raises(AbortError) as err:
            adapter.run(
                values,
                session=SESSION,
                round=seed,
                dropouts=sched,
                reorder=np.random.default_rng(seed + 1),
                watch=recording(seen, servers),
            )
        assert err.value.phase == want_phase
        assert err.value.needed == t and err.value.answered == want_answered
    else:
        out = adapter.run(
            values, session=SESSION, round=seed, dropouts=sched, reorder=np.random.default_rng(seed + 1),
            watch=recording(seen, servers),
        )
        assert set(out.included) == want_included
        total = np.zeros(d, dtype=np.uint64)
        for c in want_included:
            total += values[c]
        assert np.array_equal(out.total, total & np.uint64(modulus - 1))
        assert out.refused == ()
    # The server never holds both kinds of share for one client.
    b_of: set[int] = set()
    s_of: set[int] = set()
    for m in seen:
        if isinstance(m, UnmaskResponse):
            b_of.update(m.alive)
            s_of.update(m.dropped)
    assert not (b_of & s_of)
    asked_b, asked_s = servers[0].asked
    assert not (asked_b & asked_s)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 12),
    frac=st.floats(0.3, 1.0),
    drops=st.dictionaries(st.integers(0, 11), st.integers(0, 3), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_secagg_exact_sum_or_clean_abort(n: int, frac: float, drops: dict[int, int], seed: int) -> None:
    t = max(2, round(frac * n))
    _run_case(t, GraphSpec(complete=True), n, drops, seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(5, 12),
    k=st.integers(2, 6),
    frac=st.floats(0.5, 0.9),
    drops=st.dictionaries(st.integers(0, 11), st.integers(0, 3), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_secaggplus_exact_sum_or_clean_abort(n: int, k: int, frac: float, drops: dict[int, int], seed: int) -> None:
    _run_case(frac, plus(k), n, drops, seed, bits=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 8),
    use_plus=st.booleans(),
    drops=st.dictionaries(st.integers(0, 7), st.integers(0, 4), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_authenticated_exact_sum_or_clean_abort(n: int, use_plus: bool, drops: dict[int, int], seed: int) -> None:
    graph = plus(4, authenticated=True) if use_plus else GraphSpec(complete=True)
    _run_case(0.6, graph, n, drops, seed, authenticated=True)


def test_masked_inputs_look_uniform_to_the_server() -> None:
    """Even all-zero inputs reach the server as uniform words mod 2^k (chi-square on byte buckets)."""
    n, d, bits = 5, 40_000, 24
    seen: list[Message] = []
    values = {c: np.zeros(d, dtype=np.uint64) for c in range(n)}
    out = Masked(1 << bits, d, threshold=3, graph=GraphSpec(complete=True)).run(
        values, session=SESSION, dropouts=DropoutSchedule({4: 3}), watch=recording(seen, [])
    )
    assert not out.total.any()
    ys = [m.y for m in seen if isinstance(m, MaskedInput)]
    assert len(ys) == n and all(y.dtype == np.uint32 for y in ys)
    for y in ys:
        assert int(y.max()) < (1 << bits)
        for chunk in (y & 0xFF, (y >> 8) & 0xFF, y >> 16):
            counts = np.bincount(chunk.astype(np.int64), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-6
    # Pairs of masked inputs are uncorrelated too (the masks are independent).
    assert abs(np.corrcoef(ys[0].astype(float), ys[1].astype(float))[0, 1]) < 0.05


def test_secagg_plus_graph_is_sparse_and_recomputable() -> None:
    spec = GraphSpec(complete=False, neighbours=6)
    g1 = spec.build(list(range(40)), threshold=0.5, session=b"s", round=3)
    g2 = spec.build(list(range(40)), threshold=0.5, session=b"s", round=3)
    g3 = spec.build(list(range(40)), threshold=0.5, session=b"s", round=4)
    assert all(len(g1.neighbours(u)) == 6 for u in range(40))
    assert all(v in g1.neighbours(u) for u in range(40) for v in g1.neighbours(u))  # symmetric
    assert all(g1.neighbours(u) == g2.neighbours(u) for u in range(40))
    assert any(g1.neighbours(u) != g3.neighbours(u) for u in range(40))


def test_a_client_built_without_its_value_agrees_keys_first_and_sums_exactly_once_given_it() -> None:
    """Key agreement before the value is known (a training round overlapping the previous one): the sum is
    exact once each client ``provide``s its value before the masked-input phase, snapshots in between keep
    the pending state, and a client asked to mask without a value (or given one twice or too late) refuses."""
    import numpy as np

    from secagg.errors import ProtocolError
    from secagg.masking.client import SecAggClient
    from secagg.masking.messages import ShareDelivery
    from secagg.masking.server import SecAggServer

    n, size, mod = 4, 16, 1 << 32
    rng = np.random.default_rng(5)
    values = {c: rng.integers(0, 1 << 20, size, dtype=np.uint64) for c in range(n)}
    kw: dict[str, Any] = dict(session=b"s" * 16, round=3, modulus=mod, size=size, threshold=0.75, min_cohort=n)
    clients = {c: SecAggClient(c, None, **kw) for c in range(n)}
    server = SecAggServer(list(range(n)), session=b"s" * 16, round=3, modulus=mod, size=size, threshold=0.75)
    inbox = [m for c in clients.values() for m in c.start()]
    for _phase in server.phases:
        for m in inbox:
            server.receive(m)
        out = server.end_phase()
        if server.done:
            break
        inbox = []
        for m in out:
            c = clients[m.recipient]
            if isinstance(m, ShareDelivery):
                restored = SecAggClient.restore(c.snapshot(), session=b"s" * 16, round=3, state=c.state)
                with pytest.raises(ProtocolError, match="no value to mask"):
                    restored.receive(m)
                restored = SecAggClient.restore(c.snapshot(), session=b"s" * 16, round=3, state=c.state)
                restored.provide(values[m.recipient])
                with pytest.raises(ProtocolError, match="already has"):
                    restored.provide(values[m.recipient])
                clients[m.recipient] = c = restored
            inbox += c.receive(m)
    assert server.done
    expect = sum(values.values()) % np.uint64(mod)
    assert np.array_equal(np.asarray(server.result, dtype=np.uint64), expect)
    with pytest.raises(ProtocolError, match="after the masked input"):
        clients[0].provide(values[0])
