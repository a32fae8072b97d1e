"""The no-privacy baseline: clients send their values in the clear and the server adds them.

It speaks the same sans-IO machine interface as the real protocols, so the runner, the dropout
schedules and the training loop are exercised identically. It guarantees nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from secagg.errors import AbortError, ProtocolError
from secagg.machine import SERVER, Message

__all__ = ["PlainClient", "PlainInput", "PlainServer"]


@dataclass(frozen=True, slots=True)
class PlainInput:
    """A client's value, unprotected."""

    sender: int
    recipient: int
    session: bytes
    round: int
    value: NDArray[np.float64] | NDArray[np.uint64]


@dataclass(slots=True)
class PlainClient:
    """Sends its value once when the round opens."""

    cid: int
    value: NDArray[np.float64] | NDArray[np.uint64]
    session: bytes
    round: int

    def start(self) -> list[Message]:
        return [PlainInput(self.cid, SERVER, self.session, self.round, self.value)]

    def receive(self, msg: Message) -> list[Message]:
        raise ProtocolError(f"plain-sum client {self.cid} expects no messages, got {type(msg).__name__}")


@dataclass(slots=True)
class PlainServer:
    """Adds the values it receives; ``modulus`` makes it add in Z_modulus (ring-domain values)."""

    cids: Sequence[int]
    size: int
    session: bytes
    round: int
    min_clients: int = 1
    modulus: int | None = None
    _values: dict[int, NDArray[np.float64] | NDArray[np.uint64]] = field(default_factory=dict)
    _result: NDArray[np.float64] | NDArray[np.uint64] | None = None
    _done: bool = False

    @property
    def phases(self) -> tuple[str, ...]:
        return ("input",)

    @property
    def phase(self) -> str:
        return "input"

    @property
    def done(self) -> bool:
        return self._done

    @property
    def result(self) -> NDArray[np.float64] | NDArray[np.uint64] | None:
        return self._result

    @property
    def included(self) -> tuple[int, ...]:
        return tuple(sorted(self._values)) if self._done else ()

    def start(self) -> list[Message]:
        return []

    def receive(self, msg: Message) -> list[Message]:
        if self._done:
            raise ProtocolError("the round is over; no more inputs are accepted")
        if not isinstance(msg, PlainInput):
            raise ProtocolError(f"expected PlainInput, got {type(msg).__name__}")
        if msg.session != self.session or msg.round != self.round:
            raise ProtocolError(f"input from client {msg.sender} belongs to another session or round")
        if msg.sender not in self.cids:
            raise ProtocolError(f"client {msg.sender} was not sampled for this round")
        if msg.sender in self._values:
            raise ProtocolError(f"client {msg.sender} already sent its input (replayed message?)")
        value = msg.value
        if not isinstance(value, np.ndarray) or value.shape != (self.size,):
            raise ProtocolError(
                f"client {msg.sender} sent shape {value.shape}, expected ({self.size},): every client must "
                f"start the round from the same model"
            )
        self._values[msg.sender] = value
        return []

    def end_phase(self) -> list[Message]:
        if self._done:
            return []
        if len(self._values) < self.min_clients:
            raise AbortError("input", needed=self.min_clients, answered=len(self._values))
        stacked = [self._values[c] for c in sorted(self._values)]
        if self.modulus is None:
            floats: NDArray[np.float64] = np.stack(stacked).astype(np.float64).sum(axis=0)
            self._result = floats
        else:
            total = np.zeros(self.size, dtype=np.uint64)
            for v in stacked:
                total += v.astype(np.uint64)  # wraps mod 2^64; reduce below
            if self.modulus < (1 << 64):
                total &= np.uint64(self.modulus - 1)
            self._result = total
        self._done = True
        return []
