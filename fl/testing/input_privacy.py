"""``assert_input_private``: run a secure sum with a recording server and check what the server saw.

Four checks, each playing the server against the real client machines:

1. **uniform uploads** -- every vector the server received, with inputs chosen adversarially (half the
   clients send all zeros, half the ring's maximum), is indistinguishable from uniform on Z_2^k: a
   chi-square test per byte lane and a binomial test per bit, Bonferroni-corrected to ``significance``,
   on the uploads and on the differences of disjoint pairs of uploads (so a mask two clients share fails);
2. **one kind of share** -- no client's self-mask seed shares *and* mask-key shares both reached the
   server (the recorded ``UnmaskResponse`` messages of a round with one client dropped after sharing);
3. **refusals** -- fresh honest clients refuse (``ProtocolError``) an unmask request naming a client both
   alive and dropped, one naming fewer than t survivors, and a key directory showing a shrunken cohort;
4. **ledger** -- the sum's ``guarantees`` claim input privacy against the server only for rounds with at
   least 2 included clients, with the t and k the server machine used (and the t the clients derived).

Failure raises :class:`fl.testing.assertions.PrivacyAssertionError` naming the failed check(s) and what
to suspect; check 2 also fails when the server merely *asked* for both kinds (honest clients refuse, so
the round may abort; the checks then judge what the server saw until then). Checks that do not apply
(no unmask step, as in ``PlainSum``) are reported as ``n/a``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.spec import Guarantee, RoundInfo, SecureSum, ValueSpec
from fl.testing.assertions import InputPrivacyRequirement, PrivacyAssertionError
from secagg.errors import AbortError, ProtocolError
from secagg.machine import ClientMachine, Message, ServerMachine
from secagg.ring import ring_bits

__all__ = ["CheckResult", "InputPrivacyReport", "assert_input_private"]

log = logging.getLogger(__name__)

_DROP_PHASE = "masked"  # dropped clients share their keys, then go silent: the server must ask for s-shares
_DROP_INDEX = 2  # the masked phase's index in SecAgg(+) (a one-phase sum: the client never takes part)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome: ``status`` is ``"pass"``, ``"FAIL"`` or ``"n/a"``."""

    name: str
    status: str
    detail: str
    suspect: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass(frozen=True, slots=True)
class InputPrivacyReport:
    """Every check's result for one target, readable with ``str()``."""

    target: str
    checks: tuple[CheckResult, ...]

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.failed)

    def __str__(self) -> str:
        bad = self.failed
        head = (f"input privacy FAILED for {self.target}: {', '.join(c.name for c in bad)}" if bad
                else f"input privacy checks passed for {self.target}")
        lines = [head]
        for c in self.checks:
            lines.append(f"  [{c.status}] {c.name}: {c.detail}")
            if c.failed and c.suspect:
                lines.append(f"         suspect: {c.suspect}")
        return "\n".join(lines)


# ---- recording ---------------------------------------------------------------------------------------


class _RecordingServer:
    """The real server machine, with every message it received and sent kept for the checks."""

    def __init__(self, inner: ServerMachine) -> None:
        self.inner = inner
        self.seen: list[Message] = []
        self.sent: list[Message] = []

    @property
    def phases(self) -> tuple[str, ...]:
        return self.inner.phases

    @property
    def phase(self) -> str:
        return self.inner.phase

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def result(self) -> Any:
        return self.inner.result

    @property
    def included(self) -> tuple[int, ...]:
        return self.inner.included

    def start(self) -> list[Message]:
        return self._out(self.inner.start())

    def receive(self, msg: Message) -> list[Message]:
        self.seen.append(msg)
        return self._out(self.inner.receive(msg))

    def end_phase(self) -> list[Message]:
        return self._out(self.inner.end_phase())

    def _out(self, msgs: list[Message]) -> list[Message]:
        self.sent += msgs
        return msgs


