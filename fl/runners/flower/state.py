"""A SuperNode's between-phase client state: a versioned snapshot, sealed, bound to where and when it opens.

Flower starts a fresh ClientApp process for every message, so a client's round secrets must survive
between phases in the node's ``Context.state``. What is kept is :meth:`secagg.masking.client.SecAggClient.snapshot`
(the versioned wire record codec; never pickle), sealed with AES-256-GCM
(:mod:`secagg._hazmat.seal`) under a key only this node holds (``state-key-file`` in its node config).
The associated data binds the run, the node, the session, the round, the step (how many protocol
steps of this round the node has taken, which the ServerApp states in each step message) and the
machine's phase; :meth:`~secagg.masking.client.SecAggClient.restore` checks session, round and phase again.
So an older blob (an earlier phase or round of the same run: rollback), another node's blob, or an
altered one is refused with :class:`~secagg.errors.ProtocolError`.

Who is trusted: the node's own store (Flower's NodeState) holds only sealed blobs; anyone who can
replace them AND make the ServerApp state an old step could replay, which needs both the node's
store and the server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from secagg.errors import CodecError, KeyMismatchError, ProtocolError

__all__ = ["SLOTS", "STATE_KEY_FILE", "STATE_RECORD", "advance", "clear", "last_released", "load", "make_state_key",
           "record_released", "slot", "state_key", "store"]

STATE_RECORD = "privagg-state"
"""The ``Context.state`` record that holds the sealed machine (of round 1, 5, 9, ...: see :func:`slot`)."""
SLOTS = 4
"""Rounds whose machines a node keeps at once (a sum job's rounds in flight, ``job.MAX_IN_FLIGHT``)."""
STATE_KEY_FILE = "state-key-file"
"""The SuperNode ``--node-config`` key naming this node's sealing key (hex, 0600)."""
_VERSION = 1


def make_state_key(path: Path) -> Path:
    """Write a fresh 32-byte key (hex, mode 0600) that seals this SuperNode's protocol state."""
    from secagg._hazmat.seal import new_key

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(new_key().hex())
    return path


def state_key(context: Context) -> bytes:
    """This node's sealing key, from the file its own node config names (an error naming the fix if absent)."""
    path = context.node_config.get(STATE_KEY_FILE)
    if not isinstance(path, str) or not path:
        raise RuntimeError(
            f"this SuperNode has no {STATE_KEY_FILE!r} in its --node-config; start it with "
            f"`privagg flower supernode` (which makes one), or pass --node-config "
            f"'{STATE_KEY_FILE}=\"/path/state.key\"' naming a file of 64 hex digits (mode 0600)"
        )
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise RuntimeError(f"{path} must hold a 32-byte key in hex; recreate it with `privagg flower supernode`")
    return key


def _aad(context: Context, *, session: bytes, round: int, step: int, phase: str) -> bytes:
    """``privagg-flower-state | version | run | node | session | round | step | phase``, length-prefixed."""
    parts = [b"privagg-flower-state", str(_VERSION).encode(), str(context.run_id).encode(),
             str(context.node_id).encode(), bytes(session), str(round).encode(), str(step).encode(), phase.encode()]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def slot(round: int) -> str:
    """The state record of ``round``'s machine: one of :data:`SLOTS`, so consecutive rounds in flight never
    share one and a node keeps at most :data:`SLOTS` sealed machines. A round that reuses a slot overwrites
    a machine four rounds older; that round's next step is then refused (its stored round differs)."""
    k = (round - 1) % SLOTS
    return STATE_RECORD if k == 0 else f"{STATE_RECORD}.{k}"


def store(context: Context, machine: Any, *, session: bytes, round: int, step: int) -> None:
    """Seal ``machine`` (a :class:`~secagg.masking.client.SecAggClient`) into the node's state for ``step``."""
    from secagg._hazmat.seal import seal
    from secagg.masking.client import SecAggClient

    if not isinstance(machine, SecAggClient):
        raise ProtocolError(f"the Flower runner keeps state only for SecAgg/SecAgg+ clients, not {type(machine)}")
    phase = str(machine.state)
    blob = seal(state_key(context), machine.snapshot(),
                aad=_aad(context, session=session, round=round, step=step, phase=phase))
    context.state[slot(round)] = ConfigRecord(
        {"blob": blob, "round": round, "session": bytes(session), "step": step, "phase": phase}
    )


def load(context: Context, *, session: bytes, round: int, step: int,
         identity: tuple[bytes, Mapping[int, bytes]] | None = None) -> Any:
    """The machine stored for exactly this session, round and step; ``ProtocolError`` for anything else.

    ``identity``: ``(own private key, everyone's public keys)`` for an authenticated round, from the
    node's own files (the snapshot never holds them: :mod:`fl.runners.flower.identity`); else ``None``.
    """
    from secagg._hazmat.seal import unseal
    from secagg.masking.client import SecAggClient

    if slot(round) not in context.state:
        raise ProtocolError("no protocol state for this round on this node (restarted mid-round?)")
    rec: Any = context.state[slot(round)]
    try:
        blob, phase = bytes(rec["blob"]), str(rec["phase"])
        stored = (bytes(rec["session"]), int(rec["round"]), int(rec["step"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"the stored protocol state is malformed: {exc}") from exc
    if stored != (bytes(session), round, step):
        raise ProtocolError(
            f"the stored protocol state is of round {stored[1]} step {stored[2]}, the server's message of round "
            f"{round} step {step} (another session, or an old state replayed): refusing it"
        )
    try:
        raw = unseal(state_key(context), blob, aad=_aad(context, session=session, round=round, step=step,
                                                         phase=phase))
        key, pubs = identity if identity is not None else (None, None)
        return SecAggClient.restore(raw, session=session, round=round, state=phase, identity_key=key,
                                    identities=pubs)
    except KeyMismatchError as exc:
        raise ProtocolError("the stored protocol state does not authenticate under this node's key and binding") \
            from exc
    except CodecError as exc:
        raise ProtocolError(f"the stored protocol state does not decode: {exc}") from exc


def clear(context: Context, round: int | None = None) -> None:
    """Forget ``round``'s secrets (after its last phase, or before it starts); every round's if ``None``."""
    names = [slot(round)] if round is not None else [slot(r) for r in range(1, SLOTS + 1)]
    for name in names:
        if name in context.state:
            del context.state[name]



def advance(context: Context, incoming: Iterable[Any], *, session: bytes, round: int, step: int, final: bool,
            identity: tuple[bytes, Mapping[int, bytes]] | None = None,
            prepare: Callable[[Any], None] | None = None) -> list[Any]:
    """One later protocol phase on the stored machine: load step ``step - 1``, feed ``incoming``, store it
    again as ``step`` (or forget the round's secrets after the ``final`` phase); the machine's replies.
    ``identity``: the node's own identity key and the roster's public keys (authenticated mode)."""
    from secagg.errors import ProtocolError

    if step < 1:
        raise ProtocolError(f"protocol steps are numbered from 1, got {step}")
    machine = load(context, session=session, round=round, step=step - 1, identity=identity)
    if prepare is not None:  # e.g. give a machine that agreed its keys ahead its value
        prepare(machine)
    out: list[Any] = []
    for m in incoming:
        out += machine.receive(m)
    if final:
        clear(context, round)  # the round's secrets are no longer needed
    else:
        store(context, machine, session=session, round=round, step=step)
    return out

# ---- the node's own record of released rounds, across runs ---------------------------------------
def _rounds_file(context: Context) -> Path:
    """``<state key file>.rounds.json``: beside the node's key, in the node's own files (never the server's)."""
    state_key(context)  # the same configuration error, naming the fix, when the node has no key file
    return Path(str(context.node_config[STATE_KEY_FILE])).with_suffix(".rounds.json")


def last_released(context: Context, job: str) -> int:
    """The last round of ``job`` (its releases id) this node contributed to, in any run; 0 if none."""
    path = _rounds_file(context)
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
        return int(data.get(job, 0)) if isinstance(data, dict) else 0
    except (ValueError, TypeError) as exc:
        raise RuntimeError(f"this node's round record {path} is damaged ({exc}); it is what keeps a server from "
                           "replaying rounds across runs: restore it, or remove it only for jobs that never "
                           "ran") from exc


def record_released(context: Context, job: str, round: int) -> None:
    """Remember (atomically, mode 0600) that this node contributed to ``round`` of ``job``."""
    path = _rounds_file(context)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[job] = round
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, sort_keys=True))
    tmp.replace(path)
