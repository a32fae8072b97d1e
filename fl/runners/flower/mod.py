"""``privagg_mod``: privagg's secure aggregation for an existing Flower ClientApp, as a Flower mod.

A Flower user adds it the way they add Flower's ``secaggplus_mod``::

    from fl.runners.flower.mod import privagg_mod
    app = ClientApp(mods=[privagg_mod])        # Message API (@app.train()) or ClientApp(client_fn=..., mods=...)

and, on the server, :class:`fl.runners.flower.workflow.SecureAggregation` (``strategy.start(grid=sa.wrap(grid))``
or ``DefaultWorkflow(fit_workflow=sa)``). The ClientApp itself is unchanged: it trains and replies with its
model (one ``ArrayRecord``) and its ``num-examples`` as usual. The mod, on the node:

1. ``start`` (the strategy's train message plus our :data:`RECORD`): reads what the server asks
   (:class:`SecureTerms`), checks it against this node's own :class:`~fl.runners.flower.policy.NodePolicy`
   (``policy-file`` in the node config; safe defaults without one) and refuses anything weaker
   (:class:`~fl.runners.flower.policy.PolicyError`, sent back as an error reply); calls the ClientApp;
   turns its reply into the update ``trained - global`` (weighted by ``num-examples`` without DP; clipped
   and noised with DP), encodes it with the same :class:`fl.pipeline.Pipeline` the server decodes with,
   and starts our SecAgg / SecAgg+ client machine. Only protocol messages leave the node: the model,
   the metrics and the example count of the ClientApp's reply never do in the clear.
2. ``step``: feeds the server's protocol messages to the machine and replies with the machine's.

Between messages the machine lives sealed in the node's ``Context.state`` (:mod:`fl.runners.flower.state`:
AES-GCM under the node's ``state-key-file``, bound to run, node, session, round and step; never pickle).
A train message WITHOUT our record would send the update in the clear: the mod refuses it unless the
node's policy lists ``plain``. Each round number is accepted at most once and in increasing order (a
server that replayed a round would get the noisy update twice).

**Authenticated SecAgg / SecAgg+** (``SecureAggregation(authenticated=True, roster=...)``: signed protocol
messages, survivor lists signed by >= t neighbours; security against an active server). Each node
needs its own identity key and the consortium's roster in ITS OWN node config, the files
:mod:`fl.runners.flower.identity` uses::

    privagg flower identity --name hospital-a --out keys     # each site; send keys/hospital-a.identity.json
    privagg flower roster --out roster.json a.identity.json b.identity.json ...   # the consortium, once
    privagg flower policy --out policy.json --roster roster.json --require-authenticated   # each site
    flower-supernode ... --node-config 'identity-key-file="keys/hospital-a.identity.key"
        identity-roster-file="roster.json" policy-file="policy.json" state-key-file="state.key"'

A node's client id is its OWN roster entry: the entry whose public key is its identity key, never a
number the server picks. The server learns it once per node by an ``identify`` train message (a fresh
nonce): the node answers its entry signed with its identity key over the nonce, its Flower node id, its
entry and the roster's SHA-256, so no node can claim another's entry. Every start then states the
roster's SHA-256 and the node's entry; the node refuses a round whose roster is not its own (the server
substituted a key) or not the one its policy pins, and a start that assigns it any other client id. It
signs with its own key and checks every signature with its own roster's public keys (the server's
roster is only compared). A node whose policy sets ``require_authenticated`` refuses an unauthenticated
round; a node without identity files gets an error naming ``privagg flower identity``. The colluder
bound of the ledger assumes each node pins the cohort: set the policy's ``min_clients``.

**Packed Paillier** (``protocol="paillier"``, :mod:`fl.runners.flower.mod_paillier`): the client encrypts to
the key holder's public key only if its fingerprint is the one this node's policy pins; a node whose
own config says ``role="key-holder"`` is the key holder, and there the mod answers only privagg's hello
and decryption requests and never calls the ClientApp.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from fl.pipeline import BoundPipeline, Pipeline
from fl.runners.flower import identity
from fl.runners.flower import state as _state
from fl.runners.flower.policy import JobTerms, NodePolicy, PolicyError
from fl.spec import CompositionError, ValueSpec
from secagg import wire
from secagg.errors import CodecError, OverflowRiskError, ProtocolError
from secagg.machine import ClientMachine
from secagg.machine import Message as ProtocolMessage

__all__ = ["RECORD", "SecureTerms", "flatten", "privagg_mod", "unflatten"]

log = logging.getLogger(__name__)

RECORD = "privagg.secure"
"""The ``ConfigRecord`` that carries our protocol in a train message and its reply."""
_ROUNDS = "privagg.mod-rounds"
_AUTH = "privagg.mod-auth"
_WEIGHT_KEYS = ("num-examples", "num_examples")
_PROTOCOLS = ("secagg+", "secagg", "paillier")
_TERM_TYPES: dict[str, tuple[type, ...]] = {
    "protocol": (str,), "threshold": (float, int), "cohort": (int,), "bits": (int,), "clipping_range": (float, int),
    "max_weight": (float, int), "clip": (float, int), "noise_multiplier": (float, int), "placement": (str,),
    "epsilon": (float, int), "authenticated": (bool,), "paillier_public_key": (str,),
}


# ---------------------------------------------------------------------------------------------- the terms
@dataclass(frozen=True)
class SecureTerms:
    """What the server asks of a round; both halves build the same :class:`~fl.pipeline.Pipeline` from it.

    ``protocol``: ``secagg+`` or ``secagg``; ``threshold``: t as a fraction of each share group;
    ``cohort``: clients planned for the round (sizes the ring and is each client's floor on the cohort);
    ``bits``: width of one client's quantized value (40: a step of ``clipping_range / 2^39``, fine enough
    for a client whose weight ``w`` is small; the ring adds ``ceil(log2 cohort)`` bits, at most 63).
    Without DP (``clip is None``) each client sends
    ``[w, w * (trained - global)]`` with ``w = min(num-examples, max_weight) / max_weight``, every
    coordinate of the update within ``[-clipping_range, clipping_range]`` (else the node refuses with an
    error naming the fix; nothing is clipped silently). With DP: the update is clipped to L2 norm ``clip``
    (unweighted: one client moves the sum by at most ``clip``), and Gaussian noise with multiplier
    ``noise_multiplier`` is added by the server (``placement="server"``, central) or split across the
    planned clients (``"clients"``, distributed). ``epsilon``: the server's stated target (for policies).
    ``authenticated``: Ed25519-signed protocol messages and the consistency round (active-server security);
    each node then signs with its own identity key and checks everyone's from its own roster
    (:func:`_round_identities`).
    ``protocol="paillier"``: packed Paillier to a separate key-holder node (:mod:`fl.runners.flower.mod_paillier`);
    ``paillier_public_key`` is its public key (JSON), used only if the client's own policy pins it, and
    ``threshold`` of the cohort (at least 2) is the fewest clients whose sum the server asks to decrypt.
    """

    protocol: str = "secagg+"
    threshold: float = 0.7
    cohort: int = 2
    bits: int = 40
    clipping_range: float = 8.0
    max_weight: float = 1000.0
    clip: float | None = None
    noise_multiplier: float | None = None
    placement: str = "server"
    epsilon: float | None = None
    authenticated: bool = False
    paillier_public_key: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: choose {' or '.join(_PROTOCOLS)}")
        if self.authenticated and self.protocol == "paillier":
            raise ValueError("authenticated mode is for secagg and secagg+ (signed masking messages), not paillier")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold is a fraction of each share group in (0, 1], got {self.threshold}")
        if self.cohort < 2:
            raise ValueError(f"a secure sum needs a cohort of at least 2 clients, got {self.cohort}")
        for name in ("clipping_range", "max_weight", "clip", "noise_multiplier", "epsilon"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        if self.noise_multiplier is not None and self.clip is None:
            raise ValueError("noise_multiplier needs clip: DP noise is calibrated to the clip norm")
        if self.placement not in ("server", "clients"):
            raise ValueError(f"placement must be 'server' (central) or 'clients' (distributed), got {self.placement!r}")

    @property
    def dp(self) -> bool:
        return self.clip is not None

    def with_cohort(self, cohort: int) -> SecureTerms:
        return SecureTerms(**{**asdict(self), "cohort": cohort})

    def to_record(self) -> dict[str, Any]:
        """The terms as ``ConfigRecord`` values (absent options are left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> SecureTerms:
        """Parse strictly: each field has its type; anything malformed is a :class:`ProtocolError`."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in rec:
                continue
            v = rec[f.name]
            if (isinstance(v, bool) and bool not in _TERM_TYPES[f.name]) or not isinstance(v, _TERM_TYPES[f.name]):
                raise ProtocolError(f"the server's secure-aggregation term {f.name}={v!r} has the wrong type")
            kw[f.name] = float(v) if float in _TERM_TYPES[f.name] else v  # type: ignore[arg-type]
        try:
            return cls(**kw)
        except ValueError as exc:
            raise ProtocolError(f"the server's secure-aggregation terms are unusable: {exc}") from exc

    def job_terms(self) -> JobTerms:
        """What this round makes a node do, for its :class:`~fl.runners.flower.policy.NodePolicy`."""
        own = self.noise_multiplier if self.placement == "clients" else None
        central = self.noise_multiplier if self.placement == "server" else None
        graph = None
        if self.protocol == "secagg+":  # a sparse graph is judged by the security bits its (k, t) keep
            from fl.runners.flower.policy import graph_of
            from fl.sums.secagg import SecAggPlus

            graph = graph_of(SecAggPlus(threshold=self.threshold), self.cohort)
        return JobTerms(protocol=self.protocol, threshold_fraction=self.threshold, cohort=self.cohort,
                        own_noise=own, central_noise=central, clip=self.clip, epsilon=self.epsilon,
                        authenticated=self.authenticated, graph=graph)

    def pipeline(self, size: int, *, min_cohort: int | None = None) -> BoundPipeline:
        """The bound pipeline for a model of ``size`` parameters (``size + 1`` values without DP: the weight).

        ``min_cohort``: the client's own floor on the cohort of a round (its machine refuses fewer
        members); the server leaves it out.
        """
        from fl.layers.clip import Clip, Quantize
        from fl.layers.noise import GaussianNoise
        from fl.spec import Layer, SecureSum
        from fl.sums.secagg import SecAgg, SecAggPlus

        ssum: SecureSum
        if self.protocol == "paillier":  # the key holder's public key; each client checks its pin first
            from fl.runners.flower.mod_paillier import paillier_sum

            ssum = paillier_sum(self)
        else:
            cls = SecAggPlus if self.protocol == "secagg+" else SecAgg
            ssum = cls(threshold=self.threshold, min_cohort=min_cohort, authenticated=self.authenticated)
        layers: list[Layer] = []
        if self.clip is None:
            layers.append(Quantize(bits=self.bits, bound=self.clipping_range))
            size += 1
        else:
            layers.append(Clip(l2=self.clip))
            if self.noise_multiplier is not None:
                shares = self.cohort if self.placement == "clients" else None
                layers.append(GaussianNoise(multiplier=self.noise_multiplier, placement=self.placement,  # type: ignore[arg-type]
                                            shares=shares))
            layers.append(Quantize(bits=self.bits))
        return Pipeline(layers, sum=ssum).bind(ValueSpec(size=size, cohort=self.cohort))


# ---------------------------------------------------------------------------------------------- arrays
def flatten(record: ArrayRecord) -> NDArray[np.float64]:
    """All arrays of ``record``, in key order, as one float64 vector."""
    parts = [np.asarray(record[k].numpy(), dtype=np.float64).ravel() for k in record]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: NDArray[np.float64], like: ArrayRecord) -> ArrayRecord:
    """``vector`` cut into ``like``'s keys, shapes and dtypes (the inverse of :func:`flatten`)."""
    out = ArrayRecord()
    at = 0
    for k in like:
        ref = like[k].numpy()
        n = int(ref.size)
        out[k] = Array(np.asarray(vector[at:at + n], dtype=np.float64).reshape(ref.shape).astype(ref.dtype))
        at += n
    if at != vector.size:
        raise ValueError(f"{vector.size} values for a model of {at} parameters")
    return out


