"""An in-process Flower ``Grid`` that hands each message to a ClientApp with its node's own Context.

No processes, no network: the message objects go through Flower's real ClientApp dispatch (mods
included) and Flower's record types. ``drop`` names nodes that never answer (from a given step on), and
``tamper`` can rewrite a reply, to play a dropping or lying SuperNode.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fl.runners.flower.state import make_state_key


class LoopbackGrid(Grid):
    """``nodes`` SuperNodes (ids 101, 102, ...) each running ``app`` with its own state and node config."""

    def __init__(self, app: ClientApp, n: int, tmp: Path, *, node_config: dict[str, Any] | None = None,
                 run_id: int = 7) -> None:
        self.app = app
        self.run_id = run_id
        self.contexts: dict[int, Context] = {}
        for i in range(n):
            nid = 101 + i
            key = make_state_key(tmp / f"node{nid}.key")
            cfg = {"state-key-file": str(key), **(node_config or {})}
            self.contexts[nid] = Context(run_id=run_id, node_id=nid, node_config=cfg, state=RecordDict(),
                                         run_config={})
        self.replies: dict[str, Message] = {}
        self.silent: dict[int, Callable[[Message], bool]] = {}
        self.tamper: Callable[[int, Message], Message] | None = None
        self.sent: list[Message] = []

    # the Grid API -----------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(run_id=self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            ids.append(mid)
            if nid in self.silent and self.silent[nid](msg):
                continue
            reply = self.app(msg, self.contexts[nid])
            if self.tamper is not None:
                reply = self.tamper(nid, reply)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
