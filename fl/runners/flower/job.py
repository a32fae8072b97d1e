"""A privagg Flower job and the record shapes both apps share.

A :class:`FlowerJob` travels to every process as JSON in the app's run config (never pickle; unknown
fields are refused, nothing in it selects code). The record helpers parse what a SuperNode or the
ServerApp sends strictly: anything malformed is a :class:`BadReplyError`, and its sender is dropped for
the round, never the run. The ``sum`` task's public test vectors live here too (both sides compute them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from numpy.typing import NDArray

from fl.runners.flower.policy import NodePolicy, PolicyError
from fl.spec import SecureSum, TrainResult, ValueSpec
from secagg import wire
from secagg.machine import Message as ProtocolMessage
from secagg.ring import value_bits_for

log = logging.getLogger(__name__)


RECORD = "privagg"
HELLO = "query.privagg_hello"
START = "train.privagg_start"
STEP = "query.privagg_step"
KEYHOLDER = "query.privagg_keyholder"
BUNDLE = "query.privagg_bundle"
BUNDLE_RECORD = "privagg.bundle"
"""A bundle's index record: the kind (``start``/``step``) and round of each part (:mod:`.pipeline`)."""
MAX_IN_FLIGHT = 4
"""The most rounds a sum job may have in flight, hence the most parts a node accepts in one bundle."""
JOB_KEY = "job"