def _only_arrays(content: RecordDict, what: str) -> ArrayRecord:
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ProtocolError(f"the {what} holds {len(records)} ArrayRecords; secure aggregation needs exactly one")
    return records[0]


def _weight(content: RecordDict) -> float:
    """The reply's example count (``num-examples``, or the legacy ``num_examples``)."""
    for rec in content.metric_records.values():
        for key in _WEIGHT_KEYS:
            if key in rec:
                w = rec[key]
                if isinstance(w, bool) or not isinstance(w, int | float) or not (w >= 0 and math.isfinite(w)):
                    raise ProtocolError(f"the ClientApp's {key} is {w!r}, not a count")
                return float(w)
    raise ProtocolError("the ClientApp's reply has no num-examples metric (needed to weight its update)")


# ---------------------------------------------------------------------------------------------- the mod
def _error(msg: Message, exc: BaseException) -> Message:
    log.error("privagg_mod refuses %s: %s", msg.metadata.message_type, exc)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


def _reply(msg: Message, out: list[ProtocolMessage]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord({"msgs": wire.encode_frames(out)})}), reply_to=msg)


def _incoming(rec: Any) -> list[ProtocolMessage]:
    raw = rec.get("msgs", [])
    if not isinstance(raw, list) or not all(isinstance(b, bytes) for b in raw):
        raise ProtocolError("'msgs' must be a list of byte strings")
    return wire.decode_frames(raw)  # arrays above one frame (2^24 values) arrive as streams


