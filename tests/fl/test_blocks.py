"""Block-wise encoding (issue 12, item 6): the same words as the whole-array encode, O(d) memory, exact noise.

The whole-array path (each layer's ``encode`` in turn) is the reference: on a vector of one block the
block-wise pipeline must give the same ring words bit for bit for the same seeded randomness; with a
stream-consistent CSPRNG, stochastic rounding stays bit-identical over many blocks too. Noise drawn
block-wise keeps its distribution (fresh draws in every block), and a client's peak extra memory for one
update stays within 3 x d x 4 bytes (it was several times d x 8: float64 copies at every layer).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from scipy import stats

from dp.rng import SecureRandom
from fl.blocks import Blocks
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.pipeline import Pipeline
from fl.spec import CompositionError, Layer, RandomSource, RoundInfo, ValueSpec
from fl.sums.secagg import SecAggPlus
from fl.training.client import Worker
from secagg.ring import Quantizer, ring_dtype, to_signed

ALMOST_ONE = 1.0 - 2.0**-53


def reference_encode(layers: Sequence[Layer], specs: Sequence[ValueSpec], x: NDArray[Any], rng: RandomSource) -> Any:
    """The whole-array path: every layer's own ``encode`` on the whole vector, in order."""
    out: Any = np.asarray(x, dtype=np.float64)
    for layer, spec in zip(layers, specs, strict=False):
        out = layer.encode(out, spec, rng)
    return out


PIPELINES: dict[str, list[Layer]] = {
    "clip-quantize": [Clip(l2=1.0), Quantize(bits=16)],
    "clip-noise-quantize": [Clip(l2=1.0), GaussianNoise(multiplier=1.0, placement="clients"), Quantize(bits=20)],
    "clip-discrete-noise-quantize": [
        Clip(l2=1.0), GaussianNoise(multiplier=0.8, placement="clients", discrete=True), Quantize(bits=20)],
    "clip-central-noise-quantize": [Clip(l2=2.0), GaussianNoise(multiplier=1.0), Quantize(bits=16)],
    "clip-only": [Clip(l2=1.0)],
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("scale", [0.01, 3.0])  # clip inactive / active
def test_blockwise_encode_equals_whole_array_encode_bit_for_bit(name: str, scale: float) -> None:
    layers = PIPELINES[name]
    bound = Pipeline(layers, sum=SecAggPlus() if name != "clip-only" else None).bind(ValueSpec(size=5000, cohort=5))
    assert bound.streams
    x = np.random.default_rng(7).standard_normal(5000) * scale
    got = bound.encode(x, SecureRandom.for_testing("blocks"))
    want = reference_encode(layers, bound.specs, x, SecureRandom.for_testing("blocks"))
    if bound.sum_spec.domain == "ring":
        assert got.dtype == ring_dtype(bound.sum_spec.modulus or 0) == np.uint32  # half of uint64's memory
        np.testing.assert_array_equal(got.astype(np.uint64), want)
    else:
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)