@dataclass(frozen=True)
class FlowerJob:
    """What a Flower run does; travels to every process as JSON in the app's run config.

    ``task="train"``: ``config`` is a :class:`fl.config.TrainConfig` as a dict. ``task="sum"``: each of
    ``clients`` SuperNodes contributes a public pseudo-random vector of ``size`` words for ``rounds``
    rounds through ``protocol`` (``secagg+``, ``secagg``, ``paillier`` or ``plain``) and the server checks the sum.
    ``out``: directory where the ServerApp writes ``progress.jsonl``, ``result.json`` (or
    ``error.json``) and ``params.npy``. Timeouts are seconds: ``join_timeout`` to wait for the
    SuperNodes, ``start_timeout`` for the first phase of a round (local training), ``phase_timeout`` for
    every other phase (a SuperNode that misses it has dropped). ``poll_interval``: seconds between
    pulls of replies; ``0`` uses Flower's own ``Grid.send_and_receive`` (which polls every 3 s).
    ``paillier_public_key``: the key-holder node's Paillier public key (JSON) a ``paillier`` job encrypts
    to (:mod:`fl.runners.flower.keyholder`); only public: the private key never leaves the key holder.
    """

    task: Literal["train", "sum"] = "train"
    out: str = "out/flower"
    config: Mapping[str, Any] = field(default_factory=dict)
    clients: int = 3
    size: int = 100_000
    rounds: int = 1
    seed: int = 0
    protocol: str = "secagg+"
    threshold: float = 0.7
    ring_bits: int = 32
    join_timeout: float = 60.0
    start_timeout: float = 120.0
    phase_timeout: float = 30.0
    poll_interval: float = 0.05
    # the preprocessing release (fl.data.stats.FederatedStats.to_json), made ONCE when the job is written:
    # the ServerApp and every node standardize with it, so the statistics are released (and charged) once
    stats: Mapping[str, Any] | None = None
    # authenticated SecAgg(+) (fl.runners.flower.identity): the sum task's flag (a train job's is in its privacy
    # config) and the consortium's roster of PUBLIC identity keys; each node refuses a roster other than its own
    authenticated: bool = False
    roster: Mapping[str, Any] | None = None
    paillier_public_key: str | None = None
    # checkpoint/resume of a train job: the ServerApp saves its side into ``checkpoint`` (a directory on the
    # server's host) after every round; ``resume`` continues from it. ``job_id`` names the job across runs
    # (kept on resume): each node records, per job id, the last round it contributed to, in its own files.
    checkpoint: str | None = None
    resume: bool = False
    job_id: str = ""
    # a SecAgg(+) sum job's rounds are independent: up to MAX_IN_FLIGHT of them share each Flower exchange
    # (fl.runners.flower.pipeline); 1 runs them one after another. A train job is always sequential.
    rounds_in_flight: int = 1

    def releases_id(self) -> str:
        """What a node's round record is keyed by: the job id, or (none given) a digest of what is trained.

        Excludes where results go and the timing and resume fields, so a resumed job (or the same job sent
        again) is the same job to the nodes: a round they contributed to is never contributed again.
        """
        if self.job_id:
            return f"id:{self.job_id}"
        core = {k: v for k, v in asdict(self).items()
                if k not in ("out", "checkpoint", "resume", "join_timeout", "start_timeout", "phase_timeout",
                             "poll_interval", "rounds_in_flight")}
        from secagg._hazmat.pki import sha256_hex

        return "sha256:" + sha256_hex(json.dumps(core, sort_keys=True, default=str).encode())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FlowerJob:
        """Parse a job; unknown fields (e.g. a ``codec`` naming a module) and wrong types are refused."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise JobError(f"the Flower job is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise JobError("the Flower job must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobError(f"unknown Flower job field(s) {unknown}; the app was written by another privagg version "
                           "(nothing in a job selects code: the wire codec is always secagg.wire)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise JobError(f"bad Flower job: {exc}") from exc

    def __post_init__(self) -> None:
        if self.task not in ("train", "sum"):
            raise JobError(f"unknown Flower job task {self.task!r}: train or sum")
        if not isinstance(self.config, Mapping):
            raise JobError("the Flower job's config must be an object")
        if self.resume and not self.checkpoint:
            raise JobError("resume needs the checkpoint directory (checkpoint=DIR, --checkpoint-dir DIR)")
        if self.checkpoint is not None and self.task != "train":
            raise JobError("checkpoints are for train jobs; a sum job has no state to resume")
        if self.stats is not None and not isinstance(self.stats, Mapping):
            raise JobError("the Flower job's stats must be an object (the preprocessing release)")
        if not isinstance(self.authenticated, bool):
            raise JobError("the Flower job's authenticated flag must be true or false")
        if self.roster is not None and not isinstance(self.roster, Mapping):
            raise JobError("the Flower job's roster must be an object (`privagg flower roster`)")
        self._check_in_flight()

    def _check_in_flight(self) -> None:
        n = self.rounds_in_flight
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IN_FLIGHT:
            raise JobError(f"rounds_in_flight must be an integer in 1..{MAX_IN_FLIGHT}, got {n!r}")
        if n > 1 and self.task == "sum" and self.protocol not in ("secagg", "secagg+"):
            raise JobError("rounds in flight are for SecAgg/SecAgg+ sums (their key agreement needs no value); use "
                           "rounds_in_flight=1")
        if n > 2 and self.task == "train":
            raise JobError("a training round needs the model the previous round's sum produces: at most its key "
                           "agreement runs ahead (rounds_in_flight=2)")

    @property
    def num_clients(self) -> int:
        if self.task == "train":
            return int(self.config.get("clients", 0))
        return self.clients

    @property
    def num_rounds(self) -> int:
        return int(self.config.get("rounds", 0)) if self.task == "train" else self.rounds


class JobError(ValueError):
    """A Flower job this process cannot parse (malformed, unknown fields, wrong types)."""


def load_job(context: Context) -> FlowerJob:
    text = context.run_config.get(JOB_KEY)
    if not isinstance(text, str):
        raise JobError("the Flower app has no privagg job in its run config; start runs with `privagg flower run`")
    return FlowerJob.from_json(text)


def node_policy(context: Context) -> NodePolicy:
    """This node's own policy, from its ``--node-config`` (never from the job)."""
    try:
        return NodePolicy.from_node_config(context.node_config)
    except ValueError as exc:
        raise PolicyError(f"this node's policy is unusable: {exc}") from exc


