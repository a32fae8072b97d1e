"""fl.sums.paillier.PaillierSum: the pipeline sum over the Paillier machines, its keys, bind and guarantee."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import run_secure_sum
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums.paillier import PaillierSum
from fl.sums.plain import PlainSum
from secagg.errors import OverflowRiskError, ProtocolError
from secagg.paillier import PackingPlan

SESSION = b"paillier-test"


@pytest.fixture(scope="module")
def separate() -> PaillierSum:
    return PaillierSum(key_bits=1024, workers=1)


def _ring_inputs(spec: ValueSpec, k: int, seed: int) -> dict[int, np.ndarray]:
    """Signed value_bits-bit integers (including the extremes) as ring elements of Z_modulus."""
    assert spec.value_bits is not None and spec.modulus is not None
    b = (1 << (spec.value_bits - 1)) - 1
    rng = np.random.default_rng(seed)
    out = {}
    for cid in range(k):
        v = rng.integers(-b, b + 1, size=spec.size)
        v[: min(2, spec.size)] = [b, -b][: min(2, spec.size)]
        out[cid] = v.astype(np.int64).view(np.uint64) & np.uint64(spec.modulus - 1)
    return out


def _ring_sum(values: Mapping[int, np.ndarray], cids: Sequence[int], modulus: int) -> np.ndarray:
    total = np.zeros_like(next(iter(values.values())))
    for c in cids:
        total = total + values[c]
    return total & np.uint64(modulus - 1)


def _spec(size: int, cohort: int, bits: int = 16) -> ValueSpec:
    return Pipeline([Clip(l2=1.0), Quantize(bits=bits)]).bind(ValueSpec(size=size, cohort=cohort)).sum_spec


# -- through the runner ---------------------------------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(k=st.integers(2, 6), d=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_ring_sum_equals_plain_sum(separate: PaillierSum, k: int, d: int, seed: int) -> None:
    spec = _spec(d, k)
    assert separate.bind(spec) == spec
    values = _ring_inputs(spec, k, seed)
    out = run_secure_sum(separate, values, spec=spec, session=SESSION)
    plain = run_secure_sum(PlainSum(), values, spec=spec, session=SESSION)
    assert out.total.dtype == np.uint64
    assert np.array_equal(out.total, plain.total)
    assert out.included == tuple(range(k))


@settings(max_examples=5, deadline=None)
@given(k=st.integers(2, 5), d=st.integers(1, 150), bits=st.integers(8, 32), seed=st.integers(0, 2**16))
def test_pipeline_float_sum_within_quantization_bound(
    separate: PaillierSum, k: int, d: int, bits: int, seed: int
) -> None:
    bound = Pipeline([Clip(l2=1.0), Quantize(bits=bits)], sum=separate).bind(ValueSpec(size=d, cohort=k))
    rng = SecureRandom.for_testing(f"paillier-pipeline-{seed}")
    gen = np.random.default_rng(seed)
    xs = {c: gen.normal(size=d) * gen.uniform(0.01, 1.0) for c in range(k)}
    encoded = {c: bound.encode(x, rng) for c, x in xs.items()}
    out = run_secure_sum(bound.pipeline.sum, encoded, spec=bound.sum_spec, session=SESSION)
    info = RoundInfo(round=0, planned=tuple(range(k)), included=out.included, population=k, sample_rate=1.0)
    total = bound.decode(out.total, info, rng)
    clipped = sum(Clip(l2=1.0).encode(x, bound.specs[0], rng) for x in xs.values())
    q = Quantize(bits=bits).quantizer(bound.specs[1])
    assert np.max(np.abs(total - clipped)) <= q.max_error(k)
    names = [g.layer for g in bound.guarantees(info)]
    assert names[-1] == "paillier"


def test_one_key_per_object_and_bind_errors(separate: PaillierSum) -> None:
    spec = _spec(10, 3)
    fp = separate.public_key.fingerprint
    assert separate.client(0, _ring_inputs(spec, 1, 0)[0], spec=spec, session=SESSION, round=3).start()
    assert separate.public_key.fingerprint == fp  # cached: one key for the whole run
    assert separate == PaillierSum(key_bits=1024, workers=1)  # the cached key does not take part in ==
    with pytest.raises(CompositionError, match=r"put Quantize\(bits=...\) before it"):
        separate.bind(ValueSpec(size=10, cohort=3))
    with pytest.raises(CompositionError, match="Quantize"):
        Pipeline([Clip(l2=1.0)], sum=separate).bind(ValueSpec(size=10, cohort=3))
    g = separate.guarantees(spec, RoundInfo(0, (0, 1, 2), (0, 1, 2), 3, 1.0))[0]
    assert "ciphertexts" in g.property and g.params["key_bits"] == 1024
    assert g.params["slots_per_ciphertext"] == PackingPlan(1024, 16, 3).slots
    assert any("collude" in a for a in g.assumptions) and g.params["randomness"] == "fixed-base"


def test_out_of_range_client_value_is_refused_before_encryption(separate: PaillierSum) -> None:
    spec = _spec(4, 2, bits=8)
    assert spec.modulus is not None
    too_big = np.array([0, 0, 0, 128], dtype=np.uint64)  # +128 does not fit signed 8-bit
    with pytest.raises(OverflowRiskError, match="nothing was encrypted"):
        separate.client(0, too_big, spec=spec, session=SESSION, round=0)
    with pytest.raises(OverflowRiskError, match="integers"):
        separate.client(0, np.zeros(4), spec=spec, session=SESSION, round=0)  # floats: quantize first
    not_a_ring_element = np.array([0, 0, 0, spec.modulus], dtype=np.uint64)
    with pytest.raises(OverflowRiskError):
        separate.client(0, not_a_ring_element, spec=spec, session=SESSION, round=0)


def test_pickled_paillier_sum_keeps_only_the_public_key() -> None:
    import copy
    import pickle

    ssum = PaillierSum(key_bits=1024, workers=1)
    spec = _spec(8, 2)
    original = ssum.public_key
    blob = pickle.dumps(ssum)
    _, sk = ssum._keypair()
    assert str(sk.p).encode() not in blob and sk.p.to_bytes((sk.p.bit_length() + 7) // 8, "little") not in blob
    for clone in (pickle.loads(blob), copy.deepcopy(ssum)):
        assert clone.public_key == original
        assert clone.client(0, _ring_inputs(spec, 1, 0)[0], spec=spec, session=SESSION, round=0).start()
        with pytest.raises(ProtocolError, match="only the public key"):
            clone.parties(spec=spec, session=SESSION, round=0)
    assert ssum.parties(spec=spec, session=SESSION, round=0)  # the original still decrypts