@dataclass
class _RecordingSum:
    """``ssum`` with its server machine wrapped in a :class:`_RecordingServer`."""

    inner: SecureSum
    servers: list[_RecordingServer] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def bind(self, spec: ValueSpec) -> ValueSpec:
        return self.inner.bind(spec)

    def min_included(self, spec: ValueSpec) -> int:
        return self.inner.min_included(spec)

    @property
    def hides_updates(self) -> bool:
        return self.inner.hides_updates

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        return self.inner.client(cid, value, spec=spec, session=session, round=round)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        rec = _RecordingServer(self.inner.server(cids, spec=spec, session=session, round=round))
        self.servers.append(rec)
        return rec

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return self.inner.parties(spec=spec, session=session, round=round)

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return self.inner.guarantees(spec, info)


def _adversarial_values(spec: ValueSpec, n: int) -> dict[int, NDArray[Any]]:
    """Half the clients send all zeros, half the largest value: the inputs easiest to spot unmasked."""
    if spec.domain == "ring" and spec.modulus is not None:
        top: Any = np.uint64(spec.modulus - 1)
        return {c: np.full(spec.size, top if c % 2 else 0, dtype=np.uint64) for c in range(n)}
    top = spec.coord_bound or 1.0
    return {c: np.full(spec.size, top if c % 2 else 0.0, dtype=np.float64) for c in range(n)}


# ---- check 1: uploads uniform ------------------------------------------------------------------------


def _uploads(msgs: Sequence[Message]) -> list[tuple[int, NDArray[Any]]]:
    """(sender, vector) for every array-valued field of the messages the server received."""
    out: list[tuple[int, NDArray[Any]]] = []
    for m in msgs:
        if not dataclasses.is_dataclass(m):
            continue
        for f in dataclasses.fields(m):
            v = getattr(m, f.name)
            if isinstance(v, np.ndarray) and v.size:
                out.append((m.sender, v))
    return out


def _uniformity(words: NDArray[np.uint64], bits: int, significance: float) -> tuple[bool, str]:
    """Chi-square per 8-bit lane and a two-sided binomial z-test per bit, Bonferroni over all of them."""
    from scipy import stats

    lanes = [(lo, min(8, bits - lo)) for lo in range(0, bits, 8)]
    alpha = significance / (len(lanes) + bits)
    n = words.size
    worst = (1.0, "")
    for lo, width in lanes:
        vals = ((words >> np.uint64(lo)) & np.uint64((1 << width) - 1)).astype(np.int64)
        counts = np.bincount(vals, minlength=1 << width)
        exp = n / (1 << width)
        chi2 = float(((counts - exp) ** 2 / exp).sum())
        p = float(stats.chi2.sf(chi2, (1 << width) - 1))
        if p < worst[0]:
            worst = (p, f"bits {lo}..{lo + width - 1}: {int((counts > 0).sum())} of {1 << width} values seen, "
                        f"chi2 = {chi2:.4g} on {(1 << width) - 1} dof, p = {p:.3g}")
    for b in range(bits):
        ones = int(((words >> np.uint64(b)) & np.uint64(1)).sum())
        z = (ones - n / 2) / math.sqrt(n / 4)
        p = float(2 * stats.norm.sf(abs(z)))
        if p < worst[0]:
            worst = (p, f"bit {b}: {ones} ones of {n} (z = {z:.3g}, p = {p:.3g})")
    ok = worst[0] >= alpha
    summary = f"{n} words in Z_2^{bits}, {len(lanes)} byte-lane and {bits} bit tests at alpha = {alpha:.3g} each"
    return ok, f"{summary}; most extreme: {worst[1] or 'none'}"