def job_stats(job: FlowerJob) -> Any:
    """The job's one preprocessing release (``None``: an older job; each process would then compute its own)."""
    if job.stats is None:
        return None
    from fl.data.stats import FederatedStats

    return FederatedStats.from_json(job.stats)


def sum_protocol(job: FlowerJob) -> tuple[SecureSum, ValueSpec]:
    """The secure sum and ring spec of a ``sum`` job (values of ``ring_bits - log2(cohort)`` bits)."""
    vbits = value_bits_for(job.ring_bits, max(1, job.clients))
    spec = ValueSpec(size=job.size, cohort=job.clients, domain="ring", modulus=1 << job.ring_bits, value_bits=vbits)
    ssum = sum_of(job)
    return ssum, ssum.bind(spec)


def sum_of(job: FlowerJob) -> SecureSum:
    """The (unbound) secure sum a ``sum`` job names."""
    ssum: SecureSum
    if job.protocol in ("secagg", "secagg+"):
        from fl.sums.secagg import SecAgg, SecAggPlus

        auth = job.authenticated
        ssum = (SecAgg(threshold=job.threshold, authenticated=auth) if job.protocol == "secagg"
                else SecAggPlus(threshold=job.threshold, authenticated=auth))
    elif job.authenticated:
        raise JobError(f"authenticated mode is for secagg and secagg+, not {job.protocol!r}")
    elif job.protocol == "plain":
        from fl.sums.plain import PlainSum

        ssum = PlainSum(min_clients=max(1, math.ceil(job.threshold * job.clients)))
    elif job.protocol == "paillier":
        from fl.runners.flower.keyholder import paillier_sum

        ssum = paillier_sum(job)
    else:
        raise JobError(f"unknown protocol {job.protocol!r}: choose secagg+, secagg, paillier or plain")
    return ssum


def sum_value(job: FlowerJob, round: int, cid: int) -> NDArray[np.uint64]:
    """Client ``cid``'s public test vector for ``round`` (non-negative, below 2^(value_bits-1))."""
    from dp.rng import SecureRandom

    _, spec = sum_protocol(job)
    assert spec.value_bits is not None
    words = SecureRandom.for_testing(f"flower-sum:{job.seed}:{round}:{cid}").uint64(job.size)
    return words >> np.uint64(64 - (spec.value_bits - 1))


def train_config(job: FlowerJob) -> Any:
    from fl.config import PrivacyConfig, TrainConfig

    data = dict(job.config)
    privacy = PrivacyConfig(**data.pop("privacy", {}))
    if "aclip" in privacy.tokens():  # its state (the round's clip norm) is not yet sent to the nodes
        raise JobError("aclip (adaptive clipping) runs in memory only for now; over Flower use clip")
    return TrainConfig(**data, privacy=privacy)


def record(content: RecordDict, key: str = RECORD) -> Any:
    """Our ``ConfigRecord`` in a message or state, typed loosely: each value is checked where it is used."""
    return content[key]


class BadReplyError(ValueError):
    """A SuperNode's reply that does not have the shape of ours: that client is dropped for the round."""


def reply_record(reply: Message) -> Any:
    """The ``privagg`` record of a reply, or :class:`BadReplyError` (missing, or not a ConfigRecord)."""
    try:
        rec = reply.content[RECORD]
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadReplyError(f"no {RECORD!r} record in the reply") from exc
    if not isinstance(rec, ConfigRecord):
        raise BadReplyError(f"the {RECORD!r} record is a {type(rec).__name__}, not a ConfigRecord")
    return rec


def part_key(i: int) -> str:
    """The record of part ``i`` of a bundled message or reply."""
    return f"{RECORD}.{i}"


