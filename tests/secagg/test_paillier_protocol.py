"""The Paillier round as sans-IO machines, driven directly and by the in-memory transport (no fl)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from secagg.errors import AbortError, KeyMismatchError, OverflowRiskError, ProtocolError
from secagg.machine import KEY_HOLDER, SERVER, ClientMachine, Message
from secagg.memory import DropoutSchedule, run_in_memory
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
from tests.secagg.rounds import Paillier

SESSION = b"paillier-test"


def _ring_inputs(p: Paillier, k: int, seed: int) -> dict[int, np.ndarray]:
    """Signed value_bits-bit integers (including the extremes) as ring elements of Z_modulus."""
    b = (1 << (p.value_bits - 1)) - 1
    rng = np.random.default_rng(seed)
    out = {}
    for cid in range(k):
        v = rng.integers(-b, b + 1, size=p.size)
        v[: min(2, p.size)] = [b, -b][: min(2, p.size)]
        out[cid] = v.astype(np.int64).view(np.uint64) & np.uint64(p.modulus - 1)
    return out


def _ring_sum(values: Mapping[int, np.ndarray], cids: Sequence[int], modulus: int) -> np.ndarray:
    total = np.zeros_like(next(iter(values.values())))
    for c in cids:
        total = total + values[c]
    return total & np.uint64(modulus - 1)


# -- through the in-memory transport -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["separate", "clients"])
def test_dropouts_are_excluded_from_the_sum(mode: str) -> None:
    ssum = Paillier(120, 6, key_holder=mode)
    values = _ring_inputs(ssum, 6, 7)
    # client 0 never sends; client 1 sends its input then drops before the decryption phase
    drops = DropoutSchedule({0: 0, 1: "decrypt", 4: 0})
    out = ssum.run(values, session=SESSION, dropouts=drops, reorder=np.random.default_rng(1))
    assert out.included == (1, 2, 3, 5)
    assert np.array_equal(out.total, _ring_sum(values, out.included, ssum.modulus))


def test_abort_below_min_clients() -> None:
    ssum = Paillier(10, 4, min_clients=3)
    values = _ring_inputs(ssum, 4, 0)
    with pytest.raises(AbortError, match="'input'"):
        ssum.run(values, session=SESSION, dropouts=DropoutSchedule({0: 0, 1: 0}))
    out = ssum.run(values, session=SESSION, dropouts=DropoutSchedule({0: 0}))
    assert out.included == (1, 2, 3)


def test_shared_key_aborts_when_no_client_is_left_to_decrypt() -> None:
    shared = Paillier(10, 3, key_holder="clients")
    values = _ring_inputs(shared, 3, 0)
    drops = DropoutSchedule({0: "decrypt", 1: "decrypt", 2: "decrypt"})
    with pytest.raises(AbortError, match="'decrypt'"):
        shared.run(values, session=SESSION, dropouts=drops)


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
    ssum = Paillier(300, 4, key_holder=mode)
    log: list[Message] = []
    server, parties = ssum.machines(_ring_inputs(ssum, 4, 5), session=SESSION)
    recorded: dict[int, ClientMachine] = {c: _Recorder(m, log) for c, m in parties.items()}  # type: ignore[misc]
    out = run_in_memory(_Recorder(server, log), recorded)  # type: ignore[arg-type]
    assert out.included == (0, 1, 2, 3)
    _, sk = ssum.keys
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