def _check_uniform(rec: _RecordingServer, spec: ValueSpec, significance: float) -> CheckResult:
    """Check 1: the clients' uploads (and differences of disjoint pairs) are uniform on Z_2^k."""
    name = "1 uploads uniform"
    ups = [(c, v) for c, v in _uploads(rec.seen) if c >= 0]  # other roles (a key holder) may send the sum
    suspect = ("the sum sends inputs in the clear or with a weak or missing mask (self-mask or pairwise masks "
               "skipped, a constant or reused seed, masks not expanded over the whole vector)")
    if not ups:
        return CheckResult(name, "FAIL", "the clients uploaded no vectors, so nothing could be checked",
                           "assert_input_private checks masking sums (SecAgg, SecAgg+), whose clients upload words "
                           "of Z_2^k; input privacy by encryption (Paillier ciphertexts) is not covered")
    if any(v.dtype.kind not in "ui" for _, v in ups):
        kinds = sorted({str(v.dtype) for _, v in ups})
        return CheckResult(name, "FAIL", f"the server received {', '.join(kinds)} vectors, not words of a ring: "
                           "the inputs reach it unmasked", suspect)
    if spec.modulus is None:
        return CheckResult(name, "FAIL", "the sum's spec has no ring modulus, so nothing masks the inputs", suspect)
    bits = ring_bits(spec.modulus)
    mask = np.uint64(spec.modulus - 1) if bits < 64 else np.uint64(2**64 - 1)
    vecs = [v.astype(np.uint64).ravel() & mask for _, v in ups]
    ok, detail = _uniformity(np.concatenate(vecs), bits, significance / 2)
    senders = sorted({s for s, _ in ups})
    detail = f"uploads of clients {senders} (inputs all 0 or all 2^{bits}-1): {detail}"
    diffs = [(a - b) & mask for a, b in zip(vecs[0::2], vecs[1::2], strict=False) if a.shape == b.shape]
    if diffs:  # disjoint pairs: a mask shared by two clients cancels here while each upload looks uniform
        ok2, detail2 = _uniformity(np.concatenate(diffs), bits, significance / 2)
        detail += f"; differences of {len(diffs)} disjoint upload pairs: {detail2}"
        if ok and not ok2:
            suspect = ("two clients' uploads differ by a non-uniform amount: their masks are equal or cancel "
                       "pairwise (a reused seed, or a self-mask missing so only pairwise masks remain)")
        ok = ok and ok2
    return CheckResult(name, "pass" if ok else "FAIL", detail, "" if ok else suspect)


# ---- check 2: never both kinds of share --------------------------------------------------------------


def _asked_both(sent: Sequence[Message]) -> list[int]:
    """Clients whose self-mask seed one unmask request and whose mask key another (or the same) asks for."""
    from secagg.masking.messages import UnmaskRequest

    reqs = [m for m in sent if isinstance(m, UnmaskRequest)]
    asked_b = {v for m in reqs for v in m.alive}
    asked_s = {v for m in reqs for v in m.dropped}
    return sorted(asked_b & asked_s)


def _check_one_kind(rec: _RecordingServer, t: int | None) -> CheckResult:
    """Check 2: the server neither asked for nor received both kinds of share of any client."""
    name = "2 one kind of share per client"
    asked = _asked_both(rec.sent)
    if asked:
        return CheckResult(
            name, "FAIL",
            f"the server asked for self-mask and mask-key shares of client(s) {asked} (its unmask requests name "
            "them alive and dropped); had t clients answered, it would hold their inputs",
            "the server's unmask requests: each client must be asked for exactly one kind of share per round",
        )
    resp = [m for m in rec.seen if all(hasattr(m, a) for a in ("alive", "b_shares", "dropped", "s_shares"))]
    if not resp:
        return CheckResult(name, "n/a", "the protocol has no unmask responses")
    b_of: dict[int, set[int]] = {}
    s_of: dict[int, set[int]] = {}
    for m in resp:
        for v in m.alive:  # type: ignore[attr-defined]
            b_of.setdefault(v, set()).add(m.sender)
        for v in m.dropped:  # type: ignore[attr-defined]
            s_of.setdefault(v, set()).add(m.sender)
    both = sorted(set(b_of) & set(s_of))
    if both:
        v = both[0]
        return CheckResult(
            name, "FAIL",
            f"the server holds self-mask shares of client(s) {both} and their mask-key shares too (client {v}: "
            f"{len(b_of[v])} and {len(s_of[v])} shares; t = {t}): with t of each it strips every mask",
            "the server asks for both kinds of share of one client, and clients answer: the alive/dropped "
            "refusal in the client's unmask handling is missing",
        )
    return CheckResult(name, "pass", f"{len(resp)} unmask responses: self-mask shares of {sorted(b_of)}, mask-key "
                       f"shares of {sorted(s_of)}, no client in both")


