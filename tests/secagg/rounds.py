"""Protocol-level round builders for the secagg tests: machines from protocol parameters, no ``fl``.

:class:`Masked` plays the part ``fl.sums.secagg.SecAgg`` / ``SecAggPlus`` play in a pipeline (the same
defaults: a client pins the cohort it was planned for; authenticated mode keeps one identity key per
client id), but speaks only secagg: a modulus, a threshold and a :class:`GraphSpec`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from secagg.machine import ClientMachine, Message, ServerMachine
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.server import SecAggServer
from secagg.memory import DropoutSchedule, Shuffler, SumOutcome, run_in_memory


def plus(neighbours: int | None = None, *, authenticated: bool = False) -> GraphSpec:
    """The SecAgg+ graph with ``SecAggPlus``'s defaults (40/30 bits, 10 % dropout and corrupt)."""
    return GraphSpec(complete=False, neighbours=neighbours, active=authenticated)


@dataclass
class Masked:
    """One SecAgg / SecAgg+ configuration; ``server``/``clients`` build a round's machines."""

    modulus: int
    size: int
    threshold: float | int | None = 0.7
    graph: GraphSpec = field(default_factory=GraphSpec)
    authenticated: bool = False
    min_cohort: int | None = None
    keys: dict[int, IdentityKeys] = field(default_factory=dict)
    random_bytes: Callable[[int], bytes] = os.urandom

    def _ids(self, cids: Sequence[int]) -> dict[int, bytes] | None:
        if not self.authenticated:
            return None
        for c in cids:
            if c not in self.keys:
                self.keys[c] = IdentityKeys.generate(self.random_bytes)
        return {c: k.public for c, k in self.keys.items()}

    def server(self, cids: Sequence[int], *, session: bytes, round: int = 0) -> SecAggServer:
        return SecAggServer(cids, session=session, round=round, modulus=self.modulus, size=self.size,
                            threshold=self.threshold, graph=self.graph, identities=self._ids(cids))

    def client(self, cid: int, value: NDArray[Any], *, cohort: int, session: bytes, round: int = 0) -> SecAggClient:
        ids = self._ids([cid])
        return SecAggClient(
            cid, value, session=session, round=round, modulus=self.modulus, size=self.size,
            threshold=self.threshold, min_cohort=self.min_cohort or cohort, graph=self.graph,
            identity_key=self.keys[cid].private if ids is not None else None, identities=ids,
        )

    def clients(
        self, values: Mapping[int, NDArray[Any]], *, session: bytes, round: int = 0
    ) -> dict[int, ClientMachine]:
        self._ids(sorted(values))
        return {c: self.client(c, v, cohort=len(values), session=session, round=round) for c, v in values.items()}

    def run(
        self,
        values: Mapping[int, NDArray[Any]],
        *,
        session: bytes,
        round: int = 0,
        dropouts: DropoutSchedule | None = None,
        reorder: Shuffler | None = None,
        watch: Callable[[ServerMachine], ServerMachine] | None = None,
    ) -> SumOutcome:
        """One in-memory round over ``values``; ``watch`` may wrap the server (e.g. to record its inbox)."""
        server: ServerMachine = self.server(sorted(values), session=session, round=round)
        if watch is not None:
            server = watch(server)
        parties = self.clients(values, session=session, round=round)
        return run_in_memory(server, parties, dropouts=dropouts, reorder=reorder)


def recording(seen: list[Message], servers: list[Any]) -> Callable[[ServerMachine], ServerMachine]:
    """A ``watch`` that appends every message the server receives to ``seen`` (and the server to ``servers``)."""

    def watch(srv: ServerMachine) -> ServerMachine:
        servers.append(srv)
        orig = srv.receive

        def receive(msg: Message) -> list[Message]:
            seen.append(msg)
            return orig(msg)

        srv.receive = receive  # type: ignore[method-assign]
        return srv

    return watch
