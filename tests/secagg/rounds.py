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

from secagg.machine import KEY_HOLDER, ClientMachine, Message, ServerMachine
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec
from secagg.masking.server import SecAggServer
from secagg.memory import DropoutSchedule, Shuffler, SumOutcome, run_in_memory
from secagg.paillier import (
    PackingPlan,
    PaillierClient,
    PaillierKeyHolder,
    PaillierPrivateKey,
    PaillierPublicKey,
    PaillierServer,
    generate_keypair,
)
from secagg.ring import ring_bits_for


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


@dataclass
class Paillier:
    """One Paillier configuration (what ``fl.sums.paillier.PaillierSum`` builds from a bound spec).

    ``key_holder``: ``"separate"`` (a key holder at ``KEY_HOLDER``) or ``"clients"`` (shared key, the
    lowest surviving client decrypts). The ring is sized for ``cohort`` ``value_bits``-bit values.
    """

    size: int
    cohort: int
    value_bits: int = 16
    key_holder: str = "separate"
    min_clients: int = 2
    keys: tuple[PaillierPublicKey, PaillierPrivateKey] = field(default_factory=lambda: _keypair(1024))

    @property
    def modulus(self) -> int:
        return 1 << ring_bits_for(self.value_bits, self.cohort)

    @property
    def plan(self) -> PackingPlan:
        return PackingPlan(self.keys[0].bits, self.value_bits, self.cohort)

    def machines(self, values: Mapping[int, NDArray[Any]], *, session: bytes,
                 round: int = 0) -> tuple[ServerMachine, dict[int, ClientMachine]]:
        public, private = self.keys
        shared = self.key_holder == "clients"
        server = PaillierServer(sorted(values), self.size, session, round, public, self.plan,
                                min_clients=self.min_clients, decryptor=None if shared else KEY_HOLDER,
                                modulus=self.modulus, workers=1)
        parties: dict[int, ClientMachine] = {
            c: PaillierClient(c, v, session, round, public, self.plan, workers=1, modulus=self.modulus,
                              private=private if shared else None, min_summands=self.min_clients)
            for c, v in values.items()
        }
        if not shared:
            parties[KEY_HOLDER] = PaillierKeyHolder(KEY_HOLDER, private, session, round, workers=1,
                                                    min_summands=self.min_clients)
        return server, parties

    def run(self, values: Mapping[int, NDArray[Any]], *, session: bytes, dropouts: DropoutSchedule | None = None,
            reorder: Shuffler | None = None) -> SumOutcome:
        server, parties = self.machines(values, session=session)
        return run_in_memory(server, parties, dropouts=dropouts, reorder=reorder)


_KEYS: dict[int, tuple[PaillierPublicKey, PaillierPrivateKey]] = {}


def _keypair(bits: int) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """One key pair per size for the whole test session (generation takes a while)."""
    if bits not in _KEYS:
        _KEYS[bits] = generate_keypair(bits=bits)
    return _KEYS[bits]
