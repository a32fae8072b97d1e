"""Honest clients refuse dangerous requests; the server refuses bad messages; the peer's flaws are absent."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pytest

from secagg import wire
from secagg.errors import OverflowRiskError, ProtocolError
from secagg.machine import SERVER, Message
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    KeyDirectory,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.masking.server import SecAggServer
from secagg.memory import DropoutSchedule
from tests.secagg.rounds import Masked, plus

S = b"session-A"
MOD = 1 << 20


class Round:
    """A hand-driven round, so tests can stop at any phase and tamper with messages."""

    def __init__(self, n: int = 5, t: int = 3, *, auth: bool = False, d: int = 8, graph: GraphSpec | None = None):
        self.n, self.t, self.d = n, t, d
        ids = {c: IdentityKeys.generate() for c in range(n)} if auth else None
        pubs = {c: k.public for c, k in ids.items()} if ids else None
        self.values = {c: np.arange(d, dtype=np.uint64) * (c + 1) for c in range(n)}
        self.clients = {
            c: SecAggClient(
                c,
                self.values[c],
                session=S,
                round=1,
                modulus=MOD,
                size=d,
                threshold=t,
                min_cohort=n,
                graph=graph,
                identity_key=ids[c].private if ids else None,
                identities=pubs,
            )
            for c in range(n)
        }
        self.server = SecAggServer(
            list(range(n)), session=S, round=1, modulus=MOD, size=d, threshold=t, graph=graph, identities=pubs
        )
        self.outbox: list[Message] = []

    def advertise(self, skip: tuple[int, ...] = ()) -> list[Message]:
        msgs = [m for c, cl in self.clients.items() for m in cl.start()]
        for m in msgs:
            if m.sender not in skip:
                self.server.receive(m)
        return self.server.end_phase()

    def step(self, to_clients: list[Message], skip: tuple[int, ...] = ()) -> list[Message]:
        for m in to_clients:
            if m.recipient in skip:
                continue
            for r in self.clients[m.recipient].receive(m):
                self.server.receive(r)
        return self.server.end_phase()


def test_client_refuses_a_node_both_alive_and_dropped() -> None:
    r = Round()
    unmask = r.step(r.step(r.advertise()))
    req = next(m for m in unmask if m.recipient == 0)
    assert isinstance(req, UnmaskRequest)
    bad = dataclasses.replace(req, dropped=(2,))  # 2 is also in alive
    with pytest.raises(ProtocolError, match="both alive and dropped"):
        r.clients[0].receive(bad)


def test_client_refuses_fewer_than_t_survivors_and_leaving_it_out() -> None:
    r = Round(t=3)
    unmask = r.step(r.step(r.advertise()))
    req = next(m for m in unmask if m.recipient == 0)
    assert isinstance(req, UnmaskRequest)
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        r.clients[0].receive(dataclasses.replace(req, alive=(0, 1), dropped=(2, 3, 4)))
    r2 = Round(t=3)
    unmask2 = r2.step(r2.step(r2.advertise()))
    req2 = next(m for m in unmask2 if m.recipient == 0)
    with pytest.raises(ProtocolError, match="does not list this client as alive"):
        r2.clients[0].receive(dataclasses.replace(req2, alive=(1, 2, 3, 4), dropped=()))


def test_client_refuses_replays_from_other_rounds_sessions_and_out_of_phase() -> None:
    r = Round()
    directory = r.advertise()
    d0 = directory[0]
    with pytest.raises(ProtocolError, match="another session or round"):
        r.clients[0].receive(dataclasses.replace(d0, session=b"other"))
    with pytest.raises(ProtocolError, match="another session or round"):
        r.clients[0].receive(dataclasses.replace(d0, round=2))
    with pytest.raises(ProtocolError, match="out of phase"):
        r.clients[0].receive(UnmaskRequest(SERVER, 0, S, 1, (0, 1, 2), ()))
    deliveries = r.step(directory)
    r.step(deliveries)
    with pytest.raises(ProtocolError, match="out of phase"):  # a replayed directory after masking
        r.clients[0].receive(d0)


def test_client_answers_an_unmask_request_only_once() -> None:
    r = Round()
    unmask = r.step(r.step(r.advertise()))
    req = next(m for m in unmask if m.recipient == 1)
    assert len(r.clients[1].receive(req)) == 1
    with pytest.raises(ProtocolError, match="out of phase"):
        r.clients[1].receive(req)


def test_server_refuses_bad_messages() -> None:
    r = Round()
    ads = [m for cl in r.clients.values() for m in cl.start()]
    a0 = ads[0]
    assert isinstance(a0, AdvertiseKeys)
    for bad, why in [
        (dataclasses.replace(a0, session=b"x"), "another session"),
        (dataclasses.replace(a0, round=9), "another session"),
        (dataclasses.replace(a0, sender=77), "not sampled"),
        (dataclasses.replace(a0, c_pk=b"short"), "malformed"),
        (MaskedInput(0, SERVER, S, 1, np.zeros(8, np.uint32)), "out of phase"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            r.server.receive(bad)
    r.server.receive(a0)
    with pytest.raises(ProtocolError, match="duplicated or replayed"):
        r.server.receive(a0)
    for m in ads[1:]:
        r.server.receive(m)
    directory = r.server.end_phase()
    shares = [x for m in directory for x in r.clients[m.recipient].receive(m)]
    s0 = shares[0]
    assert isinstance(s0, ShareKeys)
    with pytest.raises(ProtocolError, match="one ciphertext"):
        r.server.receive(dataclasses.replace(s0, recipients=s0.recipients[:-1], ciphertexts=s0.ciphertexts[:-1]))
    for m in shares:
        r.server.receive(m)
    deliveries = r.server.end_phase()
    masked = [x for m in deliveries for x in r.clients[m.recipient].receive(m)]
    m0 = masked[0]
    assert isinstance(m0, MaskedInput)
    for y in (m0.y[:-1], m0.y.astype(np.uint64), m0.y.astype(np.float64)):
        with pytest.raises(ProtocolError, match="expected uint32"):
            r.server.receive(dataclasses.replace(m0, y=y))


def test_tampered_share_ciphertext_is_refused() -> None:
    r = Round()
    deliveries = r.step(r.advertise())
    d0 = deliveries[0]
    assert isinstance(d0, ShareDelivery)
    ct = bytearray(d0.ciphertexts[0])
    ct[-1] ^= 1
    with pytest.raises(ProtocolError, match="invalid"):
        r.clients[d0.recipient].receive(dataclasses.replace(d0, ciphertexts=(bytes(ct), *d0.ciphertexts[1:])))
    # A ciphertext redirected from another recipient does not decrypt either (AAD binds the recipient).
    d1 = deliveries[1]
    assert isinstance(d1, ShareDelivery)
    swapped = dataclasses.replace(d0, ciphertexts=(d1.ciphertexts[0], *d0.ciphertexts[1:]))
    with pytest.raises(ProtocolError):
        r.clients[d0.recipient].receive(swapped)


def test_dropping_during_key_sharing_does_not_abort_the_round() -> None:
    """Peer flaw: a client dropping during key sharing aborts Flower's whole round."""
    n, d = 8, 32
    values = {c: np.full(d, c, dtype=np.uint64) for c in range(n)}
    for graph in (GraphSpec(complete=True), plus(4)):
        ssum = Masked(1 << 24, d, threshold=0.6, graph=graph)
        out = ssum.run(values, session=S, dropouts=DropoutSchedule({3: "share", 5: "share"}))
        assert out.included == (0, 1, 2, 4, 6, 7)
        assert np.all(out.total == sum(out.included))


