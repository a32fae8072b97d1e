"""The SecAgg phase/transition table, as data.

The server collects one phase at a time (``SERVER_PHASES``); each phase accepts exactly one message type
(``SERVER_ACCEPTS``). A client moves through its own states on the server's messages
(``CLIENT_TRANSITIONS``): anything not in the table is out of phase and refused.
"""

from __future__ import annotations

from typing import Final

from secagg.masking.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    KeyDirectory,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = ["CLIENT_TRANSITIONS", "SERVER_ACCEPTS", "client_transitions", "server_phases"]

ADVERTISE: Final = "advertise"
SHARE: Final = "share"
MASKED: Final = "masked"
CONSISTENCY: Final = "consistency"
UNMASK: Final = "unmask"

SERVER_ACCEPTS: Final[dict[str, type]] = {
    ADVERTISE: AdvertiseKeys,
    SHARE: ShareKeys,
    MASKED: MaskedInput,
    CONSISTENCY: ConsistencySignature,
    UNMASK: UnmaskResponse,
}
"""Server phase -> the one message type it collects."""

# Client states: advertised -> shared -> masked [-> signed] -> done.
CLIENT_TRANSITIONS: Final[dict[tuple[str, type], str]] = {
    ("advertised", KeyDirectory): "shared",
    ("shared", ShareDelivery): "masked",
    ("masked", ConsistencyCheck): "signed",  # authenticated mode
    ("masked", UnmaskRequest): "done",  # unauthenticated mode
    ("signed", UnmaskRequest): "done",  # authenticated mode
}


def server_phases(authenticated: bool) -> tuple[str, ...]:
    """Phase names in order; authenticated mode adds the consistency check before unmasking."""
    if authenticated:
        return (ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK)
    return (ADVERTISE, SHARE, MASKED, UNMASK)


def client_transitions(authenticated: bool) -> dict[tuple[str, type], str]:
    """The client's table for one mode (the other mode's consistency transitions are removed)."""
    table = dict(CLIENT_TRANSITIONS)
    if authenticated:
        del table[("masked", UnmaskRequest)]
    else:
        del table[("masked", ConsistencyCheck)]
        del table[("signed", UnmaskRequest)]
    return table