def test_blocks_input_equals_array_input_and_client_delta_is_unchanged() -> None:
    """The client's block reader gives exactly ``delta * weight`` of the whole-array code."""
    torch.manual_seed(0)
    worker = Worker(torch.nn.Linear(30, 40))
    params = np.random.default_rng(1).standard_normal(worker.size)
    blocks = worker.delta_blocks(params, 0.37)
    np.testing.assert_array_equal(blocks.collect(), worker.delta(params) * 0.37)
    bound = Pipeline([Clip(l2=1.0), Quantize(bits=16)]).bind(ValueSpec(size=worker.size, cohort=3))
    a = bound.encode(blocks, SecureRandom.for_testing(3))
    b = bound.encode(worker.delta(params) * 0.37, SecureRandom.for_testing(3))
    np.testing.assert_array_equal(a, b)
    x32 = (worker.delta(params) * 0.37).astype(np.float32)  # a float32 array is widened block by block
    np.testing.assert_array_equal(bound.encode(x32, SecureRandom.for_testing(4)),
                                  bound.encode(x32.astype(np.float64), SecureRandom.for_testing(4)))


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_stochastic_rounding_is_bit_identical_over_many_blocks(block: int) -> None:
    """``uniform`` is called once per block; SecureRandom's stream makes that the same numbers."""
    q = Quantizer(bound=1.0, value_bits=16, cohort=8)
    x = np.random.default_rng(2).uniform(-1, 1, 4321)
    whole = q.encode(x, SecureRandom.for_testing("q").uniform)
    out = np.empty(x.size, dtype=ring_dtype(q.modulus))
    q.encode_into(x, SecureRandom.for_testing("q").uniform, out, block=block)
    np.testing.assert_array_equal(out.astype(np.uint64), whole)
    # the pipeline with small blocks (clip inactive: no norm rounding) gives the same words as well
    bound = Pipeline([Clip(l2=1e6), Quantize(bits=16, bound=1.0)]).bind(ValueSpec(size=x.size, cohort=8))
    got = bound.encode(Blocks.of(x, block=block), SecureRandom.for_testing("q"))
    np.testing.assert_array_equal(got.astype(np.uint64), whole)


def test_blockwise_clamping_stays_in_integer_space() -> None:
    """x = +-bound with u -> 1 rounds one step past the top in floats; the words never wrap."""
    q = Quantizer(bound=0.7, value_bits=8, cohort=4)
    x = np.tile([0.7, -0.7, float(np.nextafter(0.7, 0.0))], 1000)
    out = np.empty(x.size, dtype=ring_dtype(q.modulus))
    q.encode_into(x, lambda n: np.full(n, ALMOST_ONE), out, block=64)
    signed = to_signed(out.astype(np.uint64), q.ring_bits)
    top = (1 << 7) - 1
    assert signed.max() == top and signed.min() == -top + 1  # -0.7 * scale + u -> floor gives -top + 1
    assert np.all(np.abs(signed) <= top)


def test_encode_into_refuses_words_too_narrow_for_the_ring() -> None:
    q = Quantizer(bound=1.0, value_bits=40, cohort=4)
    with pytest.raises(ValueError, match="ring_dtype"):
        q.encode_into(np.zeros(3), SecureRandom.for_testing(0).uniform, np.empty(3, dtype=np.uint32))
    assert ring_dtype(q.modulus) == np.uint64


@pytest.mark.parametrize("discrete", [False, True])
def test_blockwise_noise_keeps_its_distribution(discrete: bool) -> None:
    """Noise drawn block by block: N(0, sigma^2 / shares) per coordinate, fresh in every block."""
    d, block = 40_000, 1000
    layer = GaussianNoise(multiplier=2.0, placement="clients", shares=4, discrete=discrete, granularity=1e-3)
    bound = Pipeline([Clip(l2=1.0), layer]).bind(ValueSpec(size=d, cohort=4))
    out = bound.encode(Blocks.of(np.zeros(d), block=block), SecureRandom.for_testing(f"noise-{discrete}"))
    std = 2.0 * 1.0 / 2.0  # sigma / sqrt(shares)
    assert stats.kstest(out / std, "norm").pvalue > 1e-3
    assert abs(out.std() / std - 1) < 0.02 and abs(out.mean()) < 4 * std / np.sqrt(d)
    blocks = out.reshape(-1, block)
    assert len({b.tobytes() for b in blocks}) == d // block  # no block repeats another's draws
    if discrete:
        np.testing.assert_allclose(out / 1e-3, np.round(out / 1e-3), atol=1e-6)  # on the grid


