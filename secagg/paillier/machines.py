"""The Paillier round's three machines: client, separate key holder, aggregator (sans-IO).

Phases: ``input`` (clients' ciphertexts) and ``decrypt`` (one decryptor's answer). Paillier is malleable:
correctness assumes an honest-but-curious aggregator (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from secagg.errors import AbortError, OverflowRiskError, ProtocolError
from secagg.machine import KEY_HOLDER, SERVER, Message
from secagg.paillier.ciphertexts import CiphertextBatch, Randomness, add_batches, decrypt_vector, encrypt_vector
from secagg.paillier.keys import PaillierPrivateKey, PaillierPublicKey
from secagg.paillier.messages import PaillierAggregate, PaillierDecrypted, PaillierInput
from secagg.paillier.packing import PackingPlan
from secagg.ring import ring_bits, to_signed

__all__ = ["PaillierClient", "PaillierKeyHolder", "PaillierServer", "ring_to_signed"]


def _to_ring(total: NDArray[np.int64], modulus: int | None) -> NDArray[np.uint64]:
    out = np.asarray(total, dtype=np.int64).view(np.uint64).copy()
    if modulus is not None and modulus < (1 << 64):
        out &= np.uint64(modulus - 1)
    return out


def ring_to_signed(value: NDArray[Any], modulus: int | None) -> NDArray[np.int64]:
    """Two's-complement ring elements in ``Z_modulus`` (a power of two) -> signed integers."""
    v = np.asarray(value)
    if v.dtype.kind not in "iu":
        raise OverflowRiskError(
            f"Paillier packing encrypts integers, got dtype {v.dtype}; quantize first (fl.layers.Quantize)"
        )
    if v.dtype.kind == "i" or modulus is None:
        return v.astype(np.int64)
    try:
        bits = ring_bits(modulus, what="the ring modulus")
    except ValueError as exc:
        raise OverflowRiskError(str(exc)) from exc
    u = v.astype(np.uint64)
    if modulus < (1 << 64) and np.any(u >= np.uint64(modulus)):
        raise OverflowRiskError(f"a ring element is >= the modulus {modulus}; it was not encoded by Quantize")
    return to_signed(u, bits)  # overflow-safe up to 2^64 (a 2^63 ring overflowed int64)


def _check_round(msg: Any, session: bytes, round: int) -> None:
    if msg.session != session or msg.round != round:
        raise ProtocolError(f"message from {msg.sender} belongs to another session or round")


@dataclass(slots=True)
class PaillierClient:
    """A client: encrypts its packed vector once when the round opens.

    ``value``: signed integers, or ring elements of ``Z_modulus`` holding signed integers in two's
    complement (``modulus`` given). The range is checked at construction, before any encryption.
    In the shared-key setting (``private`` given) this client can also be asked to decrypt the aggregate.
    """

    cid: int
    value: NDArray[Any]
    session: bytes
    round: int
    public: PaillierPublicKey
    plan: PackingPlan
    randomness: Randomness = "fixed-base"
    workers: int | None = None
    modulus: int | None = None
    private: PaillierPrivateKey | None = field(default=None, repr=False)
    min_summands: int = 2
    _signed: NDArray[np.int64] = field(init=False, repr=False)
    _decrypted: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_min(self.min_summands, "min_summands")
        self._signed = ring_to_signed(self.value, self.modulus)
        if self._signed.size:
            worst = int(np.max(np.abs(self._signed)))
            if worst > self.plan.offset:
                raise OverflowRiskError(
                    f"client {self.cid}: value magnitude {worst} exceeds the packed range +-{self.plan.offset} "
                    f"(signed {self.plan.value_bits}-bit); quantize with Quantize(bits={self.plan.value_bits}) "
                    f"-- nothing was encrypted"
                )

    def start(self) -> list[Message]:
        batch = encrypt_vector(self._signed, self.public, self.plan, randomness=self.randomness, workers=self.workers)
        return [PaillierInput(self.cid, SERVER, self.session, self.round, batch)]

    def receive(self, msg: Message) -> list[Message]:
        if self.private is None or not isinstance(msg, PaillierAggregate):
            raise ProtocolError(f"Paillier client {self.cid} expects no {type(msg).__name__} message")
        return _decrypt_request(self.cid, self, msg)


@dataclass(slots=True)
class PaillierKeyHolder:
    """The separate key holder (address ``KEY_HOLDER``): decrypts one aggregate per round, returns the sum.

    It refuses an aggregate that claims fewer than ``min_summands`` clients (so a careless aggregator
    cannot get a single client's vector decrypted) and a second request in the same round.
    """

    cid: int
    private: PaillierPrivateKey = field(repr=False)
    session: bytes
    round: int
    workers: int | None = None
    min_summands: int = 2
    _decrypted: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_min(self.min_summands, "min_summands")

    def start(self) -> list[Message]:
        return []

    def receive(self, msg: Message) -> list[Message]:
        if not isinstance(msg, PaillierAggregate):
            raise ProtocolError(f"the key holder expects PaillierAggregate, got {type(msg).__name__}")
        return _decrypt_request(self.cid, self, msg)


def _check_min(value: int, name: str) -> None:
    """A secure sum of fewer than two clients reveals the one input: refuse such a configuration."""
    if value < 2:
        raise ValueError(f"{name} must be >= 2 (a decrypted sum of one client is that client's update), got {value}")


