"""The Paillier round as sans-IO machines, and fl.sums.paillier.PaillierSum driven by the in-memory runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import DropoutSchedule, run_secure_sum
from fl.spec import CompositionError, RoundInfo, ValueSpec
from fl.sums.paillier import PaillierSum
from fl.sums.plain import PlainSum
from secagg.errors import AbortError, KeyMismatchError, OverflowRiskError, ProtocolError
from secagg.machine import KEY_HOLDER, SERVER, ClientMachine, Message, ServerMachine
from secagg.paillier import (
    PackingPlan,
    PaillierAggregate,
    PaillierClient,
    PaillierInput,
    PaillierKeyHolder,
    PaillierPrivateKey,
    PaillierServer,
    generate_keypair,
)

SESSION = b"paillier-test"


@pytest.fixture(scope="module")
def separate() -> PaillierSum:
    return PaillierSum(key_bits=1024, workers=1)


@pytest.fixture(scope="module")
def shared() -> PaillierSum:
    return PaillierSum(key_bits=1024, key_holder="clients", workers=1)


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


# -- through the runner ------------------------------------------------------------------------------


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


@pytest.mark.parametrize("mode", ["separate", "clients"])
def test_dropouts_are_excluded_from_the_sum(separate: PaillierSum, shared: PaillierSum, mode: str) -> None:
    ssum = separate if mode == "separate" else shared
    spec = _spec(120, 6)
    values = _ring_inputs(spec, 6, 7)
    # client 0 never sends; client 1 sends its input then drops before the decryption phase
    drops = DropoutSchedule({0: 0, 1: "decrypt", 4: 0})
    out = run_secure_sum(ssum, values, spec=spec, session=SESSION, dropouts=drops, reorder=np.random.default_rng(1))
    assert out.included == (1, 2, 3, 5)
    assert spec.modulus is not None
    assert np.array_equal(out.total, _ring_sum(values, out.included, spec.modulus))


def test_abort_below_min_clients() -> None:
    ssum = PaillierSum(key_bits=1024, min_clients=3, workers=1)
    spec = _spec(10, 4)
    values = _ring_inputs(spec, 4, 0)
    with pytest.raises(AbortError, match="'input'"):
        run_secure_sum(ssum, values, spec=spec, session=SESSION, dropouts=DropoutSchedule({0: 0, 1: 0}))
    out = run_secure_sum(ssum, values, spec=spec, session=SESSION, dropouts=DropoutSchedule({0: 0}))
    assert out.included == (1, 2, 3)


def test_shared_key_aborts_when_no_client_is_left_to_decrypt(shared: PaillierSum) -> None:
    spec = _spec(10, 3)
    values = _ring_inputs(spec, 3, 0)
    drops = DropoutSchedule({0: "decrypt", 1: "decrypt", 2: "decrypt"})
    with pytest.raises(AbortError, match="'decrypt'"):
        run_secure_sum(shared, values, spec=spec, session=SESSION, dropouts=drops)


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


# -- the machines directly ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine_keys() -> tuple[Any, PaillierPrivateKey]:
    return generate_keypair(bits=1024)


def _clients(pk: Any, plan: PackingPlan, k: int, size: int = 20) -> list[PaillierClient]:
    return [PaillierClient(c, np.full(size, c - 1, dtype=np.int64), SESSION, 0, pk, plan, workers=1) for c in range(k)]


def test_server_refuses_more_than_k_inputs_and_foreign_keys(machine_keys: tuple[Any, PaillierPrivateKey]) -> None:
    pk, _ = machine_keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=2)
    server = PaillierServer([0, 1, 2], 20, SESSION, 0, pk, plan, workers=1)
    msgs = [m for c in _clients(pk, plan, 3) for m in c.start()]
    server.receive(msgs[0])
    with pytest.raises(ProtocolError, match="already sent"):
        server.receive(msgs[0])
    server.receive(msgs[1])
    with pytest.raises(OverflowRiskError, match="at most 2"):
        server.receive(msgs[2])
    other_pk, _ = generate_keypair(bits=1024)
    foreign = PaillierClient(2, np.zeros(20, dtype=np.int64), SESSION, 0, other_pk, plan, workers=1).start()[0]
    fresh = PaillierServer([0, 1, 2], 20, SESSION, 0, pk, plan, workers=1)
    with pytest.raises(KeyMismatchError, match="re-encrypt"):
        fresh.receive(foreign)
    assert isinstance(msgs[0], PaillierInput)
    wrong_round = dataclasses.replace(msgs[0], round=1)
    with pytest.raises(ProtocolError, match="another session"):
        fresh.receive(wrong_round)


def test_key_holder_refuses_small_aggregates_and_second_requests(
    machine_keys: tuple[Any, PaillierPrivateKey],
) -> None:
    pk, sk = machine_keys
    plan = PackingPlan.for_key(pk, value_bits=8, summands=3)
    server = PaillierServer([0, 1, 2], 20, SESSION, 0, pk, plan, workers=1)
    for c in _clients(pk, plan, 3):
        for m in c.start():
            server.receive(m)
    (ask,) = server.end_phase()
    assert isinstance(ask, PaillierAggregate) and ask.recipient == KEY_HOLDER
    holder = PaillierKeyHolder(KEY_HOLDER, sk, SESSION, 0, workers=1, min_summands=2)
    single = dataclasses.replace(ask, included=(0,), batch=server._inputs[0])
    with pytest.raises(ProtocolError, match="at least 2"):
        holder.receive(single)
    lying = dataclasses.replace(ask, included=(0, 1))
    with pytest.raises(ProtocolError, match="distinct clients"):
        holder.receive(lying)
    (reply,) = holder.receive(ask)
    with pytest.raises(ProtocolError, match="already decrypted"):
        holder.receive(ask)
    server.receive(reply)
    assert server.done and server.included == (0, 1, 2)
    assert server.result is not None and server.result.view(np.int64).tolist() == [0 - 1 + 1] * 20
    plain_client = _clients(pk, plan, 1)[0]
    with pytest.raises(ProtocolError):
        plain_client.receive(ask)  # a client without the key cannot be asked to decrypt


# -- the private key never travels -------------------------------------------------------------------


class _Recorder:
    """Wraps a machine and records every message it sends or receives."""

    def __init__(self, inner: Any, log: list[Message]) -> None:
        self._inner, self._log = inner, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def start(self) -> list[Message]:
        out: list[Message] = self._inner.start()
        self._log.extend(out)
        return out

    def receive(self, msg: Message) -> list[Message]:
        self._log.append(msg)
        out: list[Message] = self._inner.receive(msg)
        self._log.extend(out)
        return out

    def end_phase(self) -> list[Message]:
        out: list[Message] = self._inner.end_phase()
        self._log.extend(out)
        return out


@dataclasses.dataclass
class _RecordingSum:
    inner: PaillierSum
    log: list[Message]

    @property
    def name(self) -> str:
        return self.inner.name

    def bind(self, spec: ValueSpec) -> ValueSpec:
        return self.inner.bind(spec)

    def client(self, cid: int, value: Any, *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        m = self.inner.client(cid, value, spec=spec, session=session, round=round)
        return _Recorder(m, self.log)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        return _Recorder(self.inner.server(cids, spec=spec, session=session, round=round), self.log)

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        got = self.inner.parties(spec=spec, session=session, round=round)
        return {k: _Recorder(v, self.log) for k, v in got.items()}

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Any, ...]:
        return self.inner.guarantees(spec, info)


def _walk(obj: Any) -> Iterator[Any]:
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name))
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _walk(x)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(k)
            yield from _walk(v)


@pytest.mark.parametrize("mode", ["separate", "clients"])
def test_private_key_never_in_any_message(mode: str) -> None:
    ssum = PaillierSum(key_bits=1024, key_holder=mode, workers=1)  # type: ignore[arg-type]
    spec = _spec(300, 4)
    log: list[Message] = []
    out = run_secure_sum(_RecordingSum(ssum, log), _ring_inputs(spec, 4, 5), spec=spec, session=SESSION)
    assert out.included == (0, 1, 2, 3)
    _, sk = ssum._keypair()
    secrets_ = [sk.p, sk.q, (sk.p - 1) * (sk.q - 1)]
    needles = [s.to_bytes((s.bit_length() + 7) // 8, o) for s in secrets_ for o in ("big", "little")]
    needles += [str(s).encode() for s in secrets_]
    kinds = {type(m).__name__ for m in log}
    assert kinds == {"PaillierInput", "PaillierAggregate", "PaillierDecrypted"}
    assert {m.recipient for m in log if type(m).__name__ == "PaillierInput"} == {SERVER}
    for msg in log:
        for x in _walk(msg):
            assert not isinstance(x, PaillierPrivateKey)
            if isinstance(x, int):
                assert x not in secrets_
            elif isinstance(x, (bytes, bytearray)):
                assert not any(n in x for n in needles)
            elif isinstance(x, np.ndarray):
                raw = x.tobytes()
                assert not any(n in raw for n in needles)


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