def _int(rec: Any, key: str) -> int:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"the server's {key!r} must be an integer, got {v!r}")
    return v


def _session(rec: Any) -> bytes:
    v = rec.get("session")
    if not isinstance(v, bytes) or len(v) < 16:
        raise ProtocolError("the server's session must be at least 16 bytes")
    return v


def _claim_round(context: Context, rnd: int) -> None:
    """Contribute to each round number at most once, in increasing order (this node's own record)."""
    last = int(context.state[_ROUNDS]["last"]) if _ROUNDS in context.state else 0  # type: ignore[arg-type]
    if rnd <= last:
        raise PolicyError(f"this node already contributed to round {last}; round {rnd} again would release its "
                          "update more often than the run's DP accounting covers")
    context.state[_ROUNDS] = ConfigRecord({"last": rnd})


def _start(msg: Message, context: Context, call_next: ClientAppCallable, rec: Any) -> Message:
    """Check the terms against this node's policy, run the ClientApp, encode its update, start the machine."""
    from dp.rng import SecureRandom

    terms = SecureTerms.from_record(rec)
    policy = NodePolicy.from_node_config(context.node_config)
    policy.check(_worst_case(terms, policy))
    if terms.protocol == "paillier":  # encrypt only to the key holder's key THIS node's policy pins
        from fl.runners.flower.mod_paillier import check_pinned_key

        check_pinned_key(terms, policy)
    rnd, cid, session = _int(rec, "round"), _int(rec, "cid"), _session(rec)
    ids = _round_identities(context, policy, rec, cid) if terms.authenticated else None
    if ids is None and not 0 <= cid < terms.cohort:
        raise ProtocolError(f"client id {cid} outside the round's cohort 0..{terms.cohort - 1}")
    _state.state_key(context)  # fail before training when this node cannot keep the round's state
    _claim_round(context, rnd)
    sent = _only_arrays(msg.content, "train message")
    glob, sent_keys = flatten(sent), list(sent)  # before the ClientApp runs: it may consume its input
    reply = call_next(_without_record(msg), context)
    if reply.has_error():
        return reply
    trained = _only_arrays(reply.content, "ClientApp's reply")
    new = flatten(trained)
    if list(trained) != sent_keys or new.size != glob.size:
        raise ProtocolError(f"the ClientApp replied with {new.size} values in arrays {list(trained)}, the global "
                            f"model has {glob.size} in {sent_keys}: reply with the arrays it was sent, trained")
    delta = new - glob
    if terms.dp:
        x = delta
    else:
        n = _weight(reply.content)
        if n > terms.max_weight:
            log.warning("num-examples %g exceeds max_weight %g: this update is weighted as %g examples",
                        n, terms.max_weight, terms.max_weight)
        w = min(n, terms.max_weight) / terms.max_weight
        x = np.concatenate([[w], w * delta])
    bound = terms.pipeline(delta.size, min_cohort=_min_cohort(terms, policy))
    try:
        value = bound.encode(x, SecureRandom())
    except OverflowRiskError as exc:
        raise OverflowRiskError(f"{exc} (without DP, each update coordinate times its weight must lie within "
                                f"clipping_range={terms.clipping_range:g}: raise SecureAggregation(clipping_range=...) "
                                "or clip the update with clip=...)") from exc
    ssum = identity.client_sum(bound.pipeline.sum, ids)  # authenticated: this node's own keys, never the server's
    machine: ClientMachine = ssum.client(cid, value, spec=bound.sum_spec, session=session, round=rnd)
    out = machine.start()
    _state.clear(context)
    context.state[_AUTH] = ConfigRecord({"round": rnd, "authenticated": ids is not None})
    if terms.protocol != "paillier":  # a Paillier client is done once it has sent its ciphertexts
        _state.store(context, machine, session=session, round=rnd, step=0)
    return _reply(msg, out)


