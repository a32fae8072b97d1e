"""The sans-IO contract shared by every secure-summation protocol.

Protocol objects take messages in and give messages out. They never open a socket, read a clock or
start a thread: time (phase deadlines) and dropouts belong to the *runner*, which calls
:meth:`ServerMachine.end_phase` when a phase's deadline passes. The same machines therefore run in
memory (tests, simulation) and over a network engine unchanged.

Addresses are integers: clients use their non-negative id, the server is :data:`SERVER`, and extra roles
(e.g. a Paillier key holder) use other negative ids.
"""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = ["KEY_HOLDER", "SERVER", "ClientMachine", "Message", "ServerMachine"]

SERVER: Final = -1
"""Address of the aggregation server."""

KEY_HOLDER: Final = -2
"""Address of a separate decryption-key holder (Paillier), when the protocol has one."""


@runtime_checkable
class Message(Protocol):
    """Anything with a sender and a recipient; concrete messages are frozen dataclasses."""

    @property
    def sender(self) -> int: ...

    @property
    def recipient(self) -> int: ...


class ClientMachine(Protocol):
    """One party's half of the protocol for one round (a client, or an extra role such as a key holder)."""

    @property
    def cid(self) -> int: ...

    def start(self) -> list[Message]:
        """Messages this party sends unprompted when the round opens (e.g. its advertised keys)."""
        ...

    def receive(self, msg: Message) -> list[Message]:
        """Handle one message; return the replies. Raises ``ProtocolError`` to refuse a bad request."""
        ...


class ServerMachine(Protocol):
    """The aggregator's half: collects one phase at a time, then moves on when the runner says so."""

    @property
    def phases(self) -> tuple[str, ...]:
        """The names of the protocol's phases, in order."""
        ...

    @property
    def phase(self) -> str:
        """The phase now collecting messages (the last phase name once done)."""
        ...

    @property
    def done(self) -> bool: ...

    @property
    def result(self) -> NDArray[np.uint64] | NDArray[np.float64] | None:
        """The sum, once :attr:`done`; ``None`` before."""
        ...

    @property
    def included(self) -> tuple[int, ...]:
        """Ids of the clients whose inputs are in :attr:`result` (sorted)."""
        ...

    def start(self) -> list[Message]:
        """Messages the server sends when the round opens (may be empty)."""
        ...

    def receive(self, msg: Message) -> list[Message]:
        """Accept one message of the current phase; usually ``[]`` until the phase closes."""
        ...

    def end_phase(self) -> list[Message]:
        """The phase's deadline passed: whoever has not answered has dropped.

        Returns the messages that open the next phase. Raises ``AbortError`` when fewer than the
        threshold answered.
        """
        ...
