"""Secure sums as pipeline stages. ``PlainSum`` is the no-privacy baseline.

``SecAgg``/``SecAggPlus`` live in :mod:`fl.sums.secagg`, ``PaillierSum`` in :mod:`fl.sums.paillier`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from fl.spec import CompositionError, Guarantee, RoundInfo, ValueSpec
from secagg.machine import ClientMachine, ServerMachine
from secagg.masking.graph import threshold_for
from secagg.plain import PlainClient, PlainServer
from secagg.ring import is_power_of_two

__all__ = ["PlainSum", "threshold_count"]


def threshold_count(threshold: float | int, n: int) -> int:
    """A threshold given as a fraction of ``n`` (``0.7``) or an absolute count (``7``) -> count."""
    try:
        return threshold_for(threshold, n)
    except ValueError as exc:
        raise CompositionError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class PlainSum:
    """Clients send their values in the clear; the server adds them. Guarantees nothing.

    ``min_clients``: the round aborts if fewer clients send their value.
    """

    min_clients: int = 1

    @property
    def name(self) -> str:
        return "plain-sum"

    @property
    def hides_updates(self) -> bool:
        """False: the server sees every client's value."""
        return False

    def min_included(self, spec: ValueSpec) -> int:
        """A plain sum protects nobody, so any number of clients will do."""
        return max(1, self.min_clients)

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain == "ring" and (spec.modulus is None or not is_power_of_two(spec.modulus)):
            raise CompositionError("a ring-domain value needs a power-of-two modulus (use Quantize)")
        return spec

    def client(
        self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int
    ) -> ClientMachine:
        return PlainClient(cid, value, session, round)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        modulus = spec.modulus if spec.domain == "ring" else None
        return PlainServer(list(cids), spec.size, session, round, min_clients=self.min_clients, modulus=modulus)

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return {}

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return (
            Guarantee(
                layer=self.name,
                property="none: the server sees every client's update in the clear",
                against="no one",
            ),
        )
