"""Protocol properties of SecAgg / SecAgg+: exact sums under dropouts at every phase, clean aborts below t,
the server's view (uniform masked inputs, never both kinds of share for one client)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy import stats

from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import RoundInfo, ValueSpec
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.errors import AbortError
from secagg.machine import ClientMachine, Message, ServerMachine
from secagg.masking.graph import GraphSpec
from secagg.masking.messages import MaskedInput, UnmaskResponse

SESSION = b"test-session"


@dataclass
class Recording:
    """Wraps a SecAgg adapter and records every message the server receives."""

    inner: SecAgg | SecAggPlus
    seen: list[Message] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def bind(self, spec: ValueSpec) -> ValueSpec:
        return self.inner.bind(spec)

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        return self.inner.client(cid, value, spec=spec, session=session, round=round)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        srv = self.inner.server(cids, spec=spec, session=session, round=round)
        self.servers.append(srv)
        seen = self.seen
        orig = srv.receive

        def receive(msg: Message) -> list[Message]:
            seen.append(msg)
            return orig(msg)

        srv.receive = receive  # type: ignore[method-assign]
        return srv

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return {}

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Any, ...]:
        return self.inner.guarantees(spec, info)


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


def _run_case(adapter: SecAgg | SecAggPlus, n: int, drops: dict[int, int], seed: int, bits: int = 24) -> None:
    d = 17
    modulus = 1 << bits
    spec = ValueSpec(size=d, cohort=n, domain="ring", modulus=modulus, value_bits=bits - 4)
    rng = np.random.default_rng(seed)
    cids = sorted(int(c) for c in rng.choice(1000, size=n, replace=False))
    values = {c: rng.integers(0, modulus, d, dtype=np.uint64) for c in cids}
    rec = Recording(adapter)
    rec.bind(spec)
    probe = adapter.server(cids, spec=spec, session=SESSION, round=seed)
    t = probe.threshold  # type: ignore[attr-defined]
    phases = probe.phases
    drop_by_cid = {cids[i % n]: p for i, p in drops.items()}
    want_phase, want_answered, want_included = _expected(cids, drop_by_cid, phases, t, probe.graph)  # type: ignore[attr-defined]
    sched = DropoutSchedule(dict(drop_by_cid.items()))
    event(f"abort in {want_phase}" if want_phase else f"sum of {len(want_included)} of {n}")
    if want_phase is not None:
        with pytest.raises(AbortError) as err:
            run_secure_sum(
                rec,
                values,
                spec=spec,
                session=SESSION,
                round=seed,
                dropouts=sched,
                reorder=np.random.default_rng(seed + 1),
            )
        assert err.value.phase == want_phase
        assert err.value.needed == t and err.value.answered == want_answered
    else:
        out = run_secure_sum(
            rec, values, spec=spec, session=SESSION, round=seed, dropouts=sched, reorder=np.random.default_rng(seed + 1)
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
    for m in rec.seen:
        if isinstance(m, UnmaskResponse):
            b_of.update(m.alive)
            s_of.update(m.dropped)
    assert not (b_of & s_of)
    asked_b, asked_s = rec.servers[0].asked
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
    _run_case(SecAgg(threshold=t), n, drops, seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(5, 12),
    k=st.integers(2, 6),
    frac=st.floats(0.5, 0.9),
    drops=st.dictionaries(st.integers(0, 11), st.integers(0, 3), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_secaggplus_exact_sum_or_clean_abort(n: int, k: int, frac: float, drops: dict[int, int], seed: int) -> None:
    _run_case(SecAggPlus(threshold=frac, neighbours=k), n, drops, seed, bits=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 8),
    plus=st.booleans(),
    drops=st.dictionaries(st.integers(0, 7), st.integers(0, 4), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_authenticated_exact_sum_or_clean_abort(n: int, plus: bool, drops: dict[int, int], seed: int) -> None:
    adapter: SecAgg | SecAggPlus = (
        SecAggPlus(threshold=0.6, neighbours=4, authenticated=True)
        if plus
        else SecAgg(threshold=0.6, authenticated=True)
    )
    _run_case(adapter, n, drops, seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 10),
    drops=st.dictionaries(st.integers(0, 9), st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
    plus=st.booleans(),
)
def test_pipeline_float_sum_within_quantization_bound(n: int, drops: dict[int, int], seed: int, plus: bool) -> None:
    d = 50
    ssum = SecAggPlus(threshold=0.6, neighbours=4) if plus else SecAgg(threshold=0.6)
    bound = Pipeline([Clip(l2=1.0), Quantize(bits=16)], sum=ssum).bind(ValueSpec(size=d, cohort=n))
    rng = np.random.default_rng(seed)
    xs = {c: rng.normal(size=d) * rng.uniform(0.1, 2.0) for c in range(n)}
    enc = {c: bound.encode(x, SecureRandom.for_testing(f"{seed}-{c}")) for c, x in xs.items()}
    sched = DropoutSchedule({c: p for c, p in drops.items() if c < n})
    try:
        out = run_secure_sum(
            ssum,
            enc,
            spec=bound.sum_spec,
            session=SESSION,
            round=0,
            dropouts=sched,
            reorder=np.random.default_rng(seed),
        )
    except AbortError:
        assert drops  # only dropouts can make the round abort
        return
    info = RoundInfo(round=0, planned=tuple(range(n)), included=out.included, population=n, sample_rate=1.0)
    got = bound.decode(out.total, info, SecureRandom.for_testing("server"))
    want = sum(
        (np.asarray(Clip(l2=1.0).encode(xs[c], bound.specs[0], SecureRandom.for_testing(0))) for c in out.included),
        np.zeros(d),
    )
    q = Quantize(bits=16).quantizer(bound.specs[1])
    assert np.max(np.abs(got - want)) <= q.max_error(len(out.included)) + 1e-12


def test_masked_inputs_look_uniform_to_the_server() -> None:
    """Even all-zero inputs reach the server as uniform words mod 2^k (chi-square on byte buckets)."""
    n, d, bits = 5, 40_000, 24
    spec = ValueSpec(size=d, cohort=n, domain="ring", modulus=1 << bits, value_bits=bits - 3)
    rec = Recording(SecAgg(threshold=3))
    values = {c: np.zeros(d, dtype=np.uint64) for c in range(n)}
    out = run_secure_sum(rec, values, spec=spec, session=SESSION, dropouts=DropoutSchedule({4: 3}))
    assert not out.total.any()
    ys = [m.y for m in rec.seen if isinstance(m, MaskedInput)]
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
