"""The privagg ClientApp: one SuperNode's side of a job (:data:`client_app`).

Three messages: ``privagg_hello`` (which partition/site this node is, once the job meets its policy),
``privagg_start`` (train or draw the round's vector, start the client machine) and ``privagg_step`` (feed a
later phase to the stored machine). Between messages the machine lives only as a sealed, versioned
snapshot in the node's state (:mod:`fl.runners.flower.state`). The node keeps one
:class:`~fl.training.client.ClientSide` per run and contributes to each planned round at most once.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from fl.runners.flower import identity, keyholder
from fl.runners.flower import state as _state
from fl.runners.flower.job import (
    BUNDLE,
    RECORD,
    START,
    STEP,
    FlowerJob,
    JobError,
    bundle_parts,
    decode_msgs,
    encode_msgs,
    job_stats,
    load_job,
    node_policy,
    part_key,
    record,
    sum_of,
    sum_protocol,
    sum_value,
    train_config,
)
from fl.runners.flower.policy import PolicyError, protocol_word, sum_terms, train_terms
from fl.runners.flower.site import OWN_KEY
from secagg.errors import CodecError, ProtocolError
from secagg.machine import Message as ProtocolMessage
from secagg.paillier import PaillierClient
from secagg.plain import PlainClient

log = logging.getLogger(__name__)


def _refuse_weaker(context: Context, job: FlowerJob, cid: int, rec: Any = None) -> None:
    """Raise :class:`PolicyError` if ``job`` asks this node for less than its policy allows.

    A node with its own data checks the statistics round's terms until a start carries the run's
    preprocessing release (``rec``); from then on the training terms of its client side.
    """
    if job.task == "train" and _own_table(context, job) is not None and (rec is None or OWN_KEY not in rec):
        terms = _stats_terms(job)
    elif job.task == "train":
        terms = train_terms(_client_side(context, job, cid, rec), cid)
    else:
        terms = sum_terms(sum_of(job), job.clients)  # before binding: the policy's refusal is the one reported
    node_policy(context).check(terms)


def _stats_terms(job: FlowerJob) -> Any:
    """The terms of an own-data job's statistics round (its sum over every site, its DP noise)."""
    from dataclasses import replace

    from fl.runners.flower.site import _stats_parts

    config = train_config(job)
    ssum, privacy = _stats_parts(config, job.num_clients)
    return replace(sum_terms(ssum, job.num_clients), own_noise=privacy.noise_multiplier if privacy else None,
                   clip=config.privacy.clip, epsilon=config.privacy.epsilon,
                   seeded=bool(config.insecure_seeded_randomness))


_CLIENT_SIDES: dict[tuple[int, str, int, str], Any] = {}
"""This process's client side per (run id, job text, partition, release): built once, kept for the whole run."""
_TABLES: dict[tuple[int, str], Any] = {}
"""This process's own table (its node's CSV) per (run id, job text)."""


def _own_table(context: Context, job: FlowerJob) -> Any:
    """This node's own table (:func:`fl.runners.flower.site.own_table`), read once per process and run."""
    from fl.runners.flower import site

    if site.node_site(context.node_config) is None:
        return None
    key = (int(context.run_id), job.to_json())
    if key not in _TABLES:
        _TABLES.clear()
        try:
            _TABLES[key] = site.own_table(context.node_config, train_config(job))
        except ValueError as exc:
            raise PolicyError(f"this node's own data is unusable for the job: {exc}") from exc
    return _TABLES[key]


def _client_side(context: Context, job: FlowerJob, cid: int, rec: Any = None) -> Any:
    """This node's :class:`~fl.training.client.ClientSide` for the run (one site: its data, model, trainer).

    Built once per process and run, keyed by run id and the job's exact text (a different job under the
    same run id builds a new one); a cold process (Flower may start one per message) rebuilds it
    deterministically from the job's config alone, reusing the noise calibrations this node memoised in
    its own state (:mod:`fl.runners.flower.calibrations`). Only the latest run is kept. A node with its
    own data builds it from its own table and the release the start ``rec`` carries (pinned per run).
    """
    own = _own_release(context, rec) if _own_table(context, job) is not None else ""
    key = (int(context.run_id), job.to_json(), cid, own)
    side = _CLIENT_SIDES.get(key)
    if side is None:
        from fl.runners.flower.calibrations import NodeCalibrations
        from fl.training.client import ClientSide

        _CLIENT_SIDES.clear()
        if own:
            from fl.runners.flower.site import own_client_side

            side = own_client_side(_own_table(context, job), train_config(job), cid, own,
                                   calibrate=NodeCalibrations(context))
        else:
            side = ClientSide.for_site(train_config(job), cid, calibrate=NodeCalibrations(context),
                                       stats=job_stats(job))
        _CLIENT_SIDES[key] = side
    return side


