"""Adversary: malicious or colluding clients.

What holds: a client that sends a wrong Shamir share can never make the server release a wrong sum. The
server checks each reconstructed self-mask seed against the commitment made when the owner advertised
its keys, and each dropped client's mask key against its advertised public key. With spare shares
(more than t responders) the liar is named (``SecAggServer.bad_shares``) and dropped; without, the
round aborts with an AbortError. A coalition of fewer than t clients holds fewer than t shares.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations

import numpy as np
import pytest

from secagg._hazmat import shamir
from secagg.errors import AbortError
from secagg.machine import Message
from secagg.masking.messages import UnmaskResponse
from tests.adversary import harness as h

D = 10


@pytest.mark.parametrize("auth", [False, True])
def test_a_flipped_bit_in_a_self_mask_share_is_detected_named_and_dropped(auth: bool) -> None:
    """Regression (issue 9.5): one flipped bit in one share of b silently corrupted the sum."""
    n, t = 6, 4
    ids, pubs = h.keys(n)
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=auth, ids=ids, pubs=pubs)
    srv = h.server(n, D, t=t, pubs=pubs if auth else None)
    total = h.drive(srv, cls, up=_liar(cls, owner=2, liar=1, kind="b"))
    assert np.array_equal(total, sum(vals.values()) & np.uint64(h.MOD - 1))  # the right sum, from spare shares
    assert srv.bad_shares == {1: frozenset({2})}


def test_a_wrong_spare_share_the_server_does_not_need_changes_nothing() -> None:
    """The server uses the first t shares; a wrong one beyond them is never used (and so not reported)."""
    n, t = 6, 4
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=False)
    srv = h.server(n, D, t=t, pubs=None)
    total = h.drive(srv, cls, up=_liar(cls, owner=2, liar=5, kind="b"))
    assert np.array_equal(total, sum(vals.values()) & np.uint64(h.MOD - 1))
    assert srv.bad_shares == {}


def test_a_wrong_share_of_a_dropped_clients_mask_key_is_named_and_dropped() -> None:
    n, t = 6, 3
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=False)
    srv = h.server(n, D, t=t, pubs=None)
    liar = _liar(cls, owner=4, liar=1, kind="s")

    def up(m: Message) -> Message | None:
        if m.sender == 4 and type(m).__name__ == "MaskedInput":
            return None  # client 4 drops after sharing its keys: the server needs its mask key
        return liar(m)

    total = h.drive(srv, cls, up=up)
    want = sum(v for c, v in vals.items() if c != 4) & np.uint64(h.MOD - 1)
    assert np.array_equal(total, want)
    assert srv.bad_shares == {1: frozenset({4})}


def test_without_spare_shares_the_round_aborts_instead_of_a_wrong_sum() -> None:
    n, t = 5, 4
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=False)
    srv = h.server(n, D, t=t, pubs=None)
    liar = _liar(cls, owner=0, liar=3, kind="b")

    def up(m: Message) -> Message | None:
        if isinstance(m, UnmaskResponse) and m.sender == 4:
            return None  # only t = 4 responders: no spare share
        return liar(m)

    with pytest.raises(AbortError, match="committed to"):
        h.drive(srv, cls, up=up)
    assert srv.result is None


def test_many_liars_cannot_force_a_wrong_sum() -> None:
    """Every responder but t - 1 lies about client 0's seed: no t honest shares exist, so the round aborts."""
    n, t = 7, 3
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=False)
    srv = h.server(n, D, t=t, pubs=None)
    liars = [_liar(cls, owner=0, liar=c, kind="b") for c in range(2, n)]

    def up(m: Message) -> Message:
        for f in liars:
            m = f(m)
        return m

    with pytest.raises(AbortError, match="wrong shares"):
        h.drive(srv, cls, up=up)


def test_fewer_than_t_colluders_hold_too_few_shares_to_reconstruct() -> None:
    """Any t - 1 shares fit every possible secret: for each guess there is a polynomial through them."""
    n, t = 6, 4
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=False)
    srv = h.server(n, D, t=t, pubs=None)
    msgs = [m for c in range(n) for m in cls[c].start()]
    for m in msgs:
        srv.receive(m)
    for m in srv.end_phase():
        for r in cls[m.recipient].receive(m):
            srv.receive(r)
    for m in srv.end_phase():
        cls[m.recipient].receive(m)
    victim_b = int.from_bytes(cls[0]._b, "big")
    for coalition in combinations(range(1, n), t - 1):
        pts = [(v + 1, cls[v]._held[0][0]) for v in coalition]
        for guess in (victim_b, victim_b ^ 1, 0):  # a t-th point (0, guess) always completes a polynomial
            full = [*pts, (0 + 10**6, shamir.interpolate([*pts, (0, guess)], 10**6))]
            assert shamir.combine(full, threshold=t) == guess.to_bytes(32, "big")


def _liar(cls: dict[int, object], *, owner: int, liar: int, kind: str) -> h.Tamper:
    """A tamper hook: ``liar`` flips one bit of its share of ``owner``'s secret and re-signs (it is malicious)."""

    def up(m: Message) -> Message:
        if not (isinstance(m, UnmaskResponse) and m.sender == liar):
            return m
        ids, shares = (m.alive, m.b_shares) if kind == "b" else (m.dropped, m.s_shares)
        if owner not in ids:
            return m
        i = ids.index(owner)
        bad = bytearray(shares[i])
        bad[-1] ^= 1
        new = (*shares[:i], bytes(bad), *shares[i + 1 :])
        m = dataclasses.replace(m, **({"b_shares": new} if kind == "b" else {"s_shares": new}), signature=b"")
        return cls[liar]._signed(m)[0]  # type: ignore[attr-defined]

    return up


def test_a_crafted_share_that_shifts_the_seed_is_caught() -> None:
    """The liar knows the Lagrange coefficient of its point and shifts b by exactly +1, so b stays a valid
    32-byte seed: the old "secret < 2^256" check passed and the sum came out silently wrong."""
    n, t = 6, 4
    vals = h.values(n, D)
    cls = h.clients(vals, t=t, min_cohort=n, auth=False)
    srv = h.server(n, D, t=t, pubs=None)
    xs = tuple(range(1, t + 1))  # the server combines the first t responders 0..t-1 (x = id + 1)
    liar, owner = 1, 2
    delta = pow(shamir.lagrange_at_zero(xs)[xs.index(liar + 1)], -1, shamir.PRIME)

    def up(m: Message) -> Message:
        if isinstance(m, UnmaskResponse) and m.sender == liar:
            i = m.alive.index(owner)
            y = (shamir.decode_share(m.b_shares[i]) + delta) % shamir.PRIME
            m = dataclasses.replace(m, b_shares=(*m.b_shares[:i], shamir.encode_share(y), *m.b_shares[i + 1 :]))
        return m

    total = h.drive(srv, cls, up=up)
    assert np.array_equal(total, sum(vals.values()) & np.uint64(h.MOD - 1))
    assert srv.bad_shares == {liar: frozenset({owner})}
