"""The contract every privacy layer and secure sum plugs into.

A :class:`Pipeline <fl.pipeline.Pipeline>` is a list of :class:`Layer` objects followed by one
:class:`SecureSum`. Before any data flows, each stage ``bind``\\ s the :class:`ValueSpec` it receives and
returns the spec it produces, raising :class:`CompositionError` (naming the fix) when the order is wrong.
Clients run ``encode`` in list order; the server runs ``decode`` on the sum in reverse order.

A layer that needs memory across rounds (adaptive clipping) is a :class:`StatefulLayer`, shaped like
TensorFlow Federated's aggregation processes: ``initialize()`` gives its first state, ``encode`` and
``decode`` receive the round's state, and ``next_state`` computes the next one from what the server
decoded. State is explicit JSON-ready data (checkpoints, the report), never hidden mutation; layers
without these methods are stateless and keep working unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fl.errors import CompositionError
from secagg.machine import ClientMachine, ServerMachine

__all__ = [
    "ClientTrainer",
    "CompositionError",
    "Guarantee",
    "Layer",
    "PrivacyAccounting",
    "RandomSource",
    "RoundInfo",
    "SecureSum",
    "StatefulLayer",
    "TrainResult",
    "ValueSpec",
]

Domain = Literal["real", "ring"]


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """What flows between two stages of a pipeline.

    ``size``: vector length. ``cohort``: most clients that can be summed in one round (sizes rings).
    ``domain``: ``"real"`` float64 vectors, or ``"ring"`` words in Z_modulus (uint32 when the modulus is at
    most 2^32, else uint64).
    ``l2_bound``: every client vector's L2 norm is at most this (set by ``Clip``).
    ``linf_bound``: every coordinate's magnitude is at most this.
    ``modulus``: ring size (a power of two) when ``domain == "ring"``.
    ``noise_std``: std of the Gaussian noise already on each client's value (distributed DP), if any.
    ``value_bits``: in the ring domain, each client's value is a signed integer of this many bits
    (``|v| < 2^(value_bits-1)``) embedded in Z_modulus; lets a sum pack values tightly (Paillier).
    """

    size: int
    cohort: int
    domain: Domain = "real"
    l2_bound: float | None = None
    linf_bound: float | None = None
    modulus: int | None = None
    noise_std: float = 0.0
    value_bits: int | None = None

    def with_(self, **changes: Any) -> ValueSpec:
        return replace(self, **changes)

    @property
    def coord_bound(self) -> float | None:
        """The tightest known bound on one coordinate's magnitude."""
        bounds = [b for b in (self.l2_bound, self.linf_bound) if b is not None]
        return min(bounds) if bounds else None


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """Public facts about one round, handed to the server half of each layer and to accountants.

    ``planned``: clients sampled for the round. ``included``: clients whose inputs are in the sum
    (the survivors). ``population``: all clients of the federation. ``sample_rate``: the Poisson rate q, or
    ``planned / population`` for a fixed cohort (``sampling`` says which).
    """

    round: int
    planned: tuple[int, ...]
    included: tuple[int, ...]
    population: int
    sample_rate: float
    sampling: Literal["poisson", "fixed"] = "fixed"
    num_samples: Mapping[int, int] = field(default_factory=dict)

    @property
    def n_included(self) -> int:
        return len(self.included)


@dataclass(frozen=True, slots=True)
class Guarantee:
    """One privacy claim, as data: what holds, against whom, under which assumptions."""

    layer: str
    property: str
    against: str
    assumptions: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "property": self.property,
            "against": self.against,
            "assumptions": list(self.assumptions),
            "params": dict(self.params),
        }


@runtime_checkable
class RandomSource(Protocol):
    """Where layers draw randomness: a CSPRNG in production (:class:`dp.rng.SecureRandom`)."""

    def uniform(self, n: int) -> NDArray[np.float64]: ...

    def normal(self, n: int, std: float = 1.0) -> NDArray[np.float64]: ...

    def bytes(self, n: int) -> bytes: ...


