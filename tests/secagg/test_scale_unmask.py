"""The server's unmask step at scale (issue 13): batched reconstruction, keys parsed once, exact mask work.

A tiny phase loop over the secagg machines (no fl import): clients in ``drop`` share their keys and then
vanish, the costliest case for the server.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg._hazmat import kex, prg, shamir
from secagg.machine import Message
from secagg.masking import _common
from secagg.masking.client import SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.messages import MaskedInput
from secagg.masking.server import SecAggServer

BITS = 26


def _round(
    n: int, d: int, drop: Sequence[int], *, k: int | None = 6, session: bytes = b"unmask", seed: int = 0,
    ids: Sequence[int] | None = None,
) -> tuple[SecAggServer, dict[int, np.ndarray]]:
    """Run one round up to the server's unmask ``end_phase`` (all unmask responses received)."""
    spec = GraphSpec(complete=k is None, neighbours=k)
    rng = np.random.default_rng(seed)
    cohort = list(range(n)) if ids is None else list(ids)
    values = {c: rng.integers(0, 1 << 16, size=d, dtype=np.uint64) for c in cohort}
    kw: dict[str, Any] = dict(session=session, round=0, modulus=1 << BITS, size=d, threshold=0.5, graph=spec)
    clients = {c: SecAggClient(c, values[c], min_cohort=n, **kw) for c in cohort}
    srv = SecAggServer(cohort, **kw)
    inbox: list[Message] = [m for c in clients.values() for m in c.start()]
    while True:
        for m in inbox:
            srv.receive(m)
        if srv.phase == "unmask":
            return srv, values
        inbox = [
            r
            for m in srv.end_phase()
            for r in clients[m.recipient].receive(m)
            if not (isinstance(r, MaskedInput) and r.sender in drop)
        ]


def _expected(srv: SecAggServer, values: dict[int, np.ndarray], d: int) -> np.ndarray:
    return sum((values[c] for c in srv.included), np.zeros(d, dtype=np.uint64)) % np.uint64(1 << BITS)


@pytest.mark.parametrize("k", [6, None])
def test_unmask_with_dropouts_sums_exactly(k: int | None) -> None:
    n, d = 24, 50
    srv, values = _round(n, d, drop=[1, 2, 9, 17], k=k)
    srv.end_phase()
    assert srv.done and set(srv.included) == set(range(n)) - {1, 2, 9, 17}
    assert srv.result is not None and np.array_equal(srv.result, _expected(srv, values, d))


@pytest.mark.parametrize("k", [6, None])
def test_unmask_with_sparse_client_ids_sums_exactly(k: int | None) -> None:
    """Client ids far apart (e.g. Flower node ids): the share table maps them by binary search."""
    ids = [10**15 + 7919 * c for c in range(20)]
    drop = [ids[2], ids[11]]
    srv, values = _round(20, 30, drop=drop, k=k, ids=ids)
    srv.end_phase()
    assert srv.done and set(srv.included) == set(ids) - set(drop)
    assert srv.result is not None and np.array_equal(srv.result, _expected(srv, values, 30))


def test_unmask_parses_no_key_and_agrees_once_per_dropped_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unmask step does exactly one X25519 per (dropped, surviving neighbour) pair, with keys parsed
    when they were advertised, and expands exactly the masks it must remove. Fails on the old server,
    which parsed the peer's public key again for every pair (kex.agree)."""
    n, d, drop = 30, 40, [3, 4, 20]
    srv, values = _round(n, d, drop=drop, k=8)
    parsed, agreed, expanded = [0], [0], [0]
    parse, many, add = kex.X25519PublicKey.from_public_bytes, kex.agree_many, prg.MaskExpander.add

    def count_parse(data: bytes) -> Any:
        parsed[0] += 1
        return parse(data)

    def count_many(private: Any, peers: Sequence[Any], **kw: Any) -> list[bytes]:
        agreed[0] += len(peers)
        return many(private, peers, **kw)

    def count_add(self: prg.MaskExpander, acc: Any, seed: bytes, sign: int = 1) -> None:
        expanded[0] += 1
        add(self, acc, seed, sign)

    monkeypatch.setattr(kex.X25519PublicKey, "from_public_bytes", staticmethod(count_parse))
    monkeypatch.setattr(kex, "agree_many", count_many)
    monkeypatch.setattr(prg.MaskExpander, "add", count_add)
    srv.end_phase()
    survivors = set(srv.included)
    pairs = sum(len(srv.graph.neighbours(w) & survivors) for w in drop)
    assert parsed[0] == 0
    assert agreed[0] == pairs
    assert expanded[0] == len(survivors) + pairs
    assert srv.result is not None and np.array_equal(srv.result, _expected(srv, values, d))


