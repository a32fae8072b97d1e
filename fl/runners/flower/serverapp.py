"""The privagg ServerApp (:data:`server_app`): discover the SuperNodes, then drive every round.

A ``train`` job runs :class:`fl.training.loop.Federation`'s server side (sampling, decoding, averaging,
evaluation, the ledger) and drives the round's secure sum with :func:`secagg.drive.drive` over
:class:`~fl.runners.flower.link.PhaseLink`; a ``sum`` job checks the secure sum of public test vectors
exactly. Progress, the result and errors go to JSON files in the job's ``out`` directory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from numpy.typing import NDArray

from fl.errors import BudgetExhaustedError
from fl.runners.flower import keyholder
from fl.runners.flower.identity import server_sum
from fl.runners.flower.job import (
    HELLO,
    RECORD,
    START,
    BadReplyError,
    FlowerJob,
    job_stats,
    load_job,
    reply_record,
    stream_bound,
    sum_protocol,
    sum_value,
    train_config,
    train_result,
)
from fl.runners.flower.link import Exchange, GridTransport, PhaseLink, Progress, send_and_receive, write_json
from fl.spec import SecureSum, TrainResult, ValueSpec
from secagg.drive import PhaseStats, drive
from secagg.errors import AbortError
from secagg.machine import KEY_HOLDER, ServerMachine

log = logging.getLogger(__name__)


class NoUpdatesError(Exception):
    """Every sampled client rejected its own update (NaN/Inf), or none was sampled: the round is skipped."""


@dataclass
class RoundResult:
    total: NDArray[Any]
    included: tuple[int, ...]
    messages: int
    results: dict[int, TrainResult]
    rejected: list[int]


def open_round(tr: GridTransport, phase: str, *, round: int, planned: Sequence[int], session: bytes,
                start_fields: Mapping[str, Any]) -> tuple[dict[int, Any], dict[int, TrainResult], list[int]]:
    """Phase 0: ask every sampled client to train (or draw its vector) and start its machine."""
    payloads = {cid: {**start_fields, "round": round, "session": session} for cid in planned}
    replies, failed = tr.exchange(round, phase, payloads, kind=START, timeout=tr.job.start_timeout)
    results: dict[int, TrainResult] = {}
    rejected: list[int] = []
    for cid, rec in replies.items():
        try:
            read_training(cid, rec, results, rejected, required="params" in start_fields)
        except BadReplyError as exc:
            log.warning("round %d: dropping client %d, its %s reply was refused: %s", round, cid, phase, exc)
            failed.add(cid)
    opened = {cid: rec for cid, rec in replies.items() if cid not in failed and cid not in rejected}
    return opened, results, rejected


def read_training(cid: int, rec: Any, results: dict[int, TrainResult], rejected: list[int], *,
                  required: bool) -> None:
    """File client ``cid``'s training outcome: its result, or that it rejected its own update (NaN/Inf).

    ``required``: a training reply must carry one of the two (else :class:`BadReplyError`)."""
    if "rejected" in rec:
        rejected.append(cid)
    elif "result" in rec:
        results[cid] = train_result(rec["result"])
    elif required:
        raise BadReplyError("a training reply without its training result")


def run_round(
    tr: GridTransport,
    ssum: SecureSum,
    spec: ValueSpec,
    *,
    round: int,
    planned: Sequence[int],
    session: bytes,
    start_fields: Mapping[str, Any],
) -> RoundResult:
    """Drive one round of our server machine over Flower with :func:`secagg.drive.drive`.

    Phase 0 asks every sampled client to train (or draw its vector) and start its machine; the server
    machine is then built over the clients that answered with an update (a client that rejected its own
    update is left out, as in memory; one that did not answer in time has dropped).
    """
    phases = ssum.server(list(planned), spec=spec, session=session, round=round).phases
    opened, results, rejected = open_round(tr, phases[0], round=round, planned=planned, session=session,
                                            start_fields=start_fields)
    if not opened:
        if rejected and not (set(planned) - set(rejected)):
            raise NoUpdatesError("no client update this round")
        raise AbortError(phases[0], needed=1, answered=0)
    members = sorted(opened)
    start_log = len(tr.log)
    t0 = time.perf_counter()
    server: ServerMachine = ssum.server(members, spec=spec, session=session, round=round)
    build_s = time.perf_counter() - t0
    link = PhaseLink(tr, round=round, session=session, final_phase=phases[-1], planned=planned, members=members,
                     max_values=stream_bound(spec), extra=[KEY_HOLDER] if KEY_HOLDER in tr.nodes else [])
    opening = link.checked(opened)
    outcome = drive(server, link, opening=opening, phase_timeout=tr.job.phase_timeout,
                    on_refused=lambda m, exc: link.refuse(m.sender, exc))
    _add_server_time(tr.log[start_log - 1:], outcome.phases, build_s)
    count = len(opening) + outcome.received + link.sent
    return RoundResult(outcome.total, outcome.included, count, results, rejected)


def _add_server_time(entries: Sequence[Exchange], phases: Sequence[PhaseStats], build_s: float) -> None:
    """Attribute the server's compute time in each phase to that phase's last exchange of the round."""
    if not entries:
        return
    entries[0].server_s += build_s
    for p in phases:
        mine = [e for e in entries if e.phase == p.phase]
        (mine or list(entries))[-1].server_s += p.server_s


def _discover(grid: Grid, job: FlowerJob, hellos_out: dict[int, Any] | None = None) -> dict[int, int]:
    """Wait for the SuperNodes, ask each for its partition; return ``{client id: node id}`` (and
    ``KEY_HOLDER: node id`` for a Paillier job: exactly one key-holder node, never a client).

    ``hellos_out``: filled with each client's hello fields (its site, columns and table metadata)."""
    want = job.num_clients
    deadline = time.monotonic() + job.join_timeout
    nodes: list[int] = []
    holders: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want + keyholder.uses_paillier(job):
            break
        time.sleep(0.2)
    if len(nodes) < want:
        raise RuntimeError(
            f"only {len(nodes)} of {want} SuperNodes connected within {job.join_timeout:g}s; start one "
            f"`privagg flower supernode --partition I/{want}` per client"
        )
    msgs = [
        Message(RecordDict({RECORD: ConfigRecord({"hello": 1})}), dst_node_id=n, message_type=HELLO,
                ttl=job.join_timeout + 60.0)
        for n in nodes
    ]
    replies = send_and_receive(grid, msgs, timeout=job.join_timeout, poll=job.poll_interval or 0.2)
    mapping: dict[int, int] = {}
    hellos: dict[int, Any] = {}
    for r in replies:
        if r.has_error():
            log.error("SuperNode %s refused the job: %s", r.metadata.src_node_id, r.error.reason)
            raise RuntimeError(f"SuperNode {r.metadata.src_node_id} cannot take part: {r.error.reason}")
        try:
            cid = reply_record(r).get("cid")
        except BadReplyError as exc:
            log.warning("SuperNode %s sent a malformed hello (%s); ignoring it", r.metadata.src_node_id, exc)
            continue
        if keyholder.is_key_holder_hello(reply_record(r)):
            holders.append(r.metadata.src_node_id)
            continue
        if isinstance(cid, bool) or not isinstance(cid, int):
            log.warning("SuperNode %s sent a hello without an integer cid; ignoring it", r.metadata.src_node_id)
            continue
        if cid in mapping:
            raise RuntimeError(f"two SuperNodes claim partition {cid}; give each a distinct --partition I/{want}")
        if not 0 <= cid < want:
            raise RuntimeError(f"a SuperNode owns partition {cid}, outside 0..{want - 1}; check --partition I/{want}")
        mapping[cid] = r.metadata.src_node_id
        hellos[r.metadata.src_node_id] = dict(reply_record(r))
    from fl.runners.flower.site import check_sites

    check_sites(hellos)  # the sites' columns must agree before any round (SiteMismatchError names them)
    if len(mapping) < want:
        missing = sorted(set(range(want)) - set(mapping))
        raise RuntimeError(f"no SuperNode answered for partition(s) {missing} within {job.join_timeout:g}s")
    if hellos_out is not None:  # the clients' hellos only (the key holder is no site)
        hellos_out.update({cid: hellos[node] for cid, node in mapping.items()})
    mapping.update(keyholder.pick_key_holder(holders, job))
    return mapping


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """The ServerApp: discover the SuperNodes, then run every round of the job; write the results."""
    job = load_job(context)
    _tune_pulls(job)
    out = Path(job.out)
    progress = Progress(out)
    try:
        result = serve(grid, job, progress)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}{resume_hint(job)}"
        write_json(out / "error.json", {"error": error})
        progress(event="error", error=error)
        raise
    write_json(out / "result.json", result)
    progress(event="done")


