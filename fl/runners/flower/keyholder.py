"""Packed Paillier over Flower with the key holder as its own SuperNode: the aggregator never holds the key.

Three parties. The **key holder** runs ``privagg flower supernode --key-holder --paillier-key DIR/key.json``
(node config ``role="key-holder" paillier-key-file=...``; never chosen by the job). Its key pair was made
ONCE on its own machine by ``privagg flower paillier-keygen --out DIR`` (:func:`keygen`: ``key.json``
mode 0600, ``public.json`` for the operator and the sites). Its ClientApp answers only
``query.privagg_hello`` and ``query.privagg_keyholder``: it runs the existing
:class:`~secagg.paillier.PaillierKeyHolder` on the aggregate the server sends, and learns only the sum.
Its own policy pins ``min_summands`` (it decrypts no aggregate of fewer clients), it decrypts at most one
aggregate per planned round, in increasing order (its own record in the node state and, for a train
job, in its own files, so also after a restart), and it refuses a job or a ciphertext under a key
fingerprint that is not its own.

The **clients** encrypt to the public key the job carries (``FlowerJob.paillier_public_key``) only if its
fingerprint is the one THEIR policy pins (``NodePolicy.paillier_key_fingerprint``); a ``paillier`` job is
refused while a client pins none, since otherwise a server could name a key it holds itself. The
**aggregator** (the ServerApp) has only the public key: its :class:`~fl.sums.paillier.PaillierSum` adopts
it and can never generate or use a private key. Discovery finds exactly one key-holder node; the round's
``KEY_HOLDER`` messages go to it (:class:`~fl.runners.flower.link.PhaseLink`), and it is never a client
(no partition, no training, not in the cohort or the DP accounting). If it dies or stops answering, the
round aborts after the phase timeout with an error naming its node, and the server waits (the join
timeout) for it, also restarted under a new node id, before the next round; otherwise the run stops with
:class:`KeyHolderUnreachableError` saying how to resume (:func:`after_failed_round`).

What this does NOT stop (stated, not hidden): Paillier is malleable and the aggregate's summand count is
the server's word. A malicious server that forges the aggregate (one client's ciphertext multiplied by
encryptions of zero it made, claiming ``min_summands`` summands) gets that client's update decrypted;
stopping it needs authenticated clients (signed ciphertexts), as SecAgg's guarantee against a server
that simulates clients does. What is refused: fewer claimed summands than ``min_summands``, a second
decryption in a round, rounds beyond the plan, another key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl.runners.flower.job import (
    HELLO,
    KEYHOLDER,
    RECORD,
    BadReplyError,
    FlowerJob,
    JobError,
    decode_msgs,
    encode_msgs,
    load_job,
    node_policy,
    record,
    reply_record,
    train_config,
)
from fl.runners.flower.policy import PolicyError
from fl.spec import SecureSum
from secagg.errors import AbortError, CodecError, ProtocolError
from secagg.machine import KEY_HOLDER
from secagg.paillier import PaillierAggregate, PaillierKeyHolder, PaillierPrivateKey, PaillierPublicKey

if TYPE_CHECKING:
    from fl.runners.flower.link import GridTransport

__all__ = ["KEYHOLDER", "KEY_FILE_KEY", "KEY_HOLDER_ROLE", "ROLE_KEY", "KeyHolderUnreachableError",
           "after_failed_round", "check_client_key", "check_key_pin", "client_sum", "decrypt", "decrypt_aggregate",
           "find_key_holder", "hello", "is_key_holder", "job_public_key", "keygen", "own_private_key",
           "paillier_sum", "pick_key_holder", "public_key_from_json", "read_private_key", "read_public_key",
           "refuse_client_message", "server_sum", "uses_paillier"]

log = logging.getLogger(__name__)

ROLE_KEY = "role"
"""The SuperNode ``--node-config`` key naming a node's role; ``key-holder`` for the Paillier key holder."""
KEY_HOLDER_ROLE = "key-holder"
KEY_FILE_KEY = "paillier-key-file"
"""The key holder's ``--node-config`` key naming its private key file (``key.json``, mode 0600)."""
_DECRYPTED = "privagg-keyholder"
_DECRYPTED_JOB = "decrypted/"  # the key holder's cross-run record of decrypted rounds, keyed by the job


