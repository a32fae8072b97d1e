"""A tiny hand-driven round for adversary tests: real machines, every message visible and replaceable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from secagg._hazmat import kex, prg
from secagg.machine import Message
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.server import SecAggServer

SESSION = b"adversary-session"
MOD = 1 << 24
Tamper = Callable[[Message], Message | None]


def keys(n: int) -> tuple[dict[int, IdentityKeys], dict[int, bytes]]:
    ids = {c: IdentityKeys.generate() for c in range(n)}
    return ids, {c: k.public for c, k in ids.items()}


def values(n: int, d: int, seed: int = 0) -> dict[int, NDArray[np.uint64]]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 1 << 16, d, dtype=np.uint64) for c in range(n)}


def clients(
    vals: Mapping[int, NDArray[np.uint64]],
    *,
    t: float | int,
    min_cohort: int,
    auth: bool,
    graph: GraphSpec | None = None,
    ids: Mapping[int, IdentityKeys] | None = None,
    pubs: Mapping[int, bytes] | None = None,
) -> dict[int, SecAggClient]:
    d = len(next(iter(vals.values())))
    return {
        c: SecAggClient(
            c, v, session=SESSION, round=1, modulus=MOD, size=d, threshold=t, min_cohort=min_cohort, graph=graph,
            identity_key=ids[c].private if auth and ids else None, identities=pubs if auth else None,
        )
        for c, v in vals.items()
    }


def server(n: int, d: int, *, t: float | int, pubs: Mapping[int, bytes] | None, graph: GraphSpec | None = None,
           cids: list[int] | None = None) -> SecAggServer:
    return SecAggServer(cids if cids is not None else list(range(n)), session=SESSION, round=1, modulus=MOD, size=d,
                        threshold=t, graph=graph, identities=pubs)


def drive(
    srv: Any, cls: Mapping[int, Any], *, up: Tamper | None = None, down: Tamper | None = None
) -> NDArray[np.uint64]:
    """Run the round to its end; ``up``/``down`` may alter or drop (None) client->server / server->client messages."""
    to_server: list[Message] = [m for c in sorted(cls) for m in cls[c].start()]
    while not srv.done:
        for m in to_server:
            m2 = up(m) if up else m
            if m2 is not None:
                srv.receive(m2)
        to_server = []
        for m in srv.end_phase():
            m2 = down(m) if down else m
            if m2 is not None and m2.recipient in cls:
                to_server += cls[m2.recipient].receive(m2)
    assert srv.result is not None
    return np.asarray(srv.result, dtype=np.uint64)


def unmask(y: NDArray[Any], b: bytes, s_sk: bytes, me: int, s_pks: Mapping[int, bytes], label: bytes,
           context: Callable[[int, int], bytes]) -> NDArray[np.uint64]:
    """An attacker's view: strip the self-mask and every pairwise mask from one masked input."""
    acc = np.array(y, copy=True)
    exp = prg.MaskExpander(acc.size, acc.dtype)
    exp.add(acc, b, -1)
    sk = kex.private_from_bytes(s_sk)
    for v, pk in s_pks.items():
        if v != me:
            seed = kex.agree(sk, pk, label=label, context=context(me, v))
            exp.add(acc, seed, -1 if me < v else +1)
    return acc.astype(np.uint64) & np.uint64(MOD - 1)