def _tune_pulls(job: FlowerJob) -> None:
    """Shorten Flower's 1 s retry of early object pulls in this ServerApp process (tested Flower only).

    A reply is announced before all its objects are pushed; each early pull then waits 1 s (measured:
    0.7-1.5 s of every phase). The patch is :func:`fast_node.shorten_pull_backoff`; elsewhere: stock.
    """
    from fl.runners.flower import fast_node

    if job.poll_interval > 0 and fast_node.patch_supported():
        fast_node.shorten_pull_backoff(max(job.poll_interval, 0.05))


def resume_hint(job: FlowerJob) -> str:
    """How to continue a train job that stopped mid-run (a SuperLink restart, a crash), if it checkpointed."""
    from fl.training.server import CHECKPOINT

    if job.task != "train" or not job.checkpoint or not (Path(job.checkpoint) / CHECKPOINT).is_file():
        return ""
    return f"; the rounds done are checkpointed: continue with privagg flower run/local --resume {job.checkpoint}"


def serve(grid: Grid, job: FlowerJob, progress: Progress) -> dict[str, Any]:
    """Discover the SuperNodes, run the job's rounds over them; return the result (``result.json``).

    With ``job.checkpoint`` the server side is saved after every round; with ``job.resume`` it continues
    from that checkpoint at the next round (same noise, sampling and ledger, so the run ends as an
    uninterrupted one would). The nodes still refuse any round they already contributed to.
    """
    t_join = time.perf_counter()
    hellos: dict[int, Any] = {}
    nodes = _discover(grid, job, hellos)
    tr = GridTransport(grid, job, nodes)
    tr.progress = progress
    progress(event="joined", nodes={str(c): n for c, n in nodes.items()}, seconds=time.perf_counter() - t_join)
    fed: Any = None
    own_start: dict[str, Any] = {}
    names: dict[int, str] = {}
    if job.task == "train":
        fed, own_start, names = _start_federation(job, tr, hellos)
    first = _resume(fed, job, progress) if fed is not None else 1
    t_rounds = time.perf_counter()
    todo = range(first, job.num_rounds + 1)
    if fed is None and job.rounds_in_flight > 1:
        rounds, stopped = _rounds_in_flight(tr, job, progress, todo), None
    elif job.rounds_in_flight > 1:
        from fl.runners.flower.ahead import train_rounds_ahead

        rounds, stopped = train_rounds_ahead(tr, job, fed, progress, todo, own_start=own_start, names=names)
    else:
        rounds, stopped = _sequential(tr, job, fed, progress, todo, own_start=own_start, names=names)
    return _result(job, nodes=nodes, rounds=rounds, exchanges=tr.log, fed=fed, stopped=stopped, own=bool(names),
                   seconds=time.perf_counter() - t_rounds)