@settings(max_examples=40, deadline=None)
@given(top=st.integers(2, 80), data=st.data())
def test_combine_many_equals_one_at_a_time(top: int, data: st.DataObject) -> None:
    xs = tuple(sorted(data.draw(st.sets(st.integers(1, top), min_size=1, max_size=top)) | {top}))
    secrets = [bytes([i + 1]) * 32 for i in range(3)]
    rows = [shamir.split(s, xs, threshold=len(xs), random_bytes=os.urandom) for s in secrets]
    assert shamir.combine_many(xs, rows) == secrets
    assert shamir.combine_many(xs, rows) == [shamir.combine(list(zip(xs, r, strict=True)), threshold=len(xs))
                                            for r in rows]


def test_combine_many_marks_inconsistent_rows_and_refuses_unsorted_points() -> None:
    xs = (1, 2, 3, 5)
    good = shamir.split(b"s" * 32, xs, threshold=4, random_bytes=os.urandom)
    bad = [good[0] + 1, *good[1:]]
    assert shamir.combine_many(xs, [good, bad]) == [b"s" * 32, None]
    with pytest.raises(ValueError, match="sorted"):
        shamir.combine_many((2, 1), [good[:2]])
    with pytest.raises(ValueError, match="row"):
        shamir.combine_many(xs, [good[:3]])


def test_agree_many_and_pair_contexts_give_the_same_bytes_as_one_at_a_time() -> None:
    me = kex.generate_private(os.urandom)
    peers = [kex.public_bytes(kex.generate_private(os.urandom)) for _ in range(5)]
    ids = [0, 3, 7, 11, 40]
    ctxs = _common.pair_contexts(b"sess", 4, 7, ids)
    assert ctxs == [_common.pair_context(b"sess", 4, 7, v) for v in ids]
    got = kex.agree_many(me, [kex.parse_public(p) for p in peers], label=b"L", contexts=ctxs)
    assert got == [kex.agree(me, p, label=b"L", context=c) for p, c in zip(peers, ctxs, strict=True)]
    with pytest.raises(ValueError, match="contexts"):
        kex.agree_many(me, [kex.parse_public(peers[0])], label=b"L", contexts=[])
    with pytest.raises(ValueError, match="label"):
        kex.agree_many(me, [], label=b"", contexts=[])


@pytest.mark.parametrize("scale", [1, 10**12])  # compact ids (lookup table) and sparse ones (binary search)
@pytest.mark.parametrize("k", [4, None])
def test_holder_points_equal_share_x(k: int | None, scale: int) -> None:
    spec = GraphSpec(complete=k is None, neighbours=k)
    ids = [scale * c for c in (2, 5, 9, 10, 14, 30, 31, 40)]
    gr = spec.build(ids, threshold=0.5, session=b"pts", round=1)
    assert gr.indices(np.array(ids[::-1], dtype=np.int64)).tolist() == list(range(len(ids)))[::-1]
    pairs = [(v, u) for u in gr.cohort for v in sorted(gr.group(u))]
    holders = np.array([v for v, _ in pairs], dtype=np.int64)
    owners = np.array([u for _, u in pairs], dtype=np.int64)
    assert gr.holder_points(holders, owners).tolist() == [gr.share_x(u, v) for v, u in pairs]


def test_a_wrong_share_is_still_named_with_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The slow path works from the share table: one survivor lies about another's b share, the server
    names it and still sums exactly (spare shares)."""
    n, d = 16, 20
    srv, values = _round(n, d, drop=[5], k=None)
    liar, victim = 3, 8
    resp = srv._responses[liar]
    i = resp.alive.index(victim)
    wrong = shamir.encode_share((shamir.decode_share(resp.b_shares[i]) + 1) % shamir.PRIME)
    srv._responses[liar] = dataclasses.replace(resp, b_shares=(*resp.b_shares[:i], wrong, *resp.b_shares[i + 1 :]))
    srv.end_phase()
    assert srv.bad_shares == {liar: frozenset({victim})}
    assert srv.result is not None and np.array_equal(srv.result, _expected(srv, values, d))



def _stream(seed: int) -> Any:
    """A deterministic byte source (test seam): the same draws for the same seed."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 30), extra=st.integers(0, 20), big=st.booleans(), seed=st.integers(0, 2**32))
def test_split_many_equals_one_split_per_secret(t: int, extra: int, big: bool, seed: int) -> None:
    """Same shares and the same randomness draws as sequential ``split`` calls (the golden transcript
    depends on it), for small points (packed lanes) and large ones (plain path)."""
    rng = np.random.default_rng(seed)
    top = 2**40 if big else 200
    xs = [int(x) for x in rng.choice(np.arange(1, 2000), size=t + extra, replace=False) * (top // 200)]
    secrets = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(2)]
    one, many = _stream(seed), _stream(seed)
    want = [shamir.split(s, xs, threshold=t, random_bytes=one) for s in secrets]
    assert shamir.split_many(secrets, xs, threshold=t, random_bytes=many) == want
    assert one(8) == many(8)  # the same number of bytes was drawn


def _table(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """(points, encoded shares) arrays of equal-length rows of (points, share values)."""
    t = len(rows[0][0])
    points = np.array([list(xs) for xs, _ in rows], dtype=np.int64)
    raw = b"".join(shamir.encode_share(y) for _, ys in rows for y in ys)
    return points, np.frombuffer(raw, dtype=np.uint8).reshape(len(rows), t, shamir.SHARE_BYTES)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 40), data=st.data())
