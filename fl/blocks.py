"""Block-wise client updates: a long vector read one block at a time, so encoding never copies it whole.

A language-model adapter update can have d = 1e8 values. Encoding it layer by layer on whole arrays
(clip -> a float64 copy, noise -> another, quantize -> a scaled copy, a uint64 copy...) costs several
times d x 8 bytes per client. :class:`Blocks` is the update as a reader of ``[start, stop)`` blocks; a
layer that can work block by block (:class:`BlockLayer`: ``Clip``, ``GaussianNoise``, ``Quantize``) maps
one reader to the next, and :meth:`Blocks.collect` fills the one output array (ring words: uint32 when
the ring fits) in order. Peak extra memory: the output plus O(block) temporaries.

Randomness: a layer that draws randomness (noise, stochastic rounding) does so when a block is read, so
such a reader is read once, in order (``replayable=False``). For a vector of one block the draws are
exactly those of the whole-array ``encode`` (the same calls in the same order); for longer vectors each
layer's draws come block by block from the same CSPRNG stream, interleaved across layers -- the same
distribution (every draw is fresh), not the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fl.spec import RandomSource, ValueSpec
from secagg.ring import BLOCK

__all__ = ["BLOCK", "BlockLayer", "Blocks"]


@dataclass(frozen=True, slots=True)
class Blocks:
    """``size`` values, ``read(start, stop)`` giving block ``[start, stop)`` as a fresh or read-only array.

    ``replayable``: reading a block twice gives the same values (no randomness drawn on read); layers
    that need a pass over the whole vector first (``Clip``'s norm) need it. ``block``: the block length.
    """

    size: int
    read: Callable[[int, int], NDArray[Any]]
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.float64))
    replayable: bool = True
    block: int = BLOCK

    def __post_init__(self) -> None:
        if self.size < 0 or self.block < 1:
            raise ValueError(f"Blocks needs size >= 0 and block >= 1, got size={self.size}, block={self.block}")

    @classmethod
    def of(cls, x: NDArray[Any], *, block: int = BLOCK) -> Blocks:
        """The blocks of an existing 1-D array (views into it; nothing is copied)."""
        arr = np.asarray(x)
        if arr.ndim != 1:
            raise ValueError(f"Blocks.of needs a 1-D array, got shape {arr.shape}: ravel it first")
        return cls(arr.size, lambda start, stop: arr[start:stop], arr.dtype, True, block)

    def spans(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of every block, in order."""
        for start in range(0, self.size, self.block):
            yield start, min(self.size, start + self.block)

    def __iter__(self) -> Iterator[NDArray[Any]]:
        for start, stop in self.spans():
            yield self.read(start, stop)

    def map(
        self, fn: Callable[[NDArray[Any]], NDArray[Any]], *, dtype: Any = None, replayable: bool | None = None
    ) -> Blocks:
        """A reader applying ``fn`` to each block (``replayable=False`` if ``fn`` draws randomness)."""
        read = self.read

        def mapped(start: int, stop: int) -> NDArray[Any]:
            return fn(read(start, stop))

        keep = self.replayable if replayable is None else replayable and self.replayable
        return replace(self, read=mapped, dtype=np.dtype(self.dtype if dtype is None else dtype), replayable=keep)

    def collect(self) -> NDArray[Any]:
        """Every block, in order, into one new array of ``dtype`` (the only O(d) allocation)."""
        out = np.empty(self.size, dtype=self.dtype)
        for start, stop in self.spans():
            out[start:stop] = self.read(start, stop)
        return out

    def replayable_form(self) -> Blocks:
        """``self`` if its blocks can be read twice, else its values materialized once."""
        return self if self.replayable else Blocks.of(self.collect(), block=self.block)

    def all_finite(self) -> bool:
        """Whether no value is NaN or Inf (one pass; needs a replayable reader to be of any use after)."""
        return all(bool(np.all(np.isfinite(b))) for b in self)

    def l2_norm(self) -> float:
        """The L2 norm, ``sqrt`` of the sum of the blocks' dot products (one block: ``np.linalg.norm``'s)."""
        total = 0.0
        for b in self:
            v = np.asarray(b, dtype=np.float64)
            total += float(v.dot(v))
        return math.sqrt(total)


@runtime_checkable
class BlockLayer(Protocol):
    """A layer whose client half can run block by block (besides its whole-array ``encode``)."""

    def encode_blocks(self, x: Blocks, spec: ValueSpec, rng: RandomSource) -> Blocks:
        """The encoded update as a reader; must equal ``encode`` on a vector of one block, bit for bit."""
        ...