def _sequential(tr: GridTransport, job: FlowerJob, fed: Any, progress: Progress, todo: range, *,
                own_start: Mapping[str, Any], names: Mapping[int, str]) -> tuple[list[dict[str, Any]], str | None]:
    """The rounds one after another (checkpointed after each, for a train job); their records and why the
    run stopped early (the DP budget), if it did."""
    rounds: list[dict[str, Any]] = []
    for r in todo:
        progress(event="round", round=r)
        try:
            record = _one_round(tr, job, fed, r, own_start=own_start, names=names)
        except BudgetExhaustedError as exc:
            return rounds, f"stopped before round {r}: {exc}"
        rounds.append(record)
        progress(event="round_done", **record)
        if fed is not None and job.checkpoint:
            fed.save(Path(job.checkpoint))  # atomic: a crash mid-write leaves the previous round's file whole
    return rounds, None


def _rounds_in_flight(tr: GridTransport, job: FlowerJob, progress: Progress, rounds: range) -> list[dict[str, Any]]:
    """A sum job's rounds, up to ``job.rounds_in_flight`` sharing each Flower exchange (:mod:`.pipeline`)."""
    from fl.runners.flower.pipeline import Bundler, Lane

    def work(lane: Lane) -> dict[str, Any]:
        progress(event="round", round=lane.round)
        record = _one_round(lane, job, None, lane.round, own_start={}, names={})  # type: ignore[arg-type]
        progress(event="round_done", **record)
        return record

    bundler = Bundler(tr, job.rounds_in_flight)
    records = bundler.run(list(rounds), work)
    log.info("%d rounds in %d Flower exchanges (%d in flight)", len(records), bundler.bundles, job.rounds_in_flight)
    return records