def _worst_case(terms: SecureTerms, policy: NodePolicy) -> JobTerms:
    """The job's terms with the noise this node's update can end up with in the worst round it accepts.

    Distributed noise is split across the CLAIMED cohort; if only this node's floor of members takes part
    (:func:`_min_cohort`), the sum carries ``z * sqrt(floor / cohort)``. A server inflating the cohort to
    thin each share therefore meets the node's ``min_noise_multiplier`` with the thinned value.
    """
    job = terms.job_terms()
    if job.own_noise is None:
        return job
    return replace(job, own_noise=job.own_noise * math.sqrt(_min_cohort(terms, policy) / terms.cohort))


def _min_cohort(terms: SecureTerms, policy: NodePolicy) -> int:
    """This node's floor on a round's members: its policy's ``min_clients``, and never below t of the cohort.

    Below the planned cohort, so a round still completes when a node drops before it starts.
    """
    t = math.ceil(policy.min_threshold * terms.cohort)
    return max(2, min(terms.cohort, max(policy.min_clients, t)))


def _without_record(msg: Message) -> Message:
    """The strategy's own train message, as the ClientApp expects it (our record removed)."""
    del msg.content[RECORD]
    return msg


def _step(msg: Message, context: Context, rec: Any) -> Message:
    """A later phase: the server's messages into the stored machine, its replies back."""
    rnd = _int(rec, "round")
    out = _state.advance(context, _incoming(rec), session=_session(rec), round=rnd,
                      step=_int(rec, "step"), final=rec.get("final") is True, identity=_step_identity(context, rnd))
    return _reply(msg, out)