_OWN = "privagg-own"


def _own_release(context: Context, rec: Any) -> str:
    """The start's preprocessing release for an own-data node; the first one of a run is pinned.

    A server that switched the release (or the sites' n_k) between rounds would change what this node's
    update means; any later start must carry exactly the first one.
    """
    raw = rec.get(OWN_KEY) if rec is not None else None
    if not isinstance(raw, str):
        raise PolicyError("this SuperNode trains on its own data and the start carries no preprocessing release; "
                          "the ServerApp must run the statistics round first (privagg flower run)")
    pinned = context.state[_OWN]["release"] if _OWN in context.state else None
    if pinned is None:
        context.state[_OWN] = ConfigRecord({"release": raw})  # a few kB of public JSON: kept verbatim
    elif pinned != raw:
        raise PolicyError("the start carries another preprocessing release than this run's first one; refusing")
    return raw


def _guarded(fn: Any) -> Any:
    """Turn a :class:`PolicyError` (or a job this node cannot parse) into a logged error reply."""

    @functools.wraps(fn)
    def run(msg: Message, context: Context) -> Message:
        try:
            return cast(Message, fn(msg, context))
        except (PolicyError, JobError) as exc:
            log.error("refusing %s: %s", msg.metadata.message_type, exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                           reply_to=msg)

    return run


def _identities(context: Context, job: FlowerJob, cid: int) -> Any:
    """This node's own identity keys for an authenticated job (:func:`fl.runners.flower.identity.node_identities`)."""
    return identity.node_identities(context.node_config, node_policy(context), job, cid)


def _state_key(context: Context) -> bytes:
    """This node's state-sealing key (see :mod:`fl.runners.flower.state`)."""
    return _state.state_key(context)


# ---------------------------------------------------------------------------------------------- client side
client_app = ClientApp()


def _partition(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise RuntimeError(
            "this SuperNode has no integer partition-id; start it with `privagg flower supernode --partition I/N`"
        )
    return pid


def _reply(msg: Message, fields: dict[str, Any]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(fields)}), reply_to=msg)


def _incoming(msg: Message) -> list[ProtocolMessage]:
    return decode_msgs(record(msg.content))


_ROUNDS = "privagg-rounds"


def _claim_round(context: Context, job: FlowerJob, rnd: int) -> None:
    """Contribute to each planned round of a job at most once, in increasing order (the node's own record).

    The DP noise of a job is calibrated for its planned rounds; a server that opened a round twice, or
    more rounds than planned, would get more releases of this node's data than the budget covers. The
    record is kept in the run's state AND in the node's own files, keyed by the job (so a resumed job, a
    new run of the same job, or a restarted SuperNode cannot replay a round either).
    """
    planned = job.num_rounds
    if not 1 <= rnd <= planned:
        raise PolicyError(f"round {rnd} is outside the job's planned rounds 1..{planned}")
    in_run = int(context.state[_ROUNDS]["last"]) if _ROUNDS in context.state else 0  # type: ignore[arg-type]
    train = job.task == "train"  # a sum job's vectors are public test data: nothing to guard across runs
    last = max(in_run, _state.last_released(context, job.releases_id()) if train else 0)
    if rnd <= last:
        raise PolicyError(f"this node already contributed to round {last} of this job; round {rnd} again would "
                          "release its data more often than the job's DP budget covers")
    if train:
        _state.record_released(context, job.releases_id(), rnd)
    context.state[_ROUNDS] = ConfigRecord({"last": rnd})