# ---- check 3: refusals -------------------------------------------------------------------------------


def _drive_to_unmask(srv: ServerMachine, parties: Mapping[int, ClientMachine], drop: set[int]) -> dict[int, Any]:
    """Run a round honestly until the server's unmask requests; ``drop`` goes silent at the masked phase."""
    from secagg.masking.messages import UnmaskRequest

    out = [m for c in sorted(parties) for m in parties[c].start()]
    phases = srv.phases
    cut = phases.index(_DROP_PHASE) if _DROP_PHASE in phases else len(phases)
    while not srv.done:
        for m in out:
            srv.receive(m)
        out = []
        down = srv.end_phase()
        reqs = {m.recipient: m for m in down if isinstance(m, UnmaskRequest)}
        if reqs:
            return reqs
        late = srv.phase in phases and phases.index(srv.phase) >= cut
        for m in down:
            if m.recipient in parties and not (late and m.recipient in drop):
                out += parties[m.recipient].receive(m)
    return {}


def _refused(client: ClientMachine, msg: Message, attack: str) -> tuple[bool, str]:
    """Deliver ``msg``; (True, reason) when the client refuses with ``ProtocolError``."""
    try:
        replies = client.receive(msg)
    except ProtocolError as exc:
        return True, f"{attack}: refused ({exc})"
    except Exception as exc:  # any other error is not a clear refusal
        return False, f"{attack}: raised {type(exc).__name__} ({exc}) instead of ProtocolError"
    return False, f"{attack}: client {client.cid} ANSWERED ({', '.join(type(r).__name__ for r in replies)})"


def _attack_requests(reqs: Mapping[int, Any], t: int) -> list[tuple[int, Message, str]]:
    """(recipient, request, description): alive-and-dropped, and fewer than t survivors."""
    out: list[tuple[int, Message, str]] = []
    us = sorted(reqs)
    u = us[0]
    victim = next(v for v in reqs[u].alive if v != u)
    both = dataclasses.replace(reqs[u], dropped=tuple(sorted({*reqs[u].dropped, victim})))
    out.append((u, both, f"unmask request naming client {victim} both alive and dropped"))
    if len(us) > 1:
        u2, r2 = us[1], reqs[us[1]]
        others = [v for v in r2.alive if v != u2]
        keep = tuple(sorted([u2, *others[: max(0, t - 2)]]))
        moved = set(r2.alive) - set(keep)
        few = dataclasses.replace(r2, alive=keep, dropped=tuple(sorted({*r2.dropped, *moved})))
        out.append((u2, few, f"unmask request naming {len(keep)} survivors (t = {t}), the rest 'dropped'"))
    return out


def _shrunken_directory(ssum: SecureSum, spec: ValueSpec, session: bytes, values: Mapping[int, Any]) -> \
        tuple[ClientMachine, Message] | None:
    """A fresh client and a key directory showing a cohort of just it and one other client."""
    from secagg.machine import SERVER
    from secagg.masking.messages import AdvertiseKeys, KeyDirectory

    a, b = sorted(values)[:2]
    pair = {c: ssum.client(c, values[c], spec=spec, session=session, round=1) for c in (a, b)}
    ads = {c: pair[c].start()[0] for c in (a, b)}
    if not all(isinstance(m, AdvertiseKeys) for m in ads.values()):
        return None
    ks = [ads[a], ads[b]]
    return pair[a], KeyDirectory(SERVER, a, session, 1, (a, b), (a, b), tuple(k.c_pk for k in ks),  # type: ignore[attr-defined]
                                 tuple(k.s_pk for k in ks), tuple(k.signature for k in ks),  # type: ignore[attr-defined]
                                 tuple(k.b_commit for k in ks))  # type: ignore[attr-defined]


