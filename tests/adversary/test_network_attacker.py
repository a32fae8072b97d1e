"""Adversary: a network attacker between the clients and the server (flips bits, replays, reorders).

What holds. Authenticated mode: every client message is signed over (session, round, sender, phase,
content) and every server message is checked by the client (signed keys, AES-GCM shares, signed survivor
lists), so any change is detected -- the round either raises (ProtocolError / CodecError / AbortError)
or still yields the exact sum. Unauthenticated mode: the same holds except for the masked input, the keys
the server relays and the sender's identity, whose integrity the guarantee states comes from the
transport (TLS).
Decoding tampered bytes raises only CodecError.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl.spec import RoundInfo, ValueSpec
from fl.sums.secagg import SecAgg
from secagg import wire
from secagg.errors import AbortError, CodecError, ProtocolError
from secagg.machine import Message
from secagg.masking.messages import KeyDirectory, MaskedInput, ShareKeys, UnmaskResponse
from tests.adversary import harness as h

N, T, D = 5, 3, 6
TYPES = ("AdvertiseKeys", "KeyDirectory", "ShareKeys", "ShareDelivery", "MaskedInput", "ConsistencyCheck",
         "ConsistencySignature", "UnmaskRequest", "UnmaskResponse")
DETECTED = (ProtocolError, CodecError, AbortError)


def _flip_round(auth: bool, kind: str, nth: int, pos: int, bit: int) -> tuple[str, Message | None]:
    """Run a round where the attacker flips one bit of the ``nth`` message of type ``kind`` on the wire.

    Returns ("detected" | "exact" | "wrong", the tampered message or None if none was flipped).
    """
    ids, pubs = h.keys(N)
    vals = h.values(N, D)
    cls = h.clients(vals, t=T, min_cohort=N, auth=auth, ids=ids, pubs=pubs)
    srv = h.server(N, D, t=T, pubs=pubs if auth else None)
    seen = {"n": 0}
    flipped: list[Message] = []

    def tamper(m: Message) -> Message:
        if type(m).__name__ != kind:
            return m
        seen["n"] += 1
        if seen["n"] - 1 != nth:
            return m
        raw = bytearray(wire.dumps(m))
        raw[pos % len(raw)] ^= 1 << bit
        out = wire.loads(bytes(raw))  # CodecError propagates: detected
        flipped.append(out)
        return out

    try:
        total = h.drive(srv, cls, up=tamper, down=tamper)
    except DETECTED:
        return "detected", flipped[0] if flipped else None
    # a flip that misroutes a message only drops its client (the attacker could drop it anyway): the sum
    # must then be exactly that of the clients the server says it included
    want = sum(vals[c] for c in srv.included) & np.uint64(h.MOD - 1)
    return ("exact" if np.array_equal(total, want) else "wrong"), flipped[0] if flipped else None


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(TYPES), nth=st.integers(0, N - 1), pos=st.integers(0, 4000), bit=st.integers(0, 7))
def test_authenticated_mode_detects_every_bit_flip(kind: str, nth: int, pos: int, bit: int) -> None:
    outcome, _ = _flip_round(True, kind, nth, pos, bit)
    assert outcome in ("detected", "exact")  # never a silently wrong sum


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(TYPES), nth=st.integers(0, N - 1), pos=st.integers(0, 4000), bit=st.integers(0, 7))
def test_unauthenticated_mode_detects_every_flip_but_the_stated_ones(kind: str, nth: int, pos: int, bit: int) -> None:
    outcome, msg = _flip_round(False, kind, nth, pos, bit)
    if outcome == "wrong":  # only where the guarantee says integrity comes from TLS: the masked input and
        assert isinstance(msg, (MaskedInput, KeyDirectory))  # the unsigned keys the server relays


def test_masked_input_flip_each_byte_auth_detected_unauth_stated() -> None:
    """Regression (issue 9.9): one changed byte in a masked input gave a silently wrong sum."""
    y = np.random.default_rng(0).integers(0, h.MOD, D).astype(np.uint32)  # masked words: uniform in the ring
    payload = wire.pack_bits(y, int(y.max()).bit_length())  # y travels packed to its bit width
    header = wire.dumps(MaskedInput(0, -1, h.SESSION, 1, y)).find(payload)
    assert header > 0
    for pos in range(header, header + len(payload)):  # every byte of y
        assert _flip_round(True, "MaskedInput", 1, pos, 0)[0] == "detected"
    assert _flip_round(False, "MaskedInput", 1, header, 0)[0] == "wrong"  # what TLS must prevent
    spec = ValueSpec(size=D, cohort=N, domain="ring", modulus=h.MOD, value_bits=16)
    info = RoundInfo(round=0, planned=tuple(range(N)), included=tuple(range(N)), population=N, sample_rate=1.0)
    (g,) = SecAgg(threshold=0.6).guarantees(spec, info)
    assert any("integrity" in a and "TLS" in a for a in g.assumptions)
    (ga,) = SecAgg(threshold=0.6, authenticated=True).guarantees(spec, info)
    assert any("signed" in a for a in ga.assumptions)


@pytest.mark.parametrize("kind", ["ShareKeys", "MaskedInput", "UnmaskResponse"])
def test_signed_messages_cannot_be_moved_to_another_sender_round_or_session(kind: str) -> None:
    ids, pubs = h.keys(N)
    cls = h.clients(h.values(N, D), t=T, min_cohort=N, auth=True, ids=ids, pubs=pubs)
    srv = h.server(N, D, t=T, pubs=pubs)
    caught: list[str] = []

    def up(m: Message) -> Message:
        if type(m).__name__ == kind and m.sender == 0:
            assert isinstance(m, (ShareKeys, MaskedInput, UnmaskResponse)) and m.signature
            other = dataclasses.replace(m, signature=cls[1]._signed(dataclasses.replace(m, sender=1))[0].signature)
            for bad in (other, dataclasses.replace(m, sender=1), dataclasses.replace(m, signature=b"")):
                try:
                    srv.receive(bad)
                except ProtocolError as exc:
                    caught.append(str(exc))
        return m

    h.drive(srv, cls, up=up)  # the genuine messages still make an exact round
    assert len(caught) == 3


def test_replays_and_cross_phase_reorders_are_refused() -> None:
    ids, pubs = h.keys(N)
    cls = h.clients(h.values(N, D), t=T, min_cohort=N, auth=True, ids=ids, pubs=pubs)
    srv = h.server(N, D, t=T, pubs=pubs)
    old: list[Message] = []

    def up(m: Message) -> Message:
        for prev in old:  # every earlier message, replayed now (same phase: duplicate; later: out of phase)
            with pytest.raises(ProtocolError):
                srv.receive(prev)
        if m.sender == 2:
            old.append(m)
        return m

    h.drive(srv, cls, up=up)
    assert len(old) == 5  # advertise, share, masked, consistency, unmask: each replayed in later phases


def test_decoding_tampered_real_messages_raises_only_codec_error() -> None:
    ids, pubs = h.keys(N)
    cls = h.clients(h.values(N, D), t=T, min_cohort=N, auth=True, ids=ids, pubs=pubs)
    srv = h.server(N, D, t=T, pubs=pubs)
    raws: list[bytes] = []

    def keep(m: Message) -> Message:
        raws.append(wire.dumps(m))
        return m

    h.drive(srv, cls, up=keep, down=keep)
    rng = np.random.default_rng(0)
    for raw in raws:
        for _ in range(20):
            bad = bytearray(raw)
            bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
            cut = bytes(bad[: int(rng.integers(len(bad) + 1))])
            for cand in (bytes(bad), cut):
                with contextlib.suppress(CodecError):
                    wire.loads(cand)
