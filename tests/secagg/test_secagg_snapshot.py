"""Client state snapshots: versioned bytes (no pickle), restore gives the same transcript, foreign blobs refused."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dp.rng import SecureRandom
from secagg import wire
from secagg.errors import CodecError, ProtocolError
from secagg.machine import Message
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.server import SecAggServer

SESSION = b"snapshot-session"


def _round(
    *, auth: bool, restore_every_step: bool, n: int = 5, seed: int = 0, graph: GraphSpec | None = None
) -> tuple[list[str], list[int]]:
    """Run one round; optionally replace every client by snapshot+restore before each message it handles."""
    d, mod = 6, 1 << 24
    ids = {c: IdentityKeys.generate(SecureRandom.for_testing(f"id-{c}").bytes) for c in range(n)} if auth else None
    pubs = {c: k.public for c, k in ids.items()} if ids else None
    rngs = {c: SecureRandom.for_testing(f"snap-{seed}-{c}").bytes for c in range(n)}
    clients = {
        c: SecAggClient(
            c, np.arange(d, dtype=np.uint64) * (c + 1) + seed, session=SESSION, round=3, modulus=mod, size=d,
            threshold=4, min_cohort=n, graph=graph, identity_key=ids[c].private if ids else None, identities=pubs,
            random_bytes=rngs[c],
        )
        for c in range(n)
    }

    def fresh(c: int) -> SecAggClient:
        if restore_every_step:
            old = clients[c]
            blob = old.snapshot()
            clients[c] = SecAggClient.restore(
                blob, session=SESSION, round=3, state=old.state, identity_key=ids[c].private if ids else None,
                identities=pubs, random_bytes=rngs[c],
            )
        return clients[c]

    server = SecAggServer(list(range(n)), session=SESSION, round=3, modulus=mod, size=d, threshold=4, graph=graph,
                          identities=pubs)
    log: list[str] = []
    to_server: list[Message] = [m for c in range(n) for m in fresh(c).start()]
    while not server.done:
        for m in to_server:
            log.append(hashlib.sha256(wire.dumps(m)).hexdigest())
            server.receive(m)
        to_server = []
        for m in server.end_phase():
            log.append(hashlib.sha256(wire.dumps(m)).hexdigest())
            to_server += fresh(m.recipient).receive(m)
    assert server.result is not None
    return log, [int(x) for x in server.result]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(auth=st.booleans(), seed=st.integers(0, 1000), sparse=st.booleans())
def test_snapshot_restore_at_every_phase_gives_the_identical_transcript_and_sum(
    auth: bool, seed: int, sparse: bool
) -> None:
    graph = GraphSpec(complete=False, neighbours=4) if sparse else None
    plain = _round(auth=auth, restore_every_step=False, n=6, seed=seed, graph=graph)
    restored = _round(auth=auth, restore_every_step=True, n=6, seed=seed, graph=graph)
    assert restored == plain
    assert plain[1] == [sum(i * (c + 1) + seed for c in range(6)) for i in range(6)]


def _client(**kw: Any) -> SecAggClient:
    args: dict[str, Any] = dict(session=SESSION, round=3, modulus=1 << 20, size=4, threshold=2, min_cohort=3)
    args.update(kw)
    return SecAggClient(0, np.arange(4, dtype=np.uint64), **args)


def test_restore_refuses_another_session_round_or_phase() -> None:
    blob = _client().snapshot()
    assert SecAggClient.restore(blob, session=SESSION, round=3, state="new").snapshot() == blob
    with pytest.raises(ProtocolError, match="rollback"):
        SecAggClient.restore(blob, session=b"other", round=3, state="new")
    with pytest.raises(ProtocolError, match="rollback"):
        SecAggClient.restore(blob, session=SESSION, round=4, state="new")
    with pytest.raises(ProtocolError, match="rollback"):  # an older phase's blob replayed later
        SecAggClient.restore(blob, session=SESSION, round=3, state="shared")
    ident = IdentityKeys.generate()
    with pytest.raises(ProtocolError, match="authenticated mode"):
        SecAggClient.restore(blob, session=SESSION, round=3, state="new", identity_key=ident.private,
                             identities={0: ident.public})


def test_snapshot_contains_no_pickle_and_truncations_raise_codec_error() -> None:
    blob = _client().snapshot()
    assert blob.startswith(b"PAGS\x01") and b"pickle" not in blob and not blob.startswith(b"\x80")
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            SecAggClient.restore(blob[:cut], session=SESSION, round=3, state="new")
    with pytest.raises(CodecError, match="trailing"):
        SecAggClient.restore(blob + b"\x00", session=SESSION, round=3, state="new")
    for i in range(len(blob)):  # every byte flipped: a clean error or a well-formed client, nothing else
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        with contextlib.suppress(CodecError, ProtocolError):
            SecAggClient.restore(bytes(bad), session=SESSION, round=3, state="new")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), flip=st.integers(0, 10_000))
def test_malformed_snapshots_raise_only_codec_or_protocol_errors(data: bytes, flip: int) -> None:
    blob = bytearray(_client().snapshot())
    blob[flip % len(blob)] ^= 1 << (flip % 8)
    for candidate in (bytes(data), b"PAGS\x01" + data, bytes(blob)):
        with contextlib.suppress(CodecError, ProtocolError):
            SecAggClient.restore(candidate, session=SESSION, round=3, state="new")