def _check_refusals(ssum: SecureSum, spec: ValueSpec, values: Mapping[int, Any], drop: set[int]) -> \
        tuple[CheckResult, set[int]]:
    """Check 3: fresh honest clients refuse the crafted unmask requests and a shrunken key directory.

    Also returns the thresholds t the driven clients derived themselves (for check 4).
    """
    name = "3 adversarial requests refused"
    session = b"assert-input-private:" + os.urandom(8)
    srv = ssum.server(sorted(values), spec=spec, session=session, round=1)
    parties = {c: ssum.client(c, v, spec=spec, session=session, round=1) for c, v in values.items()}
    try:
        reqs = _drive_to_unmask(srv, parties, drop)
    except AbortError as exc:
        return CheckResult(name, "FAIL", f"an honest round aborted before its unmask requests: {exc}",
                           "the sum cannot finish a round with one client dropped after sharing its keys"), set()
    client_ts = {int(t_) for t_ in (getattr(p, "_t", None) for p in parties.values()) if t_}
    t = int(getattr(srv, "threshold", 0))
    results: list[tuple[bool, str]] = []
    if reqs:
        results += [_refused(parties[u], m, what) for u, m, what in _attack_requests(reqs, t)]
    shrunk = _shrunken_directory(ssum, spec, session + b"-shrunk", values)
    if shrunk is not None:
        results.append(_refused(shrunk[0], shrunk[1], f"key directory showing a cohort of 2 of {len(values)}"))
    if not results:
        return CheckResult(name, "n/a", "the protocol has no unmask step and no key directory"), client_ts
    bad = [d for ok, d in results if not ok]
    detail = "; ".join(d for _, d in results)
    if bad:
        return CheckResult(name, "FAIL", detail,
                           "the client machine answers requests it must refuse: check its unmask-request and "
                           "key-directory validation (alive/dropped overlap, the t survivors, min_cohort)"), client_ts
    return CheckResult(name, "pass", detail), client_ts


# ---- check 4: the ledger -----------------------------------------------------------------------------


def _claims(ssum: SecureSum, spec: ValueSpec, cids: Sequence[int], included: Sequence[int]) -> list[Guarantee]:
    """The sum's guarantees claiming input privacy against the server, for a round with ``included``."""
    info = RoundInfo(round=0, planned=tuple(cids), included=tuple(included), population=len(cids), sample_rate=1.0)
    req = InputPrivacyRequirement("server")
    return [g for g in ssum.guarantees(spec, info) if req.met_by(g.as_dict())]


def _check_ledger(ssum: SecureSum, spec: ValueSpec, cids: Sequence[int], included: Sequence[int] | None,
                  srv: Any, client_ts: set[int]) -> CheckResult:
    """Check 4. ``included``: the run's included clients, ``None`` when it aborted (nothing released);
    ``client_ts``: the thresholds the clients derived from their own configuration."""
    name = "4 ledger matches the run"
    problems: list[str] = []
    claims = _claims(ssum, spec, cids, cids if included is None else included)
    if included is not None and claims and len(included) < 2:
        problems.append(f"claims input privacy for a run with {len(included)} included client(s)")
    if _claims(ssum, spec, cids, tuple(cids[:1])):
        problems.append("claims input privacy for a round whose sum holds one client's update")
    t, graph = getattr(srv, "threshold", None), getattr(srv, "graph", None)
    k = getattr(graph, "k", None)
    if t is not None and client_ts - {t}:
        problems.append(f"the clients derived t = {sorted(client_ts)} but the server machine used t = {t}")
    for g in claims:
        if t is not None and g.params.get("t") != t:
            problems.append(f"states t = {g.params.get('t')} but the server machine used t = {t}")
        if k is not None and g.params.get("k") != k:
            problems.append(f"states k = {g.params.get('k')} but the server machine's graph has k = {k}")
    if problems:
        return CheckResult(name, "FAIL", "; ".join(problems),
                           "the sum's guarantees() are computed from other parameters than its machines use")
    said = f"claims input privacy against the server with t = {t}, k = {k}" if claims else "claims no input privacy"
    if client_ts:
        said += f" (the clients' own t: {sorted(client_ts)})"
    ran = "the round aborted" if included is None else f"{len(included)} included"
    return CheckResult(name, "pass", f"{ran}; the ledger {said}; no claim for 1 included")


