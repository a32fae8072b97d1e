"""A pipeline: privacy layers applied by each client, then one secure sum, undone by the server.

``Pipeline([Clip(l2=1.0), Quantize(bits=20)], sum=SecAggPlus(threshold=0.7))`` -- list order is client
order; the server decodes the sum in reverse order. :meth:`Pipeline.bind` checks the composition before
any data flows.

Stateful layers (:class:`fl.spec.StatefulLayer`, e.g. adaptive clipping): the pipeline's state is a list
with one entry per layer (``None`` for stateless ones), from :meth:`BoundPipeline.initialize`; pass it
to :meth:`BoundPipeline.encode` and :meth:`BoundPipeline.advance` (decode, then each layer's
``next_state``), and store what ``advance`` returns -- it is JSON-ready, for checkpoints and reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.blocks import BlockLayer, Blocks
from fl.spec import (
    CompositionError,
    Guarantee,
    Layer,
    RandomSource,
    RoundInfo,
    SecureSum,
    StatefulLayer,
    ValueSpec,
)
from fl.sums.plain import PlainSum

__all__ = ["BoundPipeline", "Pipeline", "PipelineState"]

PipelineState = list[dict[str, Any] | None]
"""One entry per layer: its state (JSON-ready dict), or ``None`` for a stateless layer."""


@dataclass(frozen=True)
class Pipeline:
    """Layers (client order) followed by a secure sum (``PlainSum`` if omitted)."""

    layers: tuple[Layer, ...] = ()
    sum: SecureSum = field(default_factory=PlainSum)

    def __init__(self, layers: Sequence[Layer] = (), *, sum: SecureSum | None = None) -> None:
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "sum", sum if sum is not None else PlainSum())

    @property
    def name(self) -> str:
        return ",".join([*(layer.name for layer in self.layers), self.sum.name])

    def bind(self, spec: ValueSpec) -> BoundPipeline:
        """Propagate ``spec`` through every stage; raises ``CompositionError`` naming the fix."""
        if spec.size < 1:
            raise CompositionError("the update has no parameters")
        if spec.cohort < 1:
            raise CompositionError("a round needs at least one client")
        specs = [spec]
        for layer in self.layers:
            specs.append(layer.bind(specs[-1]))
        out = self.sum.bind(specs[-1])
        return BoundPipeline(self, tuple(specs), out)


@dataclass(frozen=True)
class BoundPipeline:
    """A pipeline checked against a concrete :class:`ValueSpec`; ``specs[i]`` is layer i's input."""

    pipeline: Pipeline
    specs: tuple[ValueSpec, ...]
    out_spec: ValueSpec

    @property
    def sum_spec(self) -> ValueSpec:
        """The spec of what each client hands to the secure sum."""
        return self.specs[-1]

    @property
    def stateful(self) -> bool:
        """True when some layer keeps state across rounds (then encode/advance need ``state``)."""
        return any(isinstance(layer, StatefulLayer) for layer in self.pipeline.layers)

    def initialize(self) -> PipelineState:
        """The first round's state: each stateful layer's ``initialize()``, ``None`` for the others."""
        return [layer.initialize() if isinstance(layer, StatefulLayer) else None for layer in self.pipeline.layers]

    def load_state(self, data: Sequence[Any]) -> PipelineState:
        """Validate state read back from a checkpoint (one entry per layer, dicts where stateful)."""
        data = list(data)
        fresh = self.initialize()
        if len(data) != len(fresh) or any((a is None) != (b is None) for a, b in zip(data, fresh, strict=True)):
            raise ValueError(
                f"saved pipeline state {data!r} does not fit the pipeline {self.pipeline.name}; resume with the "
                "same --privacy stages"
            )
        return [None if d is None else dict(d) for d in data]

    def _states(self, state: Sequence[Mapping[str, Any] | None] | None) -> list[Mapping[str, Any] | None]:
        n = len(self.pipeline.layers)
        if state is None:
            if self.stateful:
                raise CompositionError(
                    f"the pipeline {self.pipeline.name} has stateful layers: pass state= (start with "
                    "bound.initialize(), then what bound.advance returns)"
                )
            return [None] * n
        if len(state) != n:
            raise CompositionError(f"the pipeline has {n} layers but the state has {len(state)} entries")
        return list(state)

    @property
    def streams(self) -> bool:
        """True when every layer encodes block by block (:class:`fl.blocks.BlockLayer`, none stateful)."""
        return all(_blockwise(layer) for layer in self.pipeline.layers)

    def encode(
        self, x: NDArray[Any] | Blocks, rng: RandomSource, state: Sequence[Mapping[str, Any] | None] | None = None
    ) -> NDArray[Any]:
        """Client half: run every layer's ``encode`` in order on one update (``state``: this round's).

        ``x``: the update as an array or as :class:`fl.blocks.Blocks` (read block by block, never copied
        whole). When every layer streams (:attr:`streams`), the update is encoded block by block into one
        output array -- ring words in :func:`secagg.ring.ring_dtype` (uint32 when the ring fits) -- so the
        extra memory is that array plus O(block); otherwise each layer's whole-array ``encode`` runs.
        """
        size = x.size if isinstance(x, Blocks) else int(np.size(x))
        if size != self.specs[0].size:
            raise CompositionError(f"update has {size} values, the pipeline was bound for {self.specs[0].size}")
        states = self._states(state)
        if self.streams and self.pipeline.layers:
            src = x if isinstance(x, Blocks) else Blocks.of(np.asarray(x).ravel())  # float32 stays float32 ...
            src = src.map(lambda b: np.asarray(b, dtype=np.float64), dtype=np.float64)  # ... until its block is read
            for layer, spec in zip(self.pipeline.layers, self.specs, strict=False):
                assert isinstance(layer, BlockLayer)
                src = layer.encode_blocks(src, spec, rng)
            return src.collect()
        arr = x.map(lambda b: np.asarray(b, dtype=np.float64), dtype=np.float64).collect() if isinstance(
            x, Blocks) else np.asarray(x, dtype=np.float64).ravel()
        for layer, spec, st in zip(self.pipeline.layers, self.specs, states, strict=False):
            arr = layer.encode(arr, spec, rng, st) if isinstance(layer, StatefulLayer) else layer.encode(arr, spec, rng)
        return arr

    def decode(
        self, total: NDArray[Any], info: RoundInfo, rng: RandomSource,
        state: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> NDArray[np.float64]:
        """Server half: undo the layers in reverse order on the sum of the included clients."""
        return self.advance(total, info, rng, state)[0]

    def advance(
        self, total: NDArray[Any], info: RoundInfo, rng: RandomSource,
        state: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> tuple[NDArray[np.float64], PipelineState]:
        """Decode the sum (as :meth:`decode`) and return it with the next round's state.

        Each stateful layer's ``next_state`` sees exactly the value its ``decode`` received (a function
        of the released sum and public round facts), so the state is post-processing of the release.
        """
        states = self._states(state)
        nxt: PipelineState = [None] * len(states)
        for i in reversed(range(len(self.pipeline.layers))):
            layer, spec, st = self.pipeline.layers[i], self.specs[i], states[i]
            if isinstance(layer, StatefulLayer):
                assert st is not None
                nxt[i] = layer.next_state(st, total, spec, info)
                total = layer.decode(total, spec, info, rng, st)
            else:
                total = layer.decode(total, spec, info, rng)
        return np.asarray(total, dtype=np.float64), nxt

    def measurements(self, state: Sequence[Mapping[str, Any] | None] | None) -> dict[str, float]:
        """The stateful layers' public per-round numbers (e.g. the clip norm and clipped fraction)."""
        out: dict[str, float] = {}
        for layer, st in zip(self.pipeline.layers, self._states(state), strict=True):
            if isinstance(layer, StatefulLayer) and st is not None:
                out.update(layer.measurements(st))
        return out

    def guarantees(self, info: RoundInfo) -> tuple[Guarantee, ...]:
        out: list[Guarantee] = []
        for layer, spec in zip(self.pipeline.layers, self.specs, strict=False):
            out += layer.guarantees(spec, info)
        out += self.pipeline.sum.guarantees(self.sum_spec, info)
        return tuple(out)


def _definer(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO that defines attribute ``name``."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def _blockwise(layer: Any) -> bool:
    """Whether ``layer`` may encode block by block: a stateless :class:`~fl.blocks.BlockLayer` whose
    ``encode_blocks`` is defined at or below its ``encode``. A subclass that overrides only ``encode``
    (e.g. a user's own clipping) must run its own ``encode``, never the inherited block path."""
    if not isinstance(layer, BlockLayer) or isinstance(layer, StatefulLayer):
        return False
    blocks, whole = _definer(type(layer), "encode_blocks"), _definer(type(layer), "encode")
    return blocks is not None and whole is not None and issubclass(blocks, whole)