def _resume(fed: Any, job: FlowerJob, progress: Progress) -> int:
    """The first round to run: 1, or the checkpoint's next round when the job resumes."""
    if not job.resume:
        return 1
    fed.load(Path(job.checkpoint or ""))
    log.info("resumed from %s at round %d", job.checkpoint, fed.next_round)
    progress(event="resumed", round=fed.next_round)
    return int(fed.next_round)


def _one_round(tr: GridTransport, job: FlowerJob, fed: Any, r: int, *, own_start: Mapping[str, Any],
               names: Mapping[int, str]) -> dict[str, Any]:
    """Run round ``r`` of a train (``fed``) or sum job; its record. ``BudgetExhaustedError`` before it.

    ``own_start``: fields every training start carries on the nodes' own data (the statistics release);
    ``names``: the site names by client id (then the record also lists the included sites by name)."""
    t_round = time.perf_counter()
    if fed is not None:
        planned = fed.sample(r)
        fed.server.check_budget(r, planned)
        ssum, spec, session = server_sum(fed.plan.pipeline.sum, job), fed.bound.sum_spec, fed.session(r)
        start = {"params": np.ascontiguousarray(fed.params, dtype=np.float64).tobytes(), **own_start}
    else:
        planned = tuple(range(job.clients))
        ssum, spec = sum_protocol(job)
        ssum, session, start = server_sum(ssum, job), os.urandom(16), {}
    record: dict[str, Any] = {"round": r, "planned": len(planned)}
    try:
        if not planned:
            raise NoUpdatesError("no client was sampled this round")
        rr = run_round(tr, ssum, spec, round=r, planned=planned, session=session, start_fields=start)
    except (AbortError, NoUpdatesError) as exc:  # a lost key holder: named, awaited, or the run stops
        why = keyholder.after_failed_round(tr, job, exc, round=r)
        return _record_failed_round(record, why, r=r, fed=fed, planned=planned)
    if fed is not None:
        from fl.runners.local import SumOutcome

        outcome = SumOutcome(rr.total, rr.included, rr.messages)
        record = fed.finish_round(r, planned, outcome, rr.results, rejected=rr.rejected)
    else:
        record.update(_checked_sum(job, r, rr.total, rr.included, spec))
    record = {**record, "included_ids": list(rr.included), "seconds": time.perf_counter() - t_round}
    if names:  # the same facts as included_ids, by site name
        record["included_sites"] = [names[c] for c in rr.included]
    return record


def _start_federation(job: FlowerJob, tr: GridTransport, hellos: Mapping[int, Any]) -> tuple[Any, dict[str, Any],
                                                                                             dict[int, str]]:
    """The server's :class:`~fl.training.loop.Federation` for a ``train`` job (torch limited to 2 threads).

    Returns it with the fields every training start carries and the site names by client id (both
    empty unless the nodes hold their own data: :func:`_own_federation`).
    """
    import torch

    from fl.training.loop import Federation

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if any("site" in h for h in hellos.values()):
        return _own_federation(job, tr, hellos)
    fed = Federation(train_config(job), stats=job_stats(job))
    keyholder.server_sum(fed.plan.pipeline.sum, job)  # a Paillier sum: only the key holder's public key
    if fed.config.dropout > 0:
        log.warning("--dropout simulates dropouts in memory; over Flower, real dropouts are used instead")
    return fed, {}, {}


NO_EVALUATION = ("no evaluation set: the server holds no data (give `privagg flower run --test-data CSV` to "
                 "evaluate the global model on the server's own rows)")


def _own_federation(job: FlowerJob, tr: GridTransport, hellos: Mapping[int, Any]) -> tuple[Any, dict[str, Any],
                                                                                           dict[int, str]]:
    """The server side of a run on the nodes' own data: it holds no training row, only the sites' n_k.

    The preprocessing is released once, here: by a statistics round over the nodes (round 0, the run's
    secure sum, each node adding its DP noise) or, with ``--standardize public``, from public ranges alone.
    """
    from fl.data.stats import public_statistics
    from fl.runners.flower import site
    from fl.training.loop import Federation

    if job.resume:
        raise RuntimeError("resuming a run on the nodes' own data is not supported yet (its statistics round "
                           "would release the nodes' data again): start the run afresh")
    if job.stats is not None:
        raise RuntimeError("the job carries a preprocessing release, but the nodes hold their own data; the "
                           "launcher cannot have computed it: write the job without stats")
    config = train_config(job)
    own = site.own_sites(hellos, config)
    test = site.server_test_frame(config, own.schema)
    classes = site.run_classes(own, test)
    if config.standardize == "public":
        stats = public_statistics(own.schema, bounds={c: (lo, hi) for c, lo, hi in config.feature_bounds},
                                  reference=test, categories={c: list(v) for c, v in config.categories},
                                  rows=sum(own.sizes))
    else:
        stats = _statistics_round(tr, config, own, test)
    fed = Federation(config, dataset=site.server_dataset(own, stats, test, classes), own_parts=True)
    if test is None:
        fed.server.evaluation = lambda model: {}  # no accuracy of nothing: the report says NO_EVALUATION
    return fed, site.own_start_fields(stats, own, classes), dict(own.names)