def test_authenticated_mode_refuses_swapped_or_unsigned_keys() -> None:
    r = Round(auth=True)
    ads = [m for cl in r.clients.values() for m in cl.start()]
    a0 = ads[0]
    assert isinstance(a0, AdvertiseKeys) and len(a0.signature) == 64
    with pytest.raises(ProtocolError, match="not signed"):
        r.server.receive(dataclasses.replace(a0, signature=b""))
    for m in ads:
        r.server.receive(m)
    directory = r.server.end_phase()
    d0 = directory[0]
    assert isinstance(d0, KeyDirectory)
    # An active server swaps client 1's mask key for one it controls: client 0 notices.
    evil = os.urandom(32)
    i = d0.ids.index(1)
    swapped = dataclasses.replace(d0, s_pks=(*d0.s_pks[:i], evil, *d0.s_pks[i + 1 :]))
    with pytest.raises(ProtocolError, match="valid signature"):
        r.clients[0].receive(swapped)


def test_unauthenticated_keys_are_not_signed_but_authenticated_ones_are() -> None:
    """Peer flaw: Flower's public keys are unsigned. Ours are signed whenever authenticated mode is on."""
    plain = Round(auth=False)
    assert all(m.signature == b"" for cl in plain.clients.values() for m in cl.start())  # type: ignore[attr-defined]
    auth = Round(auth=True)
    assert all(len(m.signature) == 64 for cl in auth.clients.values() for m in cl.start())  # type: ignore[attr-defined]


