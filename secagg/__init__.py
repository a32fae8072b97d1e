"""secagg: secure summation protocols as sans-IO state machines (no ML, no sockets, no clocks)."""

from secagg.client import IdentityKeys, SecAggClient
from secagg.errors import AbortError, CodecError, KeyMismatchError, OverflowRiskError, ProtocolError, SecAggError
from secagg.graph import GraphSpec, NeighbourGraph, choose_k
from secagg.machine import KEY_HOLDER, SERVER, ClientMachine, Message, ServerMachine
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
from secagg.quantize import Quantizer, ring_bits_for
from secagg.server import SecAggServer

__all__ = [
    "KEY_HOLDER",
    "SERVER",
    "AbortError",
    "CiphertextBatch",
    "ClientMachine",
    "CodecError",
    "GraphSpec",
    "IdentityKeys",
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
    "add_batches",
    "choose_k",
    "decrypt_vector",
    "encrypt_vector",
    "generate_keypair",
    "ring_bits_for",
]