def _statistics_round(tr: GridTransport, config: Any, own: Any, test: Any) -> Any:
    """Round 0: every node's statistics vector through the run's secure sum; the one release."""
    from fl.data.stats import default_session, stats_pipeline
    from fl.runners.flower import site

    plan, fields = site.stats_request(config, own, test)
    ssum, _ = site._stats_parts(config, len(own.sizes))
    pipe = stats_pipeline(ssum, size=plan.size, cohort=len(own.sizes), bound=plan.bound)
    session = default_session(config.seed if config.insecure_seeded_randomness else None)
    if tr.progress is not None:
        tr.progress(event="round", round=0, statistics=True)
    try:
        rr = run_round(tr, ssum, pipe.sum_spec, round=0, planned=list(range(len(own.sizes))), session=session,
                       start_fields=fields)
    except AbortError as exc:
        raise RuntimeError(f"the statistics round (round 0) failed: {exc}; every site must contribute") from exc
    return site.release_from_total(plan, config, rr.total, rr.included, test)


def _record_failed_round(record: dict[str, Any], exc: Exception, *, r: int, fed: Any,
                         planned: Sequence[int]) -> dict[str, Any]:
    """The record of a round that aborted or had no client; a training job also evaluates and logs it."""
    log.warning("round %d: %s", r, exc)
    key = "aborted" if isinstance(exc, AbortError) else "skipped"
    if fed is not None:  # the server side records it and moves on (a checkpoint resumes after it)
        return dict(fed.server.release_nothing(r, planned, key, str(exc)))
    return {**record, "included": 0, key: str(exc)}


def _checked_sum(
    job: FlowerJob, r: int, total: NDArray[Any], included: Sequence[int], spec: ValueSpec
) -> dict[str, Any]:
    """Check a ``sum`` job's secure sum against the sum of the included clients' public test words.

    Raises RuntimeError when they differ; else returns the record fields ``included`` and ``exact``.
    """
    assert spec.modulus is not None
    expect = np.zeros(job.size, dtype=np.uint64)
    for cid in included:
        expect += sum_value(job, r, cid)
    expect &= np.uint64(spec.modulus - 1)
    exact = bool(np.array_equal(np.asarray(total, dtype=np.uint64), expect))
    if not exact:
        raise RuntimeError(f"round {r}: the secure sum differs from the sum of the included inputs")
    return {"included": len(included), "exact": exact}


def _result(
    job: FlowerJob, *, nodes: Mapping[int, int], rounds: list[dict[str, Any]], exchanges: Sequence[Any], fed: Any,
    stopped: str | None, own: bool = False, seconds: float = 0.0,
) -> dict[str, Any]:
    """The job's result: job, nodes, rounds and exchanges; a training job's report and saved ``params.npy``."""
    out = Path(job.out)
    result: dict[str, Any] = {
        "job": asdict(job),
        "nodes": {str(c): n for c, n in nodes.items()},
        "rounds": rounds,
        "exchanges": [asdict(e) for e in exchanges],
        "seconds": seconds,  # the rounds' wall time, from the first round's start (rounds in flight overlap)
    }
    if fed is not None:
        np.save(out / "params.npy", fed.params)
        # on the nodes' own data the server has no per-site rows: no per-site metrics (under DP they would leak)
        report = fed.server.report(baseline=None, per_client={}, stopped=stopped) if own else \
            fed.report(baseline=None, stopped=stopped)
        if own and len(fed.server.x_test) == 0:
            report["evaluation"] = NO_EVALUATION
        result["report"] = report
        result["params_file"] = str(out / "params.npy")
    return result
