"""Training rounds whose key agreement runs ahead: two rounds in flight, two Flower exchanges per round.

A training round cannot start before the previous one ends: its clients train on the model that round's
sum produces. But SecAgg's first two phases (advertise keys, share them) need no value, so round r+1's
keys are agreed while round r's masked inputs and unmask travel (``FlowerJob.rounds_in_flight = 2``,
:mod:`fl.runners.flower.pipeline` for the bundling). Round r+1's clients are sampled when it opens;
they receive the model (and train) only in round r+1's masked-input phase, which waits for round r to
finish, and the DP budget is checked just before that. So a round costs two exchanges
(``[model + delivery]`` and ``[unmask + the next round's shares]``) instead of four; R rounds take 2R + 2.

Nothing is released earlier than in a sequential run: a node contributes to a round (and records it, for
the DP budget) when it trains; opening a round only makes fresh per-round keys
(:meth:`secagg.masking.client.SecAggClient.provide` gives the machine its value later). A client that
rejects its own update (NaN/Inf) after agreeing keys drops out of the round like any dropout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fl.errors import BudgetExhaustedError
from fl.runners.flower.job import START, BadReplyError, FlowerJob, stream_bound
from fl.runners.flower.link import PhaseLink, Progress
from fl.runners.flower.pipeline import Bundler, Lane
from fl.spec import SecureSum, TrainResult, ValueSpec
from secagg.drive import drive
from secagg.errors import AbortError

log = logging.getLogger(__name__)

MASKED = "masked"
"""The SecAgg phase whose exchange delivers the shares and collects the masked inputs (where clients train)."""


def train_rounds_ahead(tr: Any, job: FlowerJob, fed: Any, progress: Progress, todo: range, *,
                       own_start: Mapping[str, Any], names: Mapping[int, str]) -> tuple[list[dict[str, Any]],
                                                                                         str | None]:
    """Run ``todo`` with the next round's key agreement overlapping this one; the records and why the run
    stopped early (the DP budget), as :func:`fl.runners.flower.serverapp._sequential` returns them."""
    from fl.runners.flower.policy import protocol_word

    if protocol_word(fed.plan.pipeline.sum) not in ("secagg", "secagg+"):
        raise RuntimeError(f"rounds_in_flight=2 (key agreement ahead) is for SecAgg/SecAgg+ training, not "
                           f"{protocol_word(fed.plan.pipeline.sum)}: run it with rounds_in_flight=1")
    finished = {r: threading.Event() for r in todo}
    previous = {r: finished.get(r - 1) for r in todo}
    halted: list[str] = []  # once the budget stops the run, later rounds do not even open

    def work(lane: Lane) -> dict[str, Any]:
        r = lane.round
        try:
            if halted:
                return {"stopped": halted[0]}
            progress(event="round", round=r)
            record = _one_round_ahead(lane, job, fed, r, previous[r], own_start=own_start, names=names)
            if "stopped" in record:
                halted.append(str(record["stopped"]))
            else:
                progress(event="round_done", **record)
                if job.checkpoint:
                    from pathlib import Path

                    fed.save(Path(job.checkpoint))
            return record
        finally:
            finished[r].set()

    records = Bundler(tr, 2).run(list(todo), work)
    done: list[dict[str, Any]] = []
    for record in records:
        if "stopped" in record:
            return done, str(record["stopped"])
        done.append(record)
    return done, None


def _one_round_ahead(lane: Lane, job: FlowerJob, fed: Any, r: int, previous: threading.Event | None, *,
                     own_start: Mapping[str, Any], names: Mapping[int, str]) -> dict[str, Any]:
    """One training round: open (keys), wait for the previous round, train and sum; its record."""
    from fl.runners.flower.identity import server_sum
    from fl.runners.flower.serverapp import NoUpdatesError, _record_failed_round
    from fl.runners.local import SumOutcome

    t_round = time.perf_counter()
    planned = fed.sample(r)
    ssum, spec, session = server_sum(fed.plan.pipeline.sum, job), fed.bound.sum_spec, fed.session(r)
    record: dict[str, Any] = {"round": r, "planned": len(planned)}
    stopped: list[str] = []

    def model() -> Mapping[str, Any]:
        if previous is not None:
            lane.wait_for(previous)
        try:
            fed.server.check_budget(r, planned)
        except BudgetExhaustedError as exc:
            stopped.append(f"stopped before round {r}: {exc}")
            raise
        return {"params": np.ascontiguousarray(fed.params, dtype=np.float64).tobytes(), **own_start}

    try:
        if not planned:
            raise NoUpdatesError("no client was sampled this round")
        total, included, count, results, rejected = run_round_ahead(
            lane, ssum, spec, round=r, planned=planned, session=session, open_fields=own_start, model=model)
    except BudgetExhaustedError:
        return {"stopped": stopped[0] if stopped else f"stopped before round {r}"}
    except (AbortError, NoUpdatesError) as exc:
        if previous is not None and not previous.is_set():
            lane.wait_for(previous)  # the ledger records rounds in order
        return _record_failed_round(record, exc, r=r, fed=fed, planned=planned)
    record = fed.finish_round(r, planned, SumOutcome(total, included, count), results, rejected=rejected)
    record = {**record, "included_ids": list(included), "seconds": time.perf_counter() - t_round}
    if names:
        record["included_sites"] = [names[c] for c in included]
    return record


def run_round_ahead(lane: Lane, ssum: SecureSum, spec: ValueSpec, *, round: int, planned: Sequence[int],
                    session: bytes, open_fields: Mapping[str, Any],
                    model: Any) -> tuple[Any, tuple[int, ...], int, dict[int, TrainResult], list[int]]:
    """Drive one round whose clients open without the model and train in the masked-input phase.

    Returns the sum, the included clients, the message count, the training results and the clients that
    rejected their own update."""
    phases = ssum.server(list(planned), spec=spec, session=session, round=round).phases
    payloads = {cid: {**open_fields, "round": round, "session": session} for cid in planned}
    opened, _failed = lane.exchange(round, phases[0], payloads, kind=START, timeout=lane.job.phase_timeout)
    if not opened:
        raise AbortError(phases[0], needed=1, answered=0)
    members = sorted(opened)
    server = ssum.server(members, spec=spec, session=session, round=round)
    link = PhaseLink(lane, round=round, session=session, final_phase=phases[-1], planned=planned,  # type: ignore[arg-type]
                     members=members, max_values=stream_bound(spec))
    results: dict[int, TrainResult] = {}
    rejected: list[int] = []
    link.extra[MASKED] = model
    link.on_replies = lambda phase, replies: _trained(phase, replies, results, rejected, link)
    opening = link.checked(opened)
    outcome = drive(server, link, opening=opening, phase_timeout=lane.job.phase_timeout,
                    on_refused=lambda m, exc: link.refuse(m.sender, exc))
    count = len(opening) + outcome.received + link.sent
    return outcome.total, outcome.included, count, results, rejected


def _trained(phase: str, replies: Mapping[int, Any], results: dict[int, TrainResult], rejected: list[int],
             link: PhaseLink) -> None:
    """Collect the training results (or rejections) of the masked-input phase's replies."""
    if phase != MASKED:
        return
    from fl.runners.flower.serverapp import read_training

    for cid, rec in replies.items():
        try:
            read_training(cid, rec, results, rejected, required=True)
        except BadReplyError as exc:
            link.refuse(cid, exc)