def test_consistency_check_stops_a_server_lying_about_survivors() -> None:
    r = Round(n=5, t=3, auth=True)
    checks = r.step(r.step(r.advertise()))
    assert all(isinstance(m, ConsistencyCheck) for m in checks)
    # The server tells client 0 that client 4 dropped while the others were told it survived.
    c0 = next(m for m in checks if m.recipient == 0)
    assert isinstance(c0, ConsistencyCheck)
    lie = dataclasses.replace(c0, survivors=(0, 1, 2, 3))
    sig0 = r.clients[0].receive(lie)
    assert len(sig0) == 1
    others = [x for m in checks if m.recipient != 0 for x in r.clients[m.recipient].receive(m)]
    for m in others:
        r.server.receive(m)
    sigs = {m.sender: m.signature for m in others}  # type: ignore[attr-defined]
    # The lying server asks client 0 for client 4's key share, backed by the others' signatures: they signed
    # a different survivor list, so they do not verify for client 0, which refuses.
    req0 = UnmaskRequest(
        SERVER, 0, S, 1, alive=(0, 1, 2, 3), dropped=(4,), signers=(1, 2, 3), signatures=(sigs[1], sigs[2], sigs[3])
    )
    with pytest.raises(ProtocolError, match="signature on the survivor list"):
        r.clients[0].receive(req0)
    # Honest clients told the truth answer the honest request.
    unmask = r.server.end_phase()
    assert {m.recipient for m in unmask} == {1, 2, 3, 4}
    assert all(r.clients[m.recipient].receive(m) for m in unmask)


def test_clients_refuse_values_outside_the_ring() -> None:
    """Peer flaw: inputs silently clipped to +-8. Ours: the client refuses out-of-ring values (and floats)."""
    with pytest.raises(OverflowRiskError):
        SecAggClient(
            0, np.array([0, MOD, 1], dtype=np.uint64), session=S, round=1, modulus=MOD, size=3, threshold=2,
            min_cohort=4,
        )
    with pytest.raises(OverflowRiskError):
        SecAggClient(0, np.array([0.5, 1, 1]), session=S, round=1, modulus=MOD, size=3, threshold=2, min_cohort=4)


def test_uploads_are_uint32_when_the_ring_fits() -> None:
    """Peer flaw: int64 uploads. Ours: uint32 words for k <= 32 (4 bytes per coordinate on the wire)."""
    d = 1000
    for bits, dtype in ((20, np.uint32), (32, np.uint32), (40, np.uint64)):
        r: Any = Round(d=d)
        r.clients = {
            c: SecAggClient(
                c, np.zeros(d, np.uint64), session=S, round=1, modulus=1 << bits, size=d, threshold=3, min_cohort=5
            )
            for c in range(5)
        }
        r.server = SecAggServer(list(range(5)), session=S, round=1, modulus=1 << bits, size=d, threshold=3)
        deliveries = r.step(r.advertise())
        y = r.clients[0].receive(deliveries[0])[0]
        assert isinstance(y, MaskedInput) and y.y.dtype == dtype
        assert len(wire.dumps(y)) <= np.dtype(dtype).itemsize * d + 64


def test_server_never_asks_for_both_kinds_even_with_every_dropout_pattern() -> None:
    n = 6
    values = {c: np.full(4, c, dtype=np.uint64) for c in range(n)}
    for pattern in range(4**2):
        drops = {0: pattern % 4, 1: pattern // 4}
        ssum = Masked(1 << 24, 4, threshold=3, graph=GraphSpec(complete=True))
        try:
            out = ssum.run(values, session=S, dropouts=DropoutSchedule(drops))
        except Exception as exc:  # only clean aborts are acceptable
            assert type(exc).__name__ == "AbortError"
            continue
        assert np.all(out.total == sum(out.included))


def test_unmask_response_with_wrong_ids_is_refused() -> None:
    r = Round()
    unmask = r.step(r.step(r.advertise()))
    req = next(m for m in unmask if m.recipient == 0)
    resp = r.clients[0].receive(req)[0]
    assert isinstance(resp, UnmaskResponse)
    with pytest.raises(ProtocolError):
        r.server.receive(dataclasses.replace(resp, dropped=(1,), s_shares=(resp.b_shares[0],)))
    r.server.receive(resp)
    with pytest.raises(ProtocolError, match="duplicated"):
        r.server.receive(resp)


def test_low_order_keys_are_refused_by_server_and_clients() -> None:
    r = Round()
    ads = [m for cl in r.clients.values() for m in cl.start()]
    a0 = ads[0]
    assert isinstance(a0, AdvertiseKeys)
    with pytest.raises(ProtocolError, match="unusable"):
        r.server.receive(dataclasses.replace(a0, s_pk=bytes(32)))
    for m in ads:
        r.server.receive(m)
    d0 = r.server.end_phase()[0]
    assert isinstance(d0, KeyDirectory)
    i = d0.ids.index(1)
    bad = dataclasses.replace(d0, c_pks=(*d0.c_pks[:i], bytes(32), *d0.c_pks[i + 1 :]))
    with pytest.raises(ProtocolError, match="unusable"):
        r.clients[d0.recipient].receive(bad)