def test_combine_table_equals_combine_many_row_by_row(t: int, data: st.DataObject) -> None:
    """The vectorised limb reconstruction gives exactly the secrets (or None) of the per-row Python one,
    for dense rows (limb path), rows with many gaps or large points (large coefficients: Python path) and
    rows with a wrong share."""
    rows, want = [], []
    for _ in range(data.draw(st.integers(1, 5))):
        top = data.draw(st.sampled_from([t, t + 2, 2 * t + 3, 3 * t, 10**6]))
        xs = sorted(data.draw(st.sets(st.integers(1, max(top, t)), min_size=t, max_size=t)))
        ys = shamir.split(os.urandom(32), xs, threshold=t, random_bytes=os.urandom)
        if data.draw(st.booleans()):
            ys[data.draw(st.integers(0, t - 1))] ^= 1 << data.draw(st.integers(0, 500))
            ys = [y % shamir.PRIME for y in ys]
        rows.append((xs, ys))
        want.append(shamir.combine_many(tuple(xs), [ys])[0])
    assert shamir.combine_table(*_table(rows)) == want


def test_combine_table_refuses_bad_shapes_and_unsorted_points() -> None:
    xs = [1, 2, 4]
    points, shares = _table([(xs, shamir.split(b"s" * 32, xs, threshold=3, random_bytes=os.urandom))])
    assert shamir.combine_table(points, shares) == [b"s" * 32]
    with pytest.raises(ValueError, match="sorted"):
        shamir.combine_table(points[:, ::-1].copy(), shares)
    with pytest.raises(ValueError, match="shape"):
        shamir.combine_table(points, shares[:, :2])


def test_matches_many_and_commit_contexts_equal_one_at_a_time() -> None:
    from secagg._hazmat import commit

    owners = [0, 5, 9, 2**40]
    ctxs = _common.commit_contexts(b"sess", 3, owners)
    assert ctxs == [_common.commit_context(b"sess", 3, u) for u in owners]
    secrets: list[bytes | None] = [os.urandom(32) for _ in owners]
    coms = [commit.commit(s, label=b"L", context=c) for s, c in zip(secrets, ctxs, strict=True) if s]
    coms[1] = bytes(32)  # a wrong commitment
    secrets[2] = None  # no secret (inconsistent shares)
    coms[3] = coms[3][:31]  # malformed
    want = [
        s is not None and commit.matches(s, m, label=b"L", context=c)
        for s, m, c in zip(secrets, coms, ctxs, strict=True)
    ]
    assert commit.matches_many(secrets, coms, label=b"L", contexts=ctxs) == want == [True, False, False, False]
    with pytest.raises(ValueError, match="contexts"):
        commit.matches_many(secrets, coms, label=b"L", contexts=ctxs[:1])


def test_private_matching() -> None:
    raw = os.urandom(32)
    public = kex.public_from_private_bytes(raw)
    key = kex.private_matching(raw, public)
    assert key is not None and kex.private_bytes(key) == raw
    assert kex.private_matching(os.urandom(32), public) is None
    assert kex.private_matching(None, public) is None and kex.private_matching(raw[:31], public) is None


def test_unmask_parses_each_dropped_mask_key_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconstructed s_sk is parsed once, when checked against the advertised key, and that parsed key
    does the agreements. Fails on the old server, which parsed it twice (check, then agree)."""
    n, d, drop = 30, 40, [3, 4, 20]
    srv, values = _round(n, d, drop=drop, k=8)
    parsed = [0]
    parse = kex.X25519PrivateKey.from_private_bytes

    def count(data: bytes) -> Any:
        parsed[0] += 1
        return parse(data)

    monkeypatch.setattr(kex.X25519PrivateKey, "from_private_bytes", staticmethod(count))
    srv.end_phase()
    assert parsed[0] == len(drop)
    assert srv.result is not None and np.array_equal(srv.result, _expected(srv, values, d))


@settings(max_examples=30, deadline=None)
@given(label=st.binary(min_size=1, max_size=200), contexts=st.lists(st.binary(max_size=300), max_size=4))
def test_agree_many_is_hkdf_for_any_label_and_context(label: bytes, contexts: list[bytes]) -> None:
    """The two-HMAC form of agree_many is exactly HKDF-SHA256 (kex.derive) of the X25519 secret."""
    me = kex.generate_private(os.urandom)
    peers = [kex.generate_private(os.urandom).public_key() for _ in contexts]
    want = [kex.derive(me.exchange(p), label=label, context=c) for p, c in zip(peers, contexts, strict=True)]
    assert kex.agree_many(me, peers, label=label, contexts=contexts) == want