def test_clip_of_a_nonfinite_block_stream_is_refused() -> None:
    x = np.ones(10)
    x[7] = np.nan
    bound = Pipeline([Clip(l2=1.0), Quantize(bits=16)]).bind(ValueSpec(size=10, cohort=2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bound.encode(Blocks.of(x, block=3), SecureRandom.for_testing(0))


class Halve:
    """A user's layer with only a whole-array ``encode``: the pipeline falls back to it."""

    name = "halve"

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "real":
            raise CompositionError("Halve works on reals")
        return spec.with_(l2_bound=None if spec.l2_bound is None else spec.l2_bound / 2)

    def encode(self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource) -> NDArray[Any]:
        return np.asarray(x) / 2

    def decode(self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource) -> NDArray[Any]:
        return np.asarray(total) * 2

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[()]:
        return ()


def test_a_layer_without_encode_blocks_runs_whole_array_on_blocks_input() -> None:
    layers: list[Any] = [Clip(l2=1.0), Halve(), Quantize(bits=16)]
    bound = Pipeline(layers).bind(ValueSpec(size=300, cohort=3))
    assert not bound.streams
    x = np.random.default_rng(4).standard_normal(300)
    got = bound.encode(Blocks.of(x, block=16), SecureRandom.for_testing(5))
    want = reference_encode(layers, bound.specs, x, SecureRandom.for_testing(5))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("source", ["client blocks", "float32 array"])
def test_blockwise_encode_peak_memory_is_within_3_d_4_bytes(source: str) -> None:
    """The adversary here is the memory bound: one client's encode (clip, noise, quantize) of d values
    must not copy the update whole in float64 (the whole-array path peaked at 3.3 x (3 d 4 bytes))."""
    torch.manual_seed(0)
    worker = Worker(torch.nn.Linear(1000, 3000))
    d = worker.size
    params = np.zeros(d)
    layers: list[Layer] = [Clip(l2=1.0), GaussianNoise(multiplier=1.0, placement="clients"), Quantize(bits=16)]
    bound = Pipeline(layers, sum=SecAggPlus()).bind(ValueSpec(size=d, cohort=5))
    rng = SecureRandom.for_testing(0)
    x32 = worker.flat.numpy()  # the trained model's own float32 buffer (no copy)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = bound.encode(worker.delta_blocks(params, 0.5) if source == "client blocks" else x32, rng)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out.nbytes == 4 * d  # the encoded update: uint32 words
    assert peak <= 3 * d * 4, f"peak {peak / (12 * d):.2f} x (3 d 4 bytes)"


@pytest.mark.slow
def test_fl_train_of_a_1e7_update_through_secagg_plus_is_exact_within_3_d_4_bytes_per_client() -> None:
    """A real fl.train round (nn.Linear of 1e7 parameters, clip + SecAgg+, 5 sites) in a child process:
    the sum and the model step are exact and every client's peak extra memory for its update (encode;
    held encoding + masking, by tracemalloc) is within 3 x d x 4 bytes (the d = 1e8 row is the benchmark's)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "large_update.py"
    spec = importlib.util.spec_from_file_location("large_update", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.run_train(10_000_000, 5)
    assert row["d"] == 10_000_000 and row["included"] == [0, 1, 2, 3, 4]
    assert row["checks"] == {"sum": True, "mean": True}
    assert len(row["client_peak"]) == 5
    for peak in [*row["client_peak"].values(), *row["client_peak_rss"].values()]:  # tracemalloc and RSS
        assert peak <= 3 * row["d"] * 4


def test_a_subclass_overriding_only_encode_runs_its_own_encode() -> None:
    """The planted "declares the bound, never clips" layer must not be silently replaced by Clip's block path."""
    import numpy as np

    from dp.rng import SecureRandom
    from fl.layers.clip import Clip
    from fl.pipeline import Pipeline
    from fl.spec import ValueSpec

    class NoClip(Clip):
        def encode(self, x, spec, rng):  # type: ignore[no-untyped-def]
            return x

    bound = Pipeline([NoClip(l2=1.0)]).bind(ValueSpec(size=4, cohort=3))
    assert not bound.streams
    out = bound.encode(np.full(4, 10.0), SecureRandom.for_testing("noclip"))
    assert np.allclose(out, 10.0)  # not clipped: its own encode ran
    assert Pipeline([Clip(l2=1.0)]).bind(ValueSpec(size=4, cohort=3)).streams
