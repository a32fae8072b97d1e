"""secagg: secure summation protocols as sans-IO state machines (no ML, no sockets, no clocks)."""

from secagg.errors import AbortError, CodecError, KeyMismatchError, OverflowRiskError, ProtocolError, SecAggError
from secagg.machine import KEY_HOLDER, SERVER, ClientMachine, Message, ServerMachine
from secagg.plain import PlainClient, PlainInput, PlainServer
from secagg.quantize import Quantizer, ring_bits_for

__all__ = [
    "KEY_HOLDER",
    "SERVER",
    "AbortError",
    "ClientMachine",
    "CodecError",
    "KeyMismatchError",
    "Message",
    "OverflowRiskError",
    "PlainClient",
    "PlainInput",
    "PlainServer",
    "ProtocolError",
    "Quantizer",
    "SecAggError",
    "ServerMachine",
    "ring_bits_for",
]