@client_app.query("privagg_hello")
@_guarded
def _hello(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client id) this SuperNode owns, once the job meets its policy."""
    _state_key(context)  # fail at join time, not mid-round, when the node cannot keep state
    if keyholder.is_key_holder(context):
        return _reply(msg, keyholder.hello(context))
    cid = _partition(context)
    job = load_job(context)
    own = _own_data(context, job)  # first: the policy check of a train job builds (loads) its data set
    _refuse_weaker(context, job, cid)
    keyholder.check_client_key(context, job)
    _identities(context, job, cid)  # an authenticated job: own key matches the roster, the job's roster is ours
    n = context.node_config.get("num-partitions", -1)
    return _reply(msg, {"cid": cid, "num": int(n) if isinstance(n, int) else -1, **own})


def _own_data(context: Context, job: FlowerJob) -> dict[str, Any]:
    """This node's site and columns for the hello (:mod:`fl.runners.flower.site`); never the bundled set.

    For a train job also its table's public metadata (schema, n_k, label values: :func:`site.own_hello`),
    read from ONLY the file its own node config names.
    """
    from fl.runners.flower import site

    try:
        fields = site.hello_fields(context.node_config)
    except ValueError as exc:
        raise PolicyError(f"this node's own data is unusable: {exc}") from exc
    if fields and job.task == "train":
        fields.update(site.own_hello(_own_table(context, job), train_config(job), job.num_clients))
    return fields


def _params(raw: Any) -> NDArray[np.float64]:
    """The global model the server sent (float64 bytes), as one private copy (the record's bytes stay as sent)."""
    if not isinstance(raw, bytes) or len(raw) % 8:
        raise ProtocolError("the global model must be float64 bytes (a multiple of 8 bytes long)")
    return np.frombuffer(raw, dtype=np.float64).copy()


_STATS = "privagg-stats"


def _stats_start(msg: Message, context: Context, job: FlowerJob, cid: int) -> Message:
    """Round 0 of an own-data run: this node's statistics vector, noised by this node, into the secure sum.

    At most once per run and before any training round: each request is a release of this node's data.
    """
    from fl.runners.flower.site import STATS_KEY, stats_contribution

    t0 = time.perf_counter()
    rec = record(msg.content)
    table = _own_table(context, job)
    if table is None or job.task != "train":
        raise PolicyError("a statistics round is only for a train job on nodes with their own data")
    _refuse_weaker(context, job, cid)
    if _STATS in context.state or _ROUNDS in context.state:
        raise PolicyError("this node already released its statistics (or started training) in this run; a second "
                          "statistics round would release its data more often than the job's DP budget covers")
    context.state[_STATS] = ConfigRecord({"done": 1})
    session, rnd = bytes(rec["session"]), int(rec["round"])
    if rnd != 0:
        raise PolicyError(f"the statistics round is round 0, not {rnd}")
    try:
        ssum, spec, value = stats_contribution(table, train_config(job), cid, job.num_clients, rec[STATS_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(f"malformed statistics request: {exc}") from exc
    machine = ssum.client(cid, value, spec=spec, session=session, round=0)
    out = machine.start()
    for m in _incoming(msg):
        out += machine.receive(m)
    _state.clear(context, 0)
    if not isinstance(machine, PlainClient):
        _state.store(context, machine, session=session, round=0, step=0)
    return _reply(msg, {**encode_msgs(out), "compute_s": time.perf_counter() - t0})


@client_app.train("privagg_start")
@_guarded
def _start(msg: Message, context: Context) -> Message:
    """Round opens: check the job against this node's policy, train or draw the vector, start the machine."""
    keyholder.refuse_client_message(context, START)
    job = load_job(context)
    rec = record(msg.content)
    from fl.runners.flower.site import STATS_KEY

    if STATS_KEY in rec:
        return _stats_start(msg, context, job, _partition(context))
    return _reply(msg, _start_fields(context, job, rec))


def _start_fields(context: Context, job: FlowerJob, rec: Any) -> dict[str, Any]:
    """A start's reply fields: the machine's first messages (and the training result of a train job)."""
    t0 = time.perf_counter()
    cid = _partition(context)
    rnd = int(rec["round"])
    session = bytes(rec["session"])
    extra: dict[str, Any] = {}
    if job.task == "train" and job.rounds_in_flight > 1:  # keys now; the model comes with the masked phase
        side = _client_side(context, job, cid, rec)
        _refuse_weaker(context, job, cid, rec)
        value, ssum, spec = None, side.plan.pipeline.sum, side.bound.sum_spec
        if protocol_word(ssum) not in ("secagg", "secagg+"):
            raise PolicyError("key agreement ahead of the model (rounds_in_flight=2) is for SecAgg/SecAgg+ only")
    elif job.task == "train":
        trained = _train(context, job, cid, rec, rnd)
        if "rejected" in trained:
            return trained
        value, ssum, spec = trained.pop("value"), trained.pop("ssum"), trained.pop("spec")
        extra.update(trained)
    else:
        _refuse_weaker(context, job, cid)
        _claim_round(context, job, rnd)
        ssum, spec = sum_protocol(job)
        value = sum_value(job, rnd, cid)
    ssum = keyholder.client_sum(ssum, context, job, spec=spec, session=session, round=rnd)
    ssum = identity.client_sum(ssum, _identities(context, job, cid))
    machine = ssum.client(cid, value, spec=spec, session=session, round=rnd)
    out = machine.start()
    for m in decode_msgs(rec):
        out += machine.receive(m)
    _state.clear(context, rnd)
    if not isinstance(machine, PlainClient | PaillierClient):  # done once it has sent its value
        _state.store(context, machine, session=session, round=rnd, step=0)
    extra["compute_s"] = time.perf_counter() - t0
    return {**encode_msgs(out), **extra}


def _train(context: Context, job: FlowerJob, cid: int, rec: Any, rnd: int) -> dict[str, Any]:
    """Train this round on the node's data: ``{"rejected": why}`` or the value, its sum and spec, the result."""
    import torch

    from fl.errors import NonFiniteUpdateError

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    side = _client_side(context, job, cid, rec)
    _refuse_weaker(context, job, cid, rec)
    _claim_round(context, job, rnd)
    params = _params(rec["params"])
    try:
        value, result = side.update(params, rnd)
    except NonFiniteUpdateError as exc:
        log.warning("%s", exc)
        return {"rejected": str(exc)}
    return {"value": value, "ssum": side.plan.pipeline.sum, "spec": side.bound.sum_spec,
            "result": json.dumps(asdict(result), default=str)}


@client_app.query("privagg_step")
@_guarded
def _step(msg: Message, context: Context) -> Message:
    """One later phase: feed the server's messages to our stored machine, send back its replies."""
    keyholder.refuse_client_message(context, STEP)
    return _reply(msg, _step_fields(context, load_job(context), record(msg.content)))


def _step_fields(context: Context, job: FlowerJob, rec: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    cid = _partition(context)
    ids = _identities(context, job, cid)  # the snapshot never holds identity keys
    extra: dict[str, Any] = {}
    prepare = None
    if "params" in rec:  # a round whose keys were agreed ahead: train now, then mask (pipeline.ahead)
        if job.task != "train" or job.rounds_in_flight < 2:
            raise ProtocolError("a model in a protocol step is for train jobs whose key agreement runs ahead")
        trained = _train(context, job, cid, rec, int(rec["round"]))
        if "rejected" in trained:
            return trained  # no masked input: this node drops out of the round
        value = trained.pop("value")
        extra = {"result": trained["result"]}

        def prepare(machine: Any) -> None:
            machine.provide(value)
    out = _state.advance(context, decode_msgs(rec), session=bytes(rec["session"]), round=int(rec["round"]),
                         step=int(rec["step"]), final=bool(rec["final"]),
                         identity=None if ids is None else (ids.private(cid), ids.publics()), prepare=prepare)
    return {**encode_msgs(out), **extra, "compute_s": time.perf_counter() - t0}


@client_app.query("privagg_bundle")
@_guarded
def _bundle(msg: Message, context: Context) -> Message:
    """Several rounds' parts in one message (a sum job's rounds in flight: :mod:`fl.runners.flower.pipeline`).

    Each part is handled exactly as its lone start or step message would be, oldest round first; a part
    this node refuses becomes that round's error part (this node drops from that round only)."""
    keyholder.refuse_client_message(context, BUNDLE)
    job = load_job(context)
    out: dict[str, Any] = {}
    for i, (kind, rec) in enumerate(bundle_parts(msg.content, job)):
        try:
            fields = _start_fields(context, job, rec) if kind == "start" else _step_fields(context, job, rec)
        except (PolicyError, JobError, ProtocolError, CodecError, KeyError, TypeError, ValueError) as exc:
            log.error("refusing the %s part of round %s: %s", kind, rec.get("round"), exc)
            fields = {"error": f"{type(exc).__name__}: {exc}"}
        out[part_key(i)] = ConfigRecord(fields)
    return Message(RecordDict(out), reply_to=msg)


@client_app.query("privagg_keyholder")
@_guarded
def _keyholder(msg: Message, context: Context) -> Message:
    """The key holder's one job: decrypt the round's aggregate (:func:`fl.runners.flower.keyholder.decrypt`)."""
    t0 = time.perf_counter()
    return _reply(msg, {**keyholder.decrypt(msg, context), "compute_s": time.perf_counter() - t0})