# ---------------------------------------------------------------------------------------------- identities
def _own(context: Context) -> tuple[int, bytes, Any]:
    """This node's roster entry, private identity key and own roster (:func:`identity.own_identity`)."""
    return identity.own_identity(context.node_config, NodePolicy.from_node_config(context.node_config))


def _server_roster(rec: Any, own: Any) -> None:
    """Refuse a round whose roster (the SHA-256 the server states) is not this node's own."""
    stated = rec.get("roster")
    if stated != own.fingerprint():
        raise identity.IdentityError(f"the server's roster (SHA-256 {stated!r}) is not this node's "
                                     f"({own.fingerprint()}): the server substituted identity keys; refusing the "
                                     "round")


def _round_identities(context: Context, policy: NodePolicy, rec: Any, cid: int) -> Any:
    """This node's :class:`~fl.sums.secagg.FixedIdentities` for an authenticated round.

    Its own private key and its OWN roster's public keys (the server's roster is only compared). Refused:
    a roster other than the node's (or than its policy's pin), and a client id other than the node's own
    roster entry (the server cannot make it play, or relay for, another identity).
    """
    from fl.sums.secagg import FixedIdentities

    own_cid, private, own = identity.own_identity(context.node_config, policy)
    _server_roster(rec, own)
    if cid != own_cid:
        raise identity.IdentityError(f"the server assigned this node client id {cid}, but its identity key is the "
                                     f"roster's entry {own_cid} (site {own.clients[own_cid].site!r}): refusing the "
                                     "round")
    return FixedIdentities(own.publics(), own=(own_cid, private))