def bundle_parts(content: RecordDict, job: FlowerJob) -> list[tuple[str, Any]]:
    """A bundle's parts as ``(kind, record)`` in order, checked: at most the job's rounds in flight, each
    round at most once, only ``start``/``step`` parts, each a ConfigRecord. Else :class:`JobError`."""
    try:
        index: Any = content[BUNDLE_RECORD]
        kinds, rounds = list(index["kinds"]), list(index["rounds"])
    except (KeyError, TypeError) as exc:
        raise JobError(f"a bundled message without its index record {BUNDLE_RECORD!r}") from exc
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in rounds):
        raise JobError("a bundle's rounds must be integers")
    if not 1 <= len(kinds) <= job.rounds_in_flight or len(rounds) != len(kinds):
        raise JobError(f"a bundle of {len(kinds)} part(s); this job has at most {job.rounds_in_flight} round(s) in "
                       "flight")
    if any(k not in ("start", "step") for k in kinds) or len(set(rounds)) != len(rounds):
        raise JobError("a bundle carries start and step parts, each of a different round")
    parts = []
    for i, kind in enumerate(kinds):
        rec = content.get(part_key(i))
        if not isinstance(rec, ConfigRecord) or rec.get("round") != rounds[i]:
            raise JobError(f"part {i} of the bundle is missing or names another round than its index")
        parts.append((str(kind), rec))
    return parts


def compute_s(rec: Any) -> float:
    """The client's reported compute seconds (timing only; anything malformed counts as 0)."""
    v = rec.get("compute_s", 0.0)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else 0.0


TRAIN_RESULT_TYPES: dict[str, tuple[type, ...]] = {"num_samples": (int,), "steps": (int,), "loss": (int, float),
                                                    "extra": (dict,)}


def train_result(raw: Any) -> TrainResult:
    """Parse a client's training result strictly: a JSON object with exactly TrainResult's typed fields."""
    if not isinstance(raw, str):
        raise BadReplyError("the training result is not a JSON string")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadReplyError(f"the training result is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadReplyError("the training result is not a JSON object")
    missing = {"num_samples", "steps", "loss"} - set(data)
    unknown = set(data) - set(TRAIN_RESULT_TYPES)
    if missing or unknown:
        raise BadReplyError(f"training result fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
    for key, types in TRAIN_RESULT_TYPES.items():
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], types)):
            raise BadReplyError(f"training result {key} has type {type(data[key]).__name__}")
    if data["num_samples"] < 0 or data["steps"] < 0:
        raise BadReplyError("training result counts must be >= 0")
    return TrainResult(**data)


def decode_msgs(rec: Any, *, max_values: int = wire.MAX_STREAM_ITEMS) -> list[ProtocolMessage]:
    """The protocol messages in a record (``msgs``: :mod:`secagg.wire` frames, in order).

    A message whose array is larger than one frame carries (2^24 values: a large model's masked input)
    arrives as a stream of frames; ``max_values`` is the receiver's own bound on a streamed array (e.g. a
    few words per value of the round's vector), so a sender cannot make it allocate more than it expects.
    """
    raw = rec.get("msgs", [])
    if not isinstance(raw, list) or not all(isinstance(b, bytes) for b in raw):
        raise BadReplyError("'msgs' must be a list of byte strings")
    return wire.decode_frames(raw, max_total=max_values)


def encode_msgs(msgs: Iterable[ProtocolMessage]) -> dict[str, Any]:
    """``{"msgs": frames}`` for a record (nothing when there is no message); large arrays are streamed."""
    data = wire.encode_frames(msgs)
    return {"msgs": data} if data else {}


def stream_bound(spec: ValueSpec) -> int:
    """The most array items one message of a round over ``spec`` may stream: 8 per value, plus slack.

    Covers masked inputs packed to any ring width up to 64 bits (bytes) and any word layout; a reply that
    declares more is refused before anything is allocated.
    """
    return 8 * max(1, spec.size) + 4096
