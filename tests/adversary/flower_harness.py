"""Flower's ``Grid`` contract in one process, for adversary tests against the real ServerApp/ClientApp functions.

:class:`InProcessGrid` hands each message to the real :data:`fl.runners.flower.clientapp` with that
node's own :class:`flwr.app.Context` (its node config, its state), the way a SuperNode does, and turns an
exception into an error reply the way Flower's ClientApp runner does. ``tamper`` lets a test play a
malicious SuperNode (rewrite its replies) or a malicious ServerApp (send its own messages and job).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fl.runners.flower import client_app, make_state_key

Tamper = Callable[[Message, Message], Message]
"""``(request, honest reply) -> reply actually sent``."""
Rewrite = Callable[[int, Message], Message]
"""``(node id, request the ServerApp sent) -> request actually delivered`` (a malicious ServerApp/SuperLink)."""


def node_context(tmp: Path, node_id: int, cid: int, n: int, job_json: str, *,
                 policy: Path | None = None, extra: Mapping[str, Any] | None = None) -> Context:
    """A SuperNode's Context: partition ``cid`` of ``n``, its own state key (and policy file), the job;
    ``extra``: more ``--node-config`` entries (e.g. its identity key and roster)."""
    key = make_state_key(tmp / f"node{node_id}.key")
    node_config: dict[str, Any] = {"partition-id": cid, "num-partitions": n, "state-key-file": str(key),
                                   **(extra or {})}
    if policy is not None:
        node_config["policy-file"] = str(policy)
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config={"job": job_json})


def key_holder_context(tmp: Path, node_id: int, job_json: str, key_file: Path, *,
                       policy: Path | None = None) -> Context:
    """The Paillier key holder's SuperNode Context: its role, its private key file, its state key, the job."""
    state_key = make_state_key(tmp / f"node{node_id}.key")
    node_config: dict[str, Any] = {"role": "key-holder", "paillier-key-file": str(key_file),
                                   "state-key-file": str(state_key)}
    if policy is not None:
        node_config["policy-file"] = str(policy)
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config={"job": job_json})


def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test create instruction messages as the ServerApp does (run 1, SuperLink node 0)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def instruction(node_id: int, kind: str, fields: Mapping[str, Any], *, message_id: str = "m1") -> Message:
    """A message from the ServerApp to ``node_id`` with our record (``kind``: e.g. ``train.privagg_start``)."""
    msg = Message(RecordDict({"privagg": ConfigRecord(dict(fields))}), dst_node_id=node_id, message_type=kind,
                  group_id="1")
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def deliver(msg: Message, context: Context) -> Message:
    """Run the real ClientApp on ``msg``; an exception becomes an error reply, as Flower's runner does."""
    try:
        return client_app(msg, context)
    except Exception as exc:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                       reply_to=msg)


class InProcessGrid:
    """``get_node_ids`` / ``push_messages`` / ``pull_messages`` / ``send_and_receive`` over real ClientApps."""

    def __init__(self, contexts: Mapping[int, Context], tamper: Mapping[int, Tamper] | None = None,
                 rewrite: Rewrite | None = None) -> None:
        self.contexts = dict(contexts)
        self.tamper = dict(tamper or {})
        self.rewrite = rewrite
        self.pending: dict[str, Message] = {}
        self.sent = 0
        self.silent: set[int] = set()
        """Nodes that died: still listed by ``get_node_ids`` (as Flower does until their heartbeat expires),
        their messages accepted and never answered."""

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, msgs: Iterable[Message]) -> list[str]:
        ids = []
        for m in msgs:
            self.sent += 1
            mid = f"m{self.sent}"
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            ids.append(mid)
            if node in self.silent:
                continue
            if self.rewrite is not None:
                m = self.rewrite(node, m)
            reply = deliver(m, self.contexts[node])
            if node in self.tamper:
                reply = self.tamper[node](m, reply)
            self.pending[mid] = reply
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self.pending.pop(i) for i in list(ids) if i in self.pending]

    def send_and_receive(self, msgs: Sequence[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(msgs))


def reply_with(request: Message, fields: Mapping[str, Any]) -> Message:
    """A forged reply to ``request`` carrying ``fields`` in our record."""
    return Message(RecordDict({"privagg": ConfigRecord(dict(fields))}), reply_to=request)


# ---------------------------------------------------------------- privagg_mod + SecureAggregation (users' own apps)
def mod_identities(grid: Any, tmp: Path, *, order: Sequence[int] | None = None, policy: Path | None = None
                   ) -> Any:
    """Give each node of a :class:`tests.fl.flower._loopback.LoopbackGrid` its own identity key and the roster.

    ``order[i]``: the roster entry of the i-th node (sorted node ids); by default reversed, so a server
    that mapped client ids by sorted node id would be wrong. Returns the :class:`Roster`.
    """
    from fl.runners.flower.identity import IDENTITY_KEY_FILE, IDENTITY_ROSTER_FILE, provision_local

    nodes = sorted(grid.contexts)
    keys, roster_path, roster = provision_local(tmp / "identity", len(nodes))
    order = list(reversed(range(len(nodes)))) if order is None else list(order)
    for nid, cid in zip(nodes, order, strict=True):
        cfg = grid.contexts[nid].node_config
        cfg[IDENTITY_KEY_FILE], cfg[IDENTITY_ROSTER_FILE] = str(keys[cid]), str(roster_path)
        if policy is not None:
            cfg["policy-file"] = str(policy)
    return roster


def rewrite_protocol(msg: Message, fn: Callable[[Any], Any]) -> Message:
    """Apply ``fn`` to each protocol message in a privagg_mod request (in place: the request keeps its ids)."""
    from secagg import wire

    rec: Any = msg.content.get("privagg.secure", None)
    if rec is not None and "msgs" in rec:
        rec["msgs"] = wire.encode_frames([fn(m) for m in wire.decode_frames(list(rec["msgs"]))])
    return msg


def active_server_grid(base: type, *args: Any, rewrite: Rewrite, **kw: Any) -> Any:
    """A LoopbackGrid (``base``) whose every pushed request first goes through ``rewrite`` (an active server)
    and that records each node's error replies in ``grid.refusals`` (node id -> reasons)."""

    class _Active(base):  # type: ignore[misc,valid-type]
        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            return super().push_messages([rewrite(m.metadata.dst_node_id, m) for m in messages])

    grid = _Active(*args, **kw)
    grid.refusals = {}

    def record(nid: int, reply: Message) -> Message:
        if reply.has_error():
            grid.refusals.setdefault(nid, []).append(reply.error.reason)
        return reply

    grid.tamper = record
    return grid