def _step_identity(context: Context, rnd: int) -> tuple[bytes, Any] | None:
    """``(own private key, roster's public keys)`` when THIS node started round ``rnd`` authenticated.

    Read from the node's own state (written at the start), not from the server's step message.
    """
    rec: Any = context.state.get(_AUTH, None)
    if rec is None or rec.get("round") != rnd or rec.get("authenticated") is not True:
        return None
    _, private, own = _own(context)
    return private, own.publics()


IDENTIFY_LABEL = b"privagg/flower-mod/identify/v1"
"""Domain-separation label of a node's signed answer to the server's ``identify`` request."""


def identify_payload(nonce: bytes, node_id: int, cid: int, roster: str) -> bytes:
    """What a node signs when it tells the server its client id: the server's nonce, its Flower node id,
    its roster entry and the roster's SHA-256 (length-prefixed)."""
    parts = [bytes(nonce), str(node_id).encode(), str(cid).encode(), roster.encode()]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _identify(msg: Message, context: Context, rec: Any) -> Message:
    """The server asks which roster entry this node is: its own entry, signed with its own identity key."""
    from secagg._hazmat import sign

    nonce = rec.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) < 16:
        raise ProtocolError("the server's identify nonce must be at least 16 bytes")
    cid, private, own = _own(context)
    _server_roster(rec, own)
    sig = sign.sign(sign.private_from_bytes(private), label=IDENTIFY_LABEL,
                    payload=identify_payload(nonce, context.node_id, cid, own.fingerprint()))
    return Message(RecordDict({RECORD: ConfigRecord({"cid": cid, "signature": sig})}), reply_to=msg)


def privagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run privagg's SecAgg / SecAgg+ over this ClientApp's train replies (see the module doc)."""
    if context.node_config.get("role") == "key-holder":  # a Paillier key holder never runs the ClientApp
        from fl.runners.flower.mod_paillier import key_holder_mod

        return key_holder_mod(msg, context)
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    try:
        if RECORD not in msg.content:
            if "plain" not in NodePolicy.from_node_config(context.node_config).protocols:
                raise PolicyError("this train message asks for the update in the clear (no secure aggregation); "
                                  "this node's policy runs only " + ", ".join(_PROTOCOLS))
            return call_next(msg, context)
        rec = msg.content[RECORD]
        if not isinstance(rec, ConfigRecord):
            raise ProtocolError(f"{RECORD!r} must be a ConfigRecord")
        stage = rec.get("stage")
        if stage == "start":
            return _start(msg, context, call_next, rec)
        if stage == "step":
            return _step(msg, context, rec)
        if stage == "identify":
            return _identify(msg, context, rec)
        if stage == "hello":  # the Paillier workflow asks who is the key holder; the ClientApp is not called
            from fl.runners.flower.mod_paillier import client_hello

            return client_hello(msg)
        raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")
    except (PolicyError, ProtocolError, CodecError, OverflowRiskError, CompositionError, ValueError,
            RuntimeError) as exc:
        return _error(msg, exc)
