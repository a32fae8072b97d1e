"""secagg: secure summation protocols as sans-IO state machines (no ML, no sockets, no clocks)."""

from secagg.drive import DriveOutcome, StuckProtocolError, Transport, drive
from secagg.errors import AbortError, CodecError, KeyMismatchError, OverflowRiskError, ProtocolError, SecAggError
from secagg.machine import KEY_HOLDER, SERVER, ClientMachine, Message, ServerMachine
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec, NeighbourGraph, choose_k
from secagg.masking.server import SecAggServer
from secagg.memory import DropoutSchedule, InMemoryTransport, SumOutcome, run_in_memory
from secagg.paillier import (
    CiphertextBatch,
    PackingPlan,
    PaillierClient,
    PaillierKeyHolder,
    PaillierPrivateKey,
    PaillierPublicKey,
    PaillierServer,
    add_batches,
    decrypt_vector,
    encrypt_vector,
    generate_keypair,
)
from secagg.plain import PlainClient, PlainInput, PlainServer
from secagg.ring import Quantizer, ring_bits_for

__all__ = [
    "KEY_HOLDER",
    "SERVER",
    "AbortError",
    "CiphertextBatch",
    "ClientMachine",
    "CodecError",
    "DriveOutcome",
    "DropoutSchedule",
    "GraphSpec",
    "IdentityKeys",
    "InMemoryTransport",
    "KeyMismatchError",
    "Message",
    "NeighbourGraph",
    "OverflowRiskError",
    "PackingPlan",
    "PaillierClient",
    "PaillierKeyHolder",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "PaillierServer",
    "PlainClient",
    "PlainInput",
    "PlainServer",
    "ProtocolError",
    "Quantizer",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "ServerMachine",
    "StuckProtocolError",
    "SumOutcome",
    "Transport",
    "add_batches",
    "choose_k",
    "decrypt_vector",
    "drive",
    "encrypt_vector",
    "generate_keypair",
    "ring_bits_for",
    "run_in_memory",
]
