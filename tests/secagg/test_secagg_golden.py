"""Golden transcript of a small SecAgg+ round with fixed test-seam randomness.

Any change to the protocol -- message layout, KDF labels, PRG, share encoding, the graph -- changes the
digests below and is noticed. Regenerate deliberately with ``PRIVAGG_REGEN_GOLDEN=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dp.rng import SecureRandom
from secagg import wire
from secagg.machine import Message
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.server import SecAggServer

GOLDEN = Path(__file__).resolve().parents[1] / "vectors" / "secagg_golden_transcript.json"


def _transcript(auth: bool) -> dict[str, Any]:
    n, d, mod = 6, 8, 1 << 20
    session = b"golden-session"
    graph = GraphSpec(complete=False, neighbours=4)
    ids = {c: IdentityKeys.generate(SecureRandom.for_testing(f"id-{c}").bytes) for c in range(n)} if auth else None
    pubs = {c: k.public for c, k in ids.items()} if ids else None
    clients = {
        c: SecAggClient(
            c,
            np.arange(d, dtype=np.uint64) + 100 * c,
            session=session,
            round=7,
            modulus=mod,
            size=d,
            threshold=3,
            min_cohort=n,
            graph=graph,
            identity_key=ids[c].private if ids else None,
            identities=pubs,
            random_bytes=SecureRandom.for_testing(f"golden-{c}").bytes,
        )
        for c in range(n)
    }
    server = SecAggServer(
        list(range(n)), session=session, round=7, modulus=mod, size=d, threshold=3, graph=graph, identities=pubs
    )
    drop_at = {5: "masked"}  # client 5 shares its keys, then drops before sending its masked input
    log: list[list[Any]] = []

    def record(m: Message) -> None:
        raw = wire.dumps(m)
        log.append([type(m).__name__, m.sender, m.recipient, len(raw), hashlib.sha256(raw).hexdigest()[:16]])

    to_server = [m for c in sorted(clients) for m in clients[c].start()]
    while not server.done:
        for m in to_server:
            if drop_at.get(m.sender) == server.phase:
                continue
            record(m)
            server.receive(m)
        to_server = []
        for m in server.end_phase():
            record(m)
            if drop_at.get(m.recipient) is not None and server.phases.index(
                drop_at[m.recipient]
            ) <= server.phases.index(server.phase):
                continue
            to_server += clients[m.recipient].receive(m)
    assert server.result is not None
    return {"included": list(server.included), "result": [int(x) for x in server.result], "messages": log}


def test_golden_transcript() -> None:
    got: dict[str, Any] = {
        "wire_version": wire.VERSION,
        "unauthenticated": _transcript(False),
        "authenticated": _transcript(True),
    }
    if os.environ.get("PRIVAGG_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert want["wire_version"] == wire.VERSION, "the wire version changed: regenerate the vectors deliberately"
    for mode in ("unauthenticated", "authenticated"):
        assert got[mode]["included"] == [0, 1, 2, 3, 4]
        expected_sum = [sum(i + 100 * c for c in range(5)) for i in range(8)]
        assert got[mode]["result"] == expected_sum
        assert [m[:4] for m in got[mode]["messages"]] == [m[:4] for m in want[mode]["messages"]], (
            "message types/lengths changed"
        )
        assert got[mode]["messages"] == want[mode]["messages"], "message contents changed (labels, PRG, encoding?)"