# ------------------------------------------------------------------------------------------------ keys
def keygen(out: Path, *, bits: int = 2048) -> tuple[Path, Path]:
    """Make the key holder's key pair ONCE: ``out/key.json`` (private, mode 0600) and ``out/public.json``.

    Refuses to overwrite an existing private key (ciphertexts under it would become undecryptable).
    Returns ``(private path, public path)``; hand ``public.json`` to the operator and the sites.
    """
    from secagg.paillier import generate_keypair

    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / "key.json", out / "public.json"
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists: a key holder makes its key pair once; use it, or give "
                              "another --out")
    public, private = generate_keypair(bits=bits)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(private.to_json() + "\n")
    public_path.write_text(public.to_json() + "\n")
    return private_path, public_path


def _public_from_text(text: str, where: str) -> PaillierPublicKey:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("kty") != "paillier" or {"p", "q"} & set(data):
        raise ValueError(f"{where} is not a Paillier PUBLIC key (give public.json from `privagg flower "
                         "paillier-keygen`, never key.json)")
    try:
        return PaillierPublicKey.from_json(data)
    except (CodecError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def public_key_from_json(text: str, where: str) -> PaillierPublicKey:
    """A Paillier PUBLIC key from its JSON ``text`` (``where``: named in the error); a private key is refused."""
    return _public_from_text(text, where)


def read_public_key(path: Path) -> PaillierPublicKey:
    """The public key in ``path`` (``public.json``); a private key file is refused, never copied on."""
    return _public_from_text(Path(path).read_text(), str(path))


def read_private_key(path: Path) -> PaillierPrivateKey:
    """The key holder's private key; refused if others can read the file (``chmod 600``)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the Paillier key {path}: {exc}; make it with `privagg flower "
                         "paillier-keygen --out DIR`") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"the Paillier private key {path} is readable by others (mode {mode & 0o777:o}): "
                         f"chmod 600 {path}")
    try:
        return PaillierPrivateKey.from_json(text)
    except (CodecError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a Paillier private key: {exc}") from exc


def job_public_key(job: FlowerJob) -> PaillierPublicKey:
    """The key-holder public key a ``paillier`` job names (:class:`JobError` if it names none or a bad one)."""
    if not job.paillier_public_key:
        raise JobError("a paillier job must carry the key holder's public key (FlowerJob.paillier_public_key; "
                       "`privagg flower run/local --paillier-public-key DIR/public.json`)")
    try:
        return _public_from_text(job.paillier_public_key, "the job's paillier_public_key")
    except ValueError as exc:
        raise JobError(str(exc)) from exc


# ------------------------------------------------------------------------------------------ the sums
def uses_paillier(job: FlowerJob) -> bool:
    """Whether the job's secure sum is Paillier (so it needs a key-holder node)."""
    if job.task == "sum":
        return job.protocol == "paillier"
    return "paillier" in train_config(job).privacy.tokens()


def paillier_sum(job: FlowerJob) -> SecureSum:
    """The ``sum`` task's Paillier sum: the key holder's public key, ``min_clients`` from the threshold."""
    from fl.sums.paillier import PaillierSum

    public = job_public_key(job)
    ssum = PaillierSum(key_bits=public.bits, min_clients=max(2, math.ceil(job.threshold * job.clients)))
    return ssum.adopt_public_key(public)


def check_client_key(context: Context, job: FlowerJob) -> None:
    """A client of a ``paillier`` job: the job's key must be the one this node's policy pins."""
    if not uses_paillier(job):
        return
    check_key_pin(node_policy(context).paillier_key_fingerprint, job_public_key(job), what="the job's")


def check_key_pin(pin: str | None, key: PaillierPublicKey, *, what: str) -> None:
    """``key`` (named by the server: ``what``) must be the key holder's key a client's OWN policy pins.

    Used by the job path (:func:`check_client_key`) and by ``privagg_mod`` (:mod:`fl.runners.flower.mod_paillier`).
    """
    have = key.fingerprint.hex()
    if pin is None:
        raise PolicyError("this node pins no Paillier key, so it cannot tell the key holder's key from one the "
                          "server holds: pin it with `privagg flower policy --paillier-key PUBLIC.json`")
    if pin != have:
        raise PolicyError(f"{what} Paillier key {have} is not the key holder's key {pin} this node's policy "
                          "pins: refusing to encrypt to it")


def client_sum(ssum: SecureSum, context: Context, job: FlowerJob, **kw: Any) -> SecureSum:
    """The secure sum a client runs: a Paillier sum encrypts to the pinned key holder's key; other
    sums may not need an extra party (``kw``: ``spec``, ``session``, ``round`` for :meth:`parties`)."""
    from fl.sums.paillier import PaillierSum

    if isinstance(ssum, PaillierSum):
        if ssum.key_holder != "separate":
            raise PolicyError("Paillier with a key shared by the clients needs the private key on every node; "
                              "over Flower the key holder is its own node (key_holder='separate')")
        check_client_key(context, job)
        return ssum.adopt_public_key(job_public_key(job))
    if dict(ssum.parties(**kw)):
        raise ProtocolError(f"{ssum.name} needs an extra party the Flower runner does not host")
    return ssum


def server_sum(ssum: SecureSum, job: FlowerJob) -> SecureSum:
    """The aggregator's secure sum: a Paillier sum gets only the job's public key (it never decrypts)."""
    from fl.sums.paillier import PaillierSum

    if isinstance(ssum, PaillierSum):
        return ssum.adopt_public_key(job_public_key(job))
    return ssum


# ------------------------------------------------------------------------------------- the node side
def is_key_holder(context: Context) -> bool:
    """Whether this SuperNode is the Paillier key holder (its own node config says so)."""
    return context.node_config.get(ROLE_KEY) == KEY_HOLDER_ROLE


def refuse_client_message(context: Context, kind: str) -> None:
    """A key-holder node answers only key-holder messages: never trains or sends an input."""
    if is_key_holder(context):
        raise PolicyError(f"this SuperNode is the Paillier key holder; it answers only query.privagg_hello and "
                          f"{KEYHOLDER}, not {kind}")


def own_private_key(context: Context) -> PaillierPrivateKey:
    """This key-holder node's private key, from the file its OWN node config names (:data:`KEY_FILE_KEY`)."""
    path = context.node_config.get(KEY_FILE_KEY)
    if not isinstance(path, str) or not path:
        raise PolicyError(f"this key-holder node has no {KEY_FILE_KEY!r} in its --node-config; start it with "
                          "`privagg flower supernode --key-holder --paillier-key DIR/key.json`")
    try:
        return read_private_key(Path(path))
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc


def _own_key(context: Context, job: FlowerJob) -> PaillierPrivateKey:
    """This key holder's private key, checked against the key the job names."""
    private = own_private_key(context)
    if not uses_paillier(job):
        raise PolicyError("this SuperNode is a Paillier key holder; the job's secure sum is not paillier")
    mine, named = private.public.fingerprint.hex(), job_public_key(job).fingerprint.hex()
    if mine != named:
        raise PolicyError(f"the job names Paillier key {named}, not this key holder's own key {mine}")
    return private


def hello(context: Context) -> dict[str, Any]:
    """The key holder's hello: its role and key fingerprint, once the job names its key and meets its policy."""
    if not is_key_holder(context):
        raise PolicyError("this SuperNode is not a key holder")
    job = load_job(context)
    private = _own_key(context, job)
    least = node_policy(context).min_summands
    if job.num_clients < least:
        raise PolicyError(f"the job plans {job.num_clients} client(s); this key holder decrypts sums of at least "
                          f"{least}")
    return {"role": KEY_HOLDER_ROLE, "fingerprint": private.public.fingerprint.hex()}


def _claim(context: Context, rnd: int, planned: int | None, record_id: str | None = None) -> None:
    """At most one decryption per round (of the planned ones, if known), in increasing order (own record).

    With ``record_id`` (a ``train`` job's: :func:`_record_id`) the record is also kept in the node's own
    files (:func:`fl.runners.flower.state.record_released`), so a restarted key holder (a fresh Flower
    context) still refuses a round it already decrypted: else a server could have a second subset of that
    round's ciphertexts decrypted after a restart and learn one client's update as the difference. A
    ``sum`` job's vectors are public test data, and under ``privagg_mod`` each Flower run numbers its rounds
    from 1: their record is the run's only.
    """
    from fl.runners.flower import state as _state

    if planned is None and rnd < 1:
        raise PolicyError(f"round {rnd} is not a round number (1, 2, ...): refusing to decrypt")
    if planned is not None and not 1 <= rnd <= planned:
        raise PolicyError(f"round {rnd} is outside the job's planned rounds 1..{planned}: refusing to decrypt")
    in_run = int(context.state[_DECRYPTED]["last"]) if _DECRYPTED in context.state else 0  # type: ignore[arg-type]
    last = max(in_run, _state.last_released(context, record_id) if record_id else 0)
    if rnd <= last:
        raise PolicyError(f"this key holder already decrypted the sum of round {last}; refusing round {rnd}")


def _record(context: Context, rnd: int, record_id: str | None) -> None:
    """Remember that round ``rnd`` was decrypted, before the reply carrying the sum leaves this node."""
    from fl.runners.flower import state as _state

    if record_id:
        _state.record_released(context, record_id, rnd)
    context.state[_DECRYPTED] = ConfigRecord({"last": rnd})


def decrypt(msg: Message, context: Context) -> dict[str, Any]:
    """One decryption request: the round's aggregate in, the decrypted sum out (:class:`PaillierKeyHolder`)."""
    if not is_key_holder(context):
        raise PolicyError(f"this SuperNode is a client, not the key holder; it refuses {KEYHOLDER}")
    job = load_job(context)
    private = _own_key(context, job)
    rec = record(msg.content)
    session, rnd = bytes(rec["session"]), int(rec["round"])
    return encode_msgs(decrypt_aggregate(context, private, decode_msgs(rec), session=session, round=rnd,
                                         planned=job.num_rounds, record_id=_record_id(job)))


def _record_id(job: FlowerJob) -> str | None:
    """What a train job's decryptions are recorded under across runs and restarts (``None``: a sum job)."""
    return _DECRYPTED_JOB + job.releases_id() if job.task == "train" else None


def decrypt_aggregate(context: Context, private: PaillierPrivateKey, msgs: Sequence[Any], *, session: bytes,
                      round: int, planned: int | None, record_id: str | None = None) -> list[Any]:
    """The key holder's decryption of one round's aggregate, under ITS policy's ``min_summands``.

    At most one per round number, in increasing order (and within ``planned`` rounds when a job plans
    them; ``None`` under ``privagg_mod``, where the server's app decides the rounds). The job path
    (:func:`decrypt`) and the mod (:mod:`fl.runners.flower.mod_paillier`) both decrypt here.
    """
    _claim(context, round, planned, record_id)
    if len(msgs) != 1 or not isinstance(msgs[0], PaillierAggregate) or msgs[0].recipient != KEY_HOLDER:
        raise ProtocolError("a decryption request carries exactly one PaillierAggregate for the key holder")
    machine = PaillierKeyHolder(KEY_HOLDER, private, session, round, min_summands=node_policy(context).min_summands)
    out = machine.receive(msgs[0])  # refuses fewer than min_summands, another key, a forged count
    _record(context, round, record_id)  # the server sees the sum only in the reply: recorded before it is sent
    log.info("key holder: decrypted the sum of %d clients for round %d", msgs[0].batch.summands, round)
    return out


# ------------------------------------------------------------------------------------ the server side
def pick_key_holder(holders: Sequence[int], job: FlowerJob) -> dict[int, int]:
    """``{KEY_HOLDER: node id}`` for a Paillier job (exactly one key-holder node), else ``{}``."""
    if not uses_paillier(job):
        if holders:
            log.warning("key-holder SuperNode(s) %s take no part: the job's secure sum is not paillier",
                        list(holders))
        return {}
    if len(holders) != 1:
        raise RuntimeError(
            f"a paillier job needs exactly one key-holder SuperNode, found {len(holders)}"
            + (f" ({sorted(holders)})" if holders else "")
            + ": start one with `privagg flower supernode --key-holder --paillier-key DIR/key.json`"
        )
    return {KEY_HOLDER: holders[0]}


def is_key_holder_hello(rec: Mapping[str, Any]) -> bool:
    """Whether a hello reply comes from a key-holder node (it names its role instead of a partition)."""
    return rec.get("role") == KEY_HOLDER_ROLE


# ------------------------------------------------------------------------ the key holder lost mid-run
class KeyHolderUnreachableError(RuntimeError):
    """A round got no decryption and no key-holder SuperNode with the job's key answered in the join timeout."""


def after_failed_round(tr: GridTransport, job: FlowerJob, exc: Exception, *, round: int) -> Exception:
    """The error of a failed round; a failed ``decrypt`` phase names the key holder and waits for it.

    A Paillier round that aborted in the ``decrypt`` phase got no decrypted sum from the key holder (it
    died, is unreachable, or refused; its own log says which). The returned :class:`AbortError` names its
    node; this waits (at most ``job.join_timeout``) until a key-holder SuperNode with the job's key answers
    a hello again: the same node, or a restarted one under a new node id, which the transport then uses
    for the next rounds. If none answers, :class:`KeyHolderUnreachableError` stops the run saying how to
    continue (the ServerApp writes it to ``error.json`` with the ``--resume`` command when a checkpoint
    exists, and writes no result and no model). The last round waits for nothing. Any other failure is
    returned as is.
    """
    if not (isinstance(exc, AbortError) and exc.phase == "decrypt" and KEY_HOLDER in tr.nodes):
        return exc
    node = tr.nodes[KEY_HOLDER]
    why = (f"the Paillier key holder (SuperNode {node}) returned no decrypted sum for round {round} within "
           f"{job.phase_timeout:g}s (it died, is unreachable, or refused: see its log); no update this round")
    if round >= job.num_rounds:  # no round left that needs it
        return AbortError("decrypt", needed=1, answered=0, reason=why)
    back = find_key_holder(tr, job, wait=job.join_timeout)
    if back is None:
        from fl.training.server import CHECKPOINT

        kept = job.task == "train" and job.checkpoint and (Path(job.checkpoint) / CHECKPOINT).is_file()
        then = "" if kept else ("; this run kept no checkpoint to resume from: start it again (a train run with "
                                "--checkpoint-dir can be resumed)")
        raise KeyHolderUnreachableError(
            f"{why}; it is unreachable: no key-holder SuperNode with the job's key answered within "
            f"{job.join_timeout:g}s, so the run stops before round {round + 1}. Restart the key holder with the "
            f"same key file (`privagg flower supernode --key-holder --paillier-key DIR/key.json`){then}"
        ) from exc
    if back != node:
        log.warning("the Paillier key holder is back as SuperNode %d (was %d)", back, node)
        tr.nodes[KEY_HOLDER] = back
        tr.cids = {n: c for c, n in tr.nodes.items()}
        why += f"; the key holder is back as SuperNode {back}"
    return AbortError("decrypt", needed=1, answered=0, reason=why)


def find_key_holder(tr: GridTransport, job: FlowerJob, *, wait: float) -> int | None:
    """The node id of a key-holder SuperNode with the job's key that answers a hello within ``wait`` seconds.

    Asks the known key holder and each node that is not one of the run's clients once, as soon as Flower
    lists it (a restarted key holder joins under a new node id), and pulls every reply until one answers
    as the key holder of the job's key.
    """
    want = job_public_key(job).fingerprint.hex()
    clients = {n for c, n in tr.nodes.items() if c != KEY_HOLDER}
    asked: set[int] = set()
    pending: set[str] = set()
    deadline = time.monotonic() + wait
    while True:
        new = [n for n in sorted(tr.grid.get_node_ids()) if n not in clients | asked]
        asked.update(new)
        if new:
            pending.update(i for i in tr.grid.push_messages([
                Message(RecordDict({RECORD: ConfigRecord({"hello": 1})}), dst_node_id=n, message_type=HELLO,
                        ttl=wait + 60.0) for n in new]) if i)
        for reply in tr.grid.pull_messages(pending) if pending else []:
            pending.discard(reply.metadata.reply_to_message_id)
            try:
                rec = {} if reply.has_error() else reply_record(reply)
            except BadReplyError:
                continue
            if is_key_holder_hello(rec) and rec.get("fingerprint") == want:
                return int(reply.metadata.src_node_id)
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(job.poll_interval or 0.2, max(0.0, deadline - time.monotonic())))
