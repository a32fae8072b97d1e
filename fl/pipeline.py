"""A pipeline: privacy layers applied by each client, then one secure sum, undone by the server.

``Pipeline([Clip(l2=1.0), Quantize(bits=20)], sum=SecAggPlus(threshold=0.7))`` -- list order is client
order; the server decodes the sum in reverse order. :meth:`Pipeline.bind` checks the composition before
any data flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.spec import CompositionError, Guarantee, Layer, RandomSource, RoundInfo, SecureSum, ValueSpec
from fl.sums.plain import PlainSum

__all__ = ["BoundPipeline", "Pipeline"]


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

    def encode(self, x: NDArray[Any], rng: RandomSource) -> NDArray[Any]:
        """Client half: run every layer's ``encode`` in order on one update."""
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.shape != (self.specs[0].size,):
            raise CompositionError(f"update has {x.size} values, the pipeline was bound for {self.specs[0].size}")
        for layer, spec in zip(self.pipeline.layers, self.specs, strict=False):
            x = layer.encode(x, spec, rng)
        return x

    def decode(self, total: NDArray[Any], info: RoundInfo, rng: RandomSource) -> NDArray[np.float64]:
        """Server half: undo the layers in reverse order on the sum of the included clients."""
        for layer, spec in zip(reversed(self.pipeline.layers), reversed(self.specs[:-1]), strict=True):
            total = layer.decode(total, spec, info, rng)
        return np.asarray(total, dtype=np.float64)

    def guarantees(self, info: RoundInfo) -> tuple[Guarantee, ...]:
        out: list[Guarantee] = []
        for layer, spec in zip(self.pipeline.layers, self.specs, strict=False):
            out += layer.guarantees(spec, info)
        out += self.pipeline.sum.guarantees(self.sum_spec, info)
        return tuple(out)
