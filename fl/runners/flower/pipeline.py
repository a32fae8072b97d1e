"""Rounds in flight: one Flower exchange carries the current phase of up to four rounds.

On stock SuperNodes an exchange costs seconds (a fixed 3 s idle poll, a fresh ``flwr-clientapp`` per
message), while our protocol computes for milliseconds; four phases per round made a round cost four
exchanges. A ``sum`` job's rounds are independent (each client's vector for round r is known when round r
opens), so round r+1 need not wait for round r's last phase. With ``FlowerJob.rounds_in_flight = k`` the
ServerApp runs each round, UNCHANGED, in a thread of its own over a :class:`Lane` (the same
:func:`fl.runners.flower.serverapp.run_round`: its own session, fresh keys, its own dropout deadlines);
:class:`Bundler` waits until every round in flight has its next exchange ready, opens at most one new round
per exchange, and sends ONE message per node (``query.privagg_bundle``) carrying each round's part. With
k = 4 and SecAgg+'s four phases, round r's unmask travels with r+1's masked input, r+2's shares and r+3's
keys: R rounds take R + 3 exchanges instead of 4R.

What anyone sees is what R sequential rounds show: the same per-round messages, only travelling together.
Each part is checked by the node exactly as a lone message would be (:func:`bundle_parts` bounds the
bundle; the ClientApp keeps each round's sealed state in its own slot, :mod:`fl.runners.flower.state`).
A train job cannot overlap whole rounds (round r+1's clients train on the model round r's sum produces),
but its key agreement can run ahead: :mod:`fl.runners.flower.ahead` (two rounds in flight, a round
waiting for the previous one through :meth:`Lane.wait_for`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict

from fl.runners.flower.job import (
    BUNDLE,
    BUNDLE_RECORD,
    MAX_IN_FLIGHT,
    START,
    STEP,
    BadReplyError,
    FlowerJob,
    compute_s,
    part_key,
)
from fl.runners.flower.link import Exchange, GridTransport, send_and_receive

log = logging.getLogger(__name__)

T = TypeVar("T")

_KINDS = {START: "start", STEP: "step"}


@dataclass
class _Request:
    lane: Lane
    round: int
    phase: str
    payloads: Mapping[int, dict[str, Any]]
    kind: str
    timeout: float
    reply: tuple[dict[int, Any], set[int]] | None = None


@dataclass
class Lane:
    """One round's transport: :meth:`exchange` has the signature of :meth:`GridTransport.exchange`, but
    hands the request to the :class:`Bundler` and blocks until the bundled exchange has answered it."""

    bundler: Bundler
    round: int
    log: list[Exchange] = field(default_factory=list)
    request: _Request | None = None
    done: bool = False
    progress: Any = None
    parked_on: threading.Event | None = None  # waiting for an earlier round (no exchange of its own meanwhile)

    @property
    def job(self) -> FlowerJob:
        return self.bundler.tr.job

    @property
    def nodes(self) -> dict[int, int]:
        return self.bundler.tr.nodes

    def wait_for(self, event: threading.Event) -> None:
        """Block until ``event`` (an earlier round finished); the other rounds' exchanges go on meanwhile."""
        cond = self.bundler.cond
        with cond:
            self.parked_on = event
            cond.notify_all()
        while not event.wait(0.5):
            if self.bundler.closed:
                raise RuntimeError("the ServerApp stopped while this round waited for the previous one")
        with cond:
            self.parked_on = None
            cond.notify_all()

    def exchange(
        self, round: int, phase: str, payloads: Mapping[int, dict[str, Any]], *, kind: str, timeout: float
    ) -> tuple[dict[int, Any], set[int]]:
        if kind not in _KINDS:
            raise ValueError(f"a bundled round sends only start and step messages, not {kind}")
        req = _Request(self, round, phase, payloads, kind, timeout)
        with self.bundler.cond:
            self.request = req
            self.bundler.cond.notify_all()
            while req.reply is None:
                if self.bundler.closed:
                    raise RuntimeError("the ServerApp stopped while this round waited for its exchange")
                self.bundler.cond.wait(0.5)
            self.request = None
        return req.reply