def _decrypt_request(me: int, party: PaillierClient | PaillierKeyHolder, msg: PaillierAggregate) -> list[Message]:
    assert party.private is not None
    _check_round(msg, party.session, party.round)
    if msg.sender != SERVER:
        raise ProtocolError(f"only the aggregator may ask for a decryption, not party {msg.sender}")
    if party._decrypted:
        raise ProtocolError("this round's aggregate was already decrypted; refusing a second decryption")
    if len(set(msg.included)) != len(msg.included) or msg.batch.summands != len(msg.included):
        raise ProtocolError(
            f"aggregate claims {msg.batch.summands} summands but lists {len(msg.included)} distinct clients"
        )
    if msg.batch.summands < party.min_summands:
        raise ProtocolError(
            f"refusing to decrypt an aggregate of {msg.batch.summands} client(s): at least "
            f"{party.min_summands} are required so that no single client's vector is revealed"
        )
    total = decrypt_vector(msg.batch, party.private, workers=party.workers)
    party._decrypted = True
    return [PaillierDecrypted(me, SERVER, party.session, party.round, tuple(msg.included), total)]


@dataclass(slots=True)
class PaillierServer:
    """The aggregator: collects encrypted inputs, adds them without any key, asks the key holder to decrypt.

    Phases: ``input`` (clients' ciphertexts) and ``decrypt`` (the key holder's answer).
    ``decryptor``: ``KEY_HOLDER`` for a separate key holder, or ``None`` for the shared-key setting, where
    the lowest-id surviving client decrypts (the next one if it does not answer). ``modulus``: the result
    is the sum in ``Z_modulus`` as uint64 (two's complement), 2^64 if ``None``.
    """

    cids: Sequence[int]
    size: int
    session: bytes
    round: int
    public: PaillierPublicKey
    plan: PackingPlan
    min_clients: int = 2
    decryptor: int | None = KEY_HOLDER
    modulus: int | None = None
    workers: int | None = None
    _inputs: dict[int, CiphertextBatch] = field(default_factory=dict, init=False)
    _phase: str = field(default="input", init=False)
    _asked: list[int] = field(default_factory=list, init=False)
    _aggregate: PaillierAggregate | None = field(default=None, init=False, repr=False)
    _result: NDArray[np.uint64] | None = field(default=None, init=False)
    _done: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        _check_min(self.min_clients, "min_clients")
        if len(set(self.cids)) < self.min_clients:
            raise ValueError(
                f"a Paillier round over {len(set(self.cids))} client(s) cannot reach min_clients={self.min_clients}: "
                f"sample more clients"
            )

    @property
    def phases(self) -> tuple[str, ...]:
        return ("input", "decrypt")

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def done(self) -> bool:
        return self._done

    @property
    def result(self) -> NDArray[np.uint64] | None:
        return self._result

    @property
    def included(self) -> tuple[int, ...]:
        return tuple(sorted(self._inputs)) if self._done else ()

    def start(self) -> list[Message]:
        return []

    def receive(self, msg: Message) -> list[Message]:
        if self._done:
            raise ProtocolError("the round is over; no more messages are accepted")
        if self._phase == "input":
            if not isinstance(msg, PaillierInput):
                raise ProtocolError(f"expected PaillierInput in phase 'input', got {type(msg).__name__}")
            _check_round(msg, self.session, self.round)
            if msg.sender not in self.cids:
                raise ProtocolError(f"client {msg.sender} was not sampled for this round")
            if msg.sender in self._inputs:
                raise ProtocolError(f"client {msg.sender} already sent its input (replayed message?)")
            batch = msg.batch
            batch.check(self.public, self.plan)
            if batch.size != self.size or batch.summands != 1:
                raise ProtocolError(
                    f"client {msg.sender} sent {batch.size} values as {batch.summands} summand(s), expected "
                    f"{self.size} values as 1: every client must start the round from the same model"
                )
            if len(self._inputs) + 1 > self.plan.summands:
                raise OverflowRiskError(
                    f"refusing input {len(self._inputs) + 1}: the packing was planned for at most "
                    f"{self.plan.summands} clients; size the cohort (K) for every client that can take part"
                )
            self._inputs[msg.sender] = batch
            return []
        if not isinstance(msg, PaillierDecrypted):
            raise ProtocolError(f"expected PaillierDecrypted in phase 'decrypt', got {type(msg).__name__}")
        _check_round(msg, self.session, self.round)
        if not self._asked or msg.sender != self._asked[-1]:
            raise ProtocolError(f"party {msg.sender} was not asked to decrypt this round")
        if tuple(msg.included) != tuple(sorted(self._inputs)):
            raise ProtocolError("the decrypted sum names other clients than the aggregate")
        total = np.asarray(msg.total)
        if total.shape != (self.size,) or total.dtype.kind != "i":
            raise ProtocolError(f"decrypted sum has shape {total.shape}/{total.dtype}, expected ({self.size},) ints")
        self._result = _to_ring(total, self.modulus)
        self._done = True
        self._phase = "decrypt"
        return []

    def end_phase(self) -> list[Message]:
        if self._done:
            return []
        if self._phase == "input":
            if len(self._inputs) < self.min_clients:
                raise AbortError("input", needed=self.min_clients, answered=len(self._inputs))
            order = sorted(self._inputs)
            batch = add_batches([self._inputs[c] for c in order], self.public, workers=self.workers)
            self._aggregate = PaillierAggregate(SERVER, 0, self.session, self.round, tuple(order), batch)
            self._phase = "decrypt"
            return self._ask_next()
        return self._ask_next()

    def _ask_next(self) -> list[Message]:
        assert self._aggregate is not None
        # shared key (decryptor None): the lowest-id surviving client, then the next one
        candidates = [self.decryptor] if self.decryptor is not None else sorted(self._inputs)
        remaining = [c for c in candidates if c not in self._asked]
        if not remaining:
            raise AbortError("decrypt", needed=1, answered=0)
        who = remaining[0]
        self._asked.append(who)
        a = self._aggregate
        return [PaillierAggregate(SERVER, who, a.session, a.round, a.included, a.batch)]
