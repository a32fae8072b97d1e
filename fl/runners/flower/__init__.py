"""Run privagg's own secure-sum protocols across machines on Flower (``pip install 'privagg[flower]'``).

Flower carries the bytes; our sans-IO machines do the protocol. The :data:`server_app` workflow drives
the aggregator's :class:`~secagg.machine.ServerMachine` phase by phase: every phase is one
``Grid`` exchange (push the phase's messages to the SuperNodes, collect the replies until the phase
timeout); a SuperNode that has not answered by then has dropped, exactly like a runner deadline. The
:data:`client_app` drives the client's :class:`~secagg.machine.ClientMachine`. Protocol messages travel
as :mod:`secagg.wire` bytes inside a ``ConfigRecord``; Flower's ``secaggplus_mod`` and
``SecAggPlusWorkflow`` are not used.

Flower starts a fresh ``flwr-clientapp`` process for every message, so a client's machine (its round
secrets) must survive between phases: its versioned snapshot (no pickle) is sealed with AES-GCM under a
per-SuperNode key, bound to run, node, session, round, step and phase (:mod:`fl.runners.flower.state`).

Nothing a remote party sends selects code or weakens privacy: protocol messages are always
:mod:`secagg.wire`, and each node's own :class:`~fl.runners.flower.policy.NodePolicy` decides which
jobs it runs (:mod:`fl.runners.flower.policy`) and which app code (:mod:`fl.runners.flower.pin`).
A malformed SuperNode reply drops that client for the round, never the run.

Two jobs run on this transport. ``train``: the server drives :class:`fl.training.loop.Federation`'s server
side (it samples, decodes, averages, evaluates and keeps the ledger); each SuperNode holds one
:class:`fl.training.client.ClientSide` for the whole run (one partition; it trains and encodes with the
same seeds), so the final model equals the in-memory runner's for the same
config. ``sum`` sums public pseudo-random ring vectors and checks the result exactly: the latency
benchmark and the dropout test.

Where the time goes: the protocol itself costs milliseconds per round (d = 1e5); a stock Flower round
costs tens of seconds because every phase waits for a SuperNode's fixed 3 s idle poll, a fresh
``flwr-clientapp`` interpreter per message, and (with ``Grid.send_and_receive``) 3 s server-side polls.
The ServerApp here pulls replies every ``poll_interval`` (50 ms), and :func:`supernode_main` (what
``privagg flower supernode`` starts) polls the SuperLink every 0.1 s and forks each ClientApp from a
warm process (:func:`superexec_main`). A stock ``flower-supernode`` works too, slower and WITHOUT the app pin.

Modules, one concern each: :mod:`~fl.runners.flower.job` (the job and the shared record shapes),
:mod:`~fl.runners.flower.clientapp` and :mod:`~fl.runners.flower.serverapp` (the two apps),
:mod:`~fl.runners.flower.link` (Flower as a :class:`secagg.drive.Transport`),
:mod:`~fl.runners.flower.processes` and :mod:`~fl.runners.flower.certs` (starting Flower processes; TLS and
node keys), :mod:`~fl.runners.flower.fast_node` (the only patch of Flower internals, version-gated),
:mod:`~fl.runners.flower.mod` and :mod:`~fl.runners.flower.workflow` (for users' own Flower apps), and
:mod:`~fl.runners.flower.policy`, :mod:`~fl.runners.flower.pin`, :mod:`~fl.runners.flower.state` (what a
node accepts, which app code it runs, its sealed state). This package re-exports the public names.
"""

from __future__ import annotations

from fl.runners.flower.certs import (
    CertPaths,
    InsecureTransportError,
    is_loopback,
    make_certificates,
    make_node_keys,
    refuse_insecure_remote,
)
from fl.runners.flower.clientapp import client_app
from fl.runners.flower.fast_node import superexec_main, supernode_main
from fl.runners.flower.job import BadReplyError, FlowerJob, JobError
from fl.runners.flower.policy import NodePolicy, PolicyError
from fl.runners.flower.processes import (
    CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    LocalCluster,
    flower_env,
    register_node,
    superlink_command,
    supernode_command,
    wait_result,
    write_app,
    write_connection,
)
from fl.runners.flower.serverapp import server_app
from fl.runners.flower.state import make_state_key

__all__ = [
    "CONNECTION",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "BadReplyError",
    "CertPaths",
    "FlowerJob",
    "InsecureTransportError",
    "JobError",
    "LocalCluster",
    "NodePolicy",
    "PolicyError",
    "client_app",
    "flower_env",
    "is_loopback",
    "make_certificates",
    "make_node_keys",
    "make_state_key",
    "refuse_insecure_remote",
    "register_node",
    "server_app",
    "superexec_main",
    "superlink_command",
    "supernode_command",
    "supernode_main",
    "wait_result",
    "write_app",
    "write_connection",
]