class Bundler:
    """Run rounds over ``tr`` with up to ``depth`` in flight, one Flower exchange for all of them at a time."""

    def __init__(self, tr: GridTransport, depth: int) -> None:
        if not 1 <= depth <= MAX_IN_FLIGHT:
            raise ValueError(f"rounds in flight must be 1..{MAX_IN_FLIGHT}, got {depth}")
        self.tr, self.depth = tr, depth
        self.cond = threading.Condition()
        self.closed = False
        self.bundles = 0

    def run(self, rounds: Sequence[int], work: Callable[[Lane], T]) -> list[T]:
        """``work(lane)`` for every round (each in its own thread); the results in round order.

        The first exception of any round is raised once every round in flight has stopped.
        """
        pending = list(rounds)
        results: dict[int, T] = {}
        errors: list[BaseException] = []
        active: list[Lane] = []
        try:
            while pending or active:
                ready = self._wait_ready(active)
                active = [lane for lane in active if not lane.done]
                if pending and len(active) < self.depth and not errors:  # at most one new round per exchange
                    active.append(self._launch(pending.pop(0), work, results, errors))
                    ready = self._wait_ready(active)
                    active = [lane for lane in active if not lane.done]
                if ready:
                    self._exchange(ready)
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()
        if errors:
            raise errors[0]
        return [results[r] for r in rounds if r in results]

    def _launch(self, rnd: int, work: Callable[[Lane], T], results: dict[int, T],
                errors: list[BaseException]) -> Lane:
        lane = Lane(self, rnd)

        def body() -> None:
            try:
                results[rnd] = work(lane)
            except BaseException as exc:  # re-raised by run() in the ServerApp's thread
                errors.append(exc)
            finally:
                with self.cond:
                    lane.done = True
                    self.cond.notify_all()

        threading.Thread(target=body, name=f"privagg-round-{rnd}", daemon=True).start()
        return lane

    def _wait_ready(self, active: Sequence[Lane]) -> list[_Request]:
        """Block until every round in flight has a request waiting or has finished; those requests."""
        def waiting(lane: Lane) -> bool:  # a request not yet answered (an answered one is still being taken)
            return lane.request is not None and lane.request.reply is None

        def parked(lane: Lane) -> bool:  # waiting for an earlier round that has not finished
            return lane.parked_on is not None and not lane.parked_on.is_set()

        with self.cond:
            while not all(lane.done or waiting(lane) or parked(lane) for lane in active) or (
                    active and not any(lane.done or waiting(lane) for lane in active)):
                self.cond.wait(0.5)
            return [lane.request for lane in active if lane.request is not None and waiting(lane)]

    def _exchange(self, requests: Sequence[_Request]) -> None:
        """One Flower message per node with every request's part for it; each request gets its replies."""
        per_node: dict[int, list[tuple[int, _Request, int]]] = {}  # node -> [(part index, request, cid)]
        for req in sorted(requests, key=lambda q: q.round):
            for cid in req.payloads:
                node = self.tr.nodes[cid]
                per_node.setdefault(node, []).append((len(per_node.get(node, [])), req, cid))
        timeout = max(q.timeout for q in requests)
        msgs = [_bundle_message(node, parts, timeout) for node, parts in per_node.items()]
        t0 = time.perf_counter()
        replies = send_and_receive(self.tr.grid, msgs, timeout=timeout, poll=self.tr.job.poll_interval)
        wall = time.perf_counter() - t0
        self.bundles += 1
        got: dict[int, dict[int, Any]] = {id(q): {} for q in requests}
        failed: dict[int, set[int]] = {id(q): set() for q in requests}
        by_node = {r.metadata.src_node_id: r for r in replies}
        for node, parts in per_node.items():
            _split_reply(by_node.get(node), parts, got, failed)
        with self.cond:
            for req in requests:
                self._record(req, got[id(req)], wall)
                req.reply = (got[id(req)], failed[id(req)])
            self.cond.notify_all()

    def _record(self, req: _Request, got: Mapping[int, Any], wall: float) -> None:
        """Log the request's share of the exchange (its round's own log too: run_round reads it)."""
        client_s = max((compute_s(v) for v in got.values()), default=0.0)
        entry = Exchange(req.round, req.phase, len(req.payloads), len(got), wall, client_s, bundle=self.bundles)
        self.tr.log.append(entry)
        req.lane.log.append(entry)
        if self.tr.progress is not None:
            self.tr.progress(event="phase", round=req.round, phase=req.phase, sent=sorted(req.payloads),
                             answered=sorted(got), bundle=self.bundles)


def _bundle_message(node: int, parts: Sequence[tuple[int, _Request, int]], timeout: float) -> Message:
    content = RecordDict({BUNDLE_RECORD: ConfigRecord({"kinds": [_KINDS[q.kind] for _, q, _ in parts],
                                                       "rounds": [q.round for _, q, _ in parts]})})
    for i, req, cid in parts:
        content[part_key(i)] = ConfigRecord(dict(req.payloads[cid]))
    return Message(content, dst_node_id=node, message_type=BUNDLE, ttl=timeout + 60.0)


def _split_reply(reply: Message | None, parts: Sequence[tuple[int, _Request, int]],
                 got: dict[int, dict[int, Any]], failed: dict[int, set[int]]) -> None:
    """File one node's bundled reply under each part's request: its record, or the client as failed."""
    if reply is None:
        return  # no answer in time: the client dropped in every round it had a part in
    for i, req, cid in parts:
        if reply.has_error():
            log.warning("client %d refused the bundle (round %d, %s): %s", cid, req.round, req.phase,
                        reply.error.reason)
            failed[id(req)].add(cid)
            continue
        try:
            rec = _part_record(reply, i)
        except BadReplyError as exc:
            log.warning("round %d: dropping client %d, its %s part was refused: %s", req.round, cid, req.phase, exc)
            failed[id(req)].add(cid)
            continue
        if "error" in rec:
            log.warning("client %d refused %s of round %d: %s", cid, req.phase, req.round, rec["error"])
            failed[id(req)].add(cid)
        else:
            got[id(req)][cid] = rec


def _part_record(reply: Message, i: int) -> Any:
    try:
        rec = reply.content[part_key(i)]
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadReplyError(f"no part {i} in the bundled reply") from exc
    if not isinstance(rec, ConfigRecord):
        raise BadReplyError(f"part {i} of the bundled reply is a {type(rec).__name__}, not a ConfigRecord")
    return rec


__all__ = ["Bundler", "Lane"]