# ---- the assertion -----------------------------------------------------------------------------------


def _sum_and_spec(target: Any, spec: ValueSpec | None, clients: int, size: int) -> tuple[SecureSum, ValueSpec, str]:
    """The secure sum to run, the (bound) spec of its input, and a name for the report."""
    from fl.pipeline import Pipeline

    if isinstance(target, Pipeline):
        bound = target.bind(spec or ValueSpec(size=size, cohort=clients))
        return target.sum, bound.sum_spec, f"pipeline {target.name}"
    if all(hasattr(target, a) for a in ("client", "server", "guarantees", "bind")):
        s = spec or ValueSpec(size=size, cohort=clients, domain="ring", modulus=1 << 32, value_bits=16)
        target.bind(s)
        return target, s, f"secure sum {getattr(target, 'name', repr(target))}"
    raise TypeError("assert_input_private checks an fl.pipeline.Pipeline or a SecureSum (e.g. "
                    f"fl.sums.secagg.SecAgg(threshold=0.7)); got {target!r}")


def assert_input_private(
    target: Any,
    *,
    spec: ValueSpec | None = None,
    clients: int = 6,
    size: int = 512,
    significance: float = 1e-6,
) -> InputPrivacyReport:
    """Fail unless the server of ``target``'s secure sum learns nothing but the sum (the four checks above).

    ``target``: a ``Pipeline`` (its sum is run on the spec its layers produce from ``spec``, default a real
    vector of ``size`` for a cohort of ``clients``) or a ``SecureSum`` (``spec``: its ring input, default
    Z_2^32 with 16-bit values). ``clients`` take part (ids 0..clients-1; the last drops after sharing its
    keys); ``significance``: the chance that a correct sum fails check 1 (Bonferroni over all tests).
    Returns the :class:`InputPrivacyReport` when every check passes.
    """
    if clients < 4:
        raise ValueError(f"clients={clients}: use at least 4 (one drops, and three attacks need survivors)")
    from fl.runners.local import DropoutSchedule, run_secure_sum

    ssum, sspec, what = _sum_and_spec(target, spec, clients, size)
    if ssum.parties(spec=sspec, session=b"probe", round=0):
        raise TypeError(f"assert_input_private checks masking sums run by clients and a server; {ssum.name} has "
                        "other roles (e.g. a Paillier key holder), whose input privacy these checks do not cover")
    values = _adversarial_values(sspec, clients)
    drop = {clients - 1}
    rec_sum = _RecordingSum(ssum)
    try:
        outcome = run_secure_sum(rec_sum, values, spec=sspec, session=b"assert-input-private:" + os.urandom(8),
                                 dropouts=DropoutSchedule(dict.fromkeys(drop, _DROP_INDEX)))
        included: tuple[int, ...] | None = outcome.included
    except (AbortError, ProtocolError) as exc:  # e.g. honest clients refused it: check what it saw up to then
        log.warning("the recorded round did not finish: %s", exc)
        included = None
    rec = rec_sum.servers[-1]
    refusals, client_ts = _check_refusals(ssum, sspec, values, drop)
    checks = (
        _check_uniform(rec, sspec, significance),
        _check_one_kind(rec, getattr(rec.inner, "threshold", None)),
        refusals,
        _check_ledger(ssum, sspec, sorted(values), included, rec.inner, client_ts),
    )
    report = InputPrivacyReport(what, checks)
    if report.failed:
        raise PrivacyAssertionError(str(report))
    return report