class Layer(Protocol):
    """A privacy layer: one immutable object owning its client half and its server half."""

    @property
    def name(self) -> str: ...

    def bind(self, spec: ValueSpec) -> ValueSpec:
        """Validate the incoming spec and return the outgoing one; ``CompositionError`` if it cannot work."""
        ...

    def encode(self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource) -> NDArray[Any]:
        """Client half, on one update. ``spec`` is the spec this layer was bound with."""
        ...

    def decode(self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource) -> NDArray[Any]:
        """Server half, on the sum of the included clients' encoded values."""
        ...

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]: ...


@runtime_checkable
class StatefulLayer(Layer, Protocol):
    """A layer with state across rounds; the state is public JSON-ready data (the server releases it).

    The driver (``BoundPipeline``) calls ``initialize()`` once, passes the round's state to every client's
    ``encode`` and to the server's ``decode``, then ``next_state(state, total, ...)`` with the value this
    layer's ``decode`` received, and uses the result in the next round. ``measurements`` are the public
    per-round numbers for the round line and the report.
    """

    def initialize(self) -> dict[str, Any]: ...

    def encode(
        self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource, state: Mapping[str, Any] | None = None
    ) -> NDArray[Any]: ...

    def decode(
        self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource,
        state: Mapping[str, Any] | None = None,
    ) -> NDArray[Any]: ...

    def next_state(
        self, state: Mapping[str, Any], total: NDArray[Any], spec: ValueSpec, info: RoundInfo
    ) -> dict[str, Any]: ...

    def measurements(self, state: Mapping[str, Any]) -> dict[str, float]: ...


class SecureSum(Protocol):
    """The multi-message step that ends a pipeline: sums the clients' values, revealing only the sum."""

    @property
    def name(self) -> str: ...

    def bind(self, spec: ValueSpec) -> ValueSpec:
        """Check the input spec (e.g. a ring domain for masking) and return the spec of the sum."""
        ...

    def client(
        self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int
    ) -> ClientMachine: ...

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine: ...

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        """Extra roles that take part in the round (e.g. a Paillier key holder); usually empty."""
        ...

    def min_included(self, spec: ValueSpec) -> int:
        """The fewest included clients a round over ``spec.cohort`` planned may be summed with."""
        ...

    @property
    def hides_updates(self) -> bool:
        """Whether the server learns only the sum (a secure sum) or every client's value (a plain sum)."""
        ...

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]: ...


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a client's local training reports back (public metadata, not the update)."""

    num_samples: int
    steps: int
    loss: float
    extra: Mapping[str, Any] = field(default_factory=dict)


class ClientTrainer(Protocol):
    """Local training on one client: plain SGD, or DP-SGD (``fl.training.dp_sgd``)."""

    def train(
        self,
        model: Any,
        features: Any,
        labels: Any,
        *,
        cid: int,
        round: int,
        seed: int,
    ) -> TrainResult:
        """Train ``model`` (a ``torch.nn.Module``) in place on one client's tensors."""
        ...


class PrivacyAccounting(Protocol):
    """Tracks the privacy spent across rounds (implemented in ``fl.privacy.accounting``).

    The loop asks :meth:`can_run` before each round and stops, with a clear message, if the next round
    would exceed the budget; :meth:`record` returns the per-round figures (``epsilon``, ``delta``, ...)
    that go into the round's report line; :meth:`report` is the JSON report's ``privacy`` section, which
    lists per observer the composed ``dp_accounting`` event as data, so anyone can recompute epsilon.
    """

    def can_run(self, info: RoundInfo) -> tuple[bool, str]: ...

    def record(self, info: RoundInfo, trainer_results: Mapping[int, TrainResult]) -> dict[str, Any]: ...

    def report(self) -> dict[str, Any]: ...

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta) spent so far: the largest epsilon over observers (and clients)."""
        ...

    def guarantees(self) -> tuple[Guarantee, ...]:
        """Claims derived from the composed events, one per privacy unit and observer."""
        ...

    def state(self) -> dict[str, Any]:
        """The composed event lists as JSON-ready data (checkpoints; no pickled objects)."""
        ...

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` wrote (resume)."""
        ...
