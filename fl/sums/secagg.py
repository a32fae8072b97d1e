"""SecAgg (Bonawitz et al. CCS 2017) and SecAgg+ (Bell et al. CCS 2020) as pipeline secure sums.

Both mask integers in Z_{2^k}: put ``Quantize(bits=...)`` before them. ``bind`` checks that the ring
holds the sum of the whole cohort (``value_bits + ceil(log2(cohort)) <= k``), so the sum can never wrap
silently (the peer's overflow check tested the wrong quantity and wrapped at 1024 clients).

Authenticated mode needs identity keys set up before the round (a PKI). Each adapter instance owns an
:class:`IdentityRegistry` created at construction: Ed25519 keys drawn from ``os.urandom`` the first time
a client id is seen, held for the adapter's lifetime -- it plays the role of the set-up phase. Across
processes (Flower) each party instead gets :class:`FixedIdentities` (:func:`with_identities`): its own
private key, if it is a client, and everyone's public keys from a roster it received out of band.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from numpy.typing import NDArray

from fl.spec import CompositionError, Guarantee, RoundInfo, ValueSpec
from fl.sums.plain import threshold_count
from secagg.machine import ClientMachine, ServerMachine
from secagg.masking.client import IdentityKeys, SecAggClient
from secagg.masking.graph import GraphSpec, achieved_bits
from secagg.masking.server import SecAggServer
from secagg.ring import is_ring_modulus, ring_bits, ring_bits_for

__all__ = ["FixedIdentities", "Identities", "IdentityRegistry", "SecAgg", "SecAggPlus", "max_colluders",
           "with_identities"]

_RING_MESSAGE = "SecAgg masks integers in Z_2^k: put Quantize(bits=...) before it"


class IdentityRegistry:
    """The PKI of authenticated mode: one Ed25519 identity key per client id, from a CSPRNG."""

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._rand = random_bytes
        self._keys: dict[int, IdentityKeys] = {}
        self._public: dict[int, bytes] = {}

    def ensure(self, cids: Iterable[int]) -> None:
        """Set up keys for clients not seen before."""
        for cid in cids:
            if cid not in self._keys:
                keys = IdentityKeys.generate(self._rand)
                self._keys[cid] = keys
                self._public[cid] = keys.public

    def private(self, cid: int) -> bytes:
        self.ensure([cid])
        return self._keys[cid].private

    def publics(self) -> Mapping[int, bytes]:
        """A read-only live view of every client's public identity key."""
        return MappingProxyType(self._public)


class Identities(Protocol):
    """Where a masked sum takes identity keys from in authenticated mode."""

    def ensure(self, cids: Iterable[int]) -> None: ...

    def private(self, cid: int) -> bytes: ...

    def publics(self) -> Mapping[int, bytes]: ...


class FixedIdentities:
    """Identity keys set up outside this process: everyone's public keys, and at most one private key.

    ``publics``: client id -> raw Ed25519 public key (e.g. a consortium roster every party received out of
    band). ``own``: ``(cid, private key)`` of the one client this process plays (``None`` on the server,
    which needs only public keys). A client id outside ``publics`` is an error, never a fresh key.
    """

    def __init__(self, publics: Mapping[int, bytes], own: tuple[int, bytes] | None = None) -> None:
        self._public = MappingProxyType(dict(publics))
        self._own = own
        if own is not None and own[0] not in self._public:
            raise ValueError(f"client {own[0]} has a private identity key but no public key in the roster")

    def ensure(self, cids: Iterable[int]) -> None:
        """Refuse clients without a public identity key (nobody could check their signatures)."""
        missing = sorted(set(cids) - set(self._public))
        if missing:
            raise ValueError(f"client(s) {missing} have no public identity key in the roster: add them to the "
                             "roster every node holds, or leave them out of the run")

    def private(self, cid: int) -> bytes:
        if self._own is None or self._own[0] != cid:
            raise ValueError(f"this process holds no private identity key of client {cid} (only its own)")
        return self._own[1]

    def publics(self) -> Mapping[int, bytes]:
        return self._public


def with_identities(ssum: Any, identities: Identities) -> Any:
    """``ssum`` (a :class:`SecAgg` or :class:`SecAggPlus`) taking its identity keys from ``identities``."""
    if not isinstance(ssum, _MaskedSum):
        raise TypeError(f"identity keys are for SecAgg/SecAggPlus, not {type(ssum).__name__}")
    return dataclasses.replace(ssum, registry=identities)  # type: ignore[type-var]


def _check_ring(spec: ValueSpec) -> None:
    m = spec.modulus
    if spec.domain != "ring" or m is None or not is_ring_modulus(m):
        raise CompositionError(_RING_MESSAGE)
    if spec.value_bits is None:
        raise CompositionError(
            "SecAgg needs the bit width of each client's value to check that the cohort's sum cannot wrap: "
            "put Quantize(bits=...) before it"
        )
    need, have = ring_bits_for(spec.value_bits, spec.cohort), ring_bits(m)
    if need > have:
        raise CompositionError(
            f"the sum of {spec.cohort} clients' {spec.value_bits}-bit values needs a {need}-bit ring but the "
            f"modulus is 2^{have}: it would wrap. Size Quantize for the cohort"
        )


def _check_threshold(threshold: float | int, m: int, *, authenticated: bool) -> int:
    """t for a share group of ``m``; refuses t < 2 and, in authenticated mode, 2t <= m (split view)."""
    return _check_t(threshold_count(threshold, m), m, authenticated=authenticated, what=f"threshold {threshold}")


def _check_t(t: int, m: int, *, authenticated: bool, what: str) -> int:
    """Refuse t < 2, t > m and, in authenticated mode, 2t <= m (split view); ``what`` names the setting."""
    if t < 2:
        raise CompositionError(f"{what} gives t={t}: one share would reveal a secret; use t >= 2")
    if t > m:
        raise CompositionError(f"{what} gives t={t} > {m} share holders: no round could finish")
    if authenticated and 2 * t <= m:
        raise CompositionError(
            f"authenticated mode with t={t} of {m} (2t <= {m}): an active server showing two survivor lists "
            f"recovers inputs with no colluder at all; use a threshold above one half (t >= {m // 2 + 1})"
        )
    return t


def max_colluders(t: int, m: int, *, authenticated: bool) -> int:
    """The most colluding clients (per share group of ``m``) against which input privacy is proved.

    Honest-but-curious server: any t - 1 clients (fewer than t shares of any secret). Active server with
    the consistency check (authenticated mode): also 2t > m + c, else a server showing two survivor lists
    gets t shares of both a victim's self-mask seed and its mask key -- so c <= min(t - 1, 2t - m - 1).
    """
    c = t - 1
    if authenticated:
        c = min(c, 2 * t - m - 1)
    return max(c, -1)


def _check_cohort(spec: ValueSpec, min_included: int) -> None:
    if spec.cohort < min_included:
        raise CompositionError(
            f"a secure sum over a cohort of {spec.cohort} client(s) cannot hide anyone's input (it needs at "
            f"least {min_included} included clients): sample a cohort of at least {min_included}"
        )


class _MaskedSum:
    """The SecureSum methods SecAgg and SecAggPlus share; they differ only in their graph and bind checks."""

    __slots__ = ()
    threshold: float | int | None
    authenticated: bool
    min_cohort: int | None
    registry: Identities

    @property
    def name(self) -> str:
        raise TypeError("subclasses name themselves")

    def _graph(self) -> GraphSpec:
        raise TypeError("subclasses define their neighbour graph")

    @property
    def hides_updates(self) -> bool:
        """True: the server learns only the sum of the included clients' values."""
        return True

    def client(self, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int) -> ClientMachine:
        return _client(self, cid, value, spec=spec, session=session, round=round)

    def server(self, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int) -> ServerMachine:
        return _server(self, cids, spec=spec, session=session, round=round)

    def parties(self, *, spec: ValueSpec, session: bytes, round: int) -> Mapping[int, ClientMachine]:
        return {}

    def min_included(self, spec: ValueSpec) -> int:
        """The fewest included clients a round can have: t of a share group (never below 2)."""
        return max(2, self._graph().parameters(max(2, spec.cohort), self.threshold)[1])

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        return (_guarantee(self.name, self._graph(), self.threshold, self.authenticated, spec, info),)


@dataclass(frozen=True, slots=True)
class SecAgg(_MaskedSum):
    """Pairwise-masked secure aggregation over the complete graph (the original protocol).

    ``threshold``: fraction of the cohort (0, 1], or an absolute count t: every phase needs t survivors.
    ``authenticated``: Ed25519-signed keys and the consistency-check round (active-server security).
    ``min_cohort``: the smallest cohort a client accepts (its own configuration, never the server's
    word); ``None``: the planned cohort, i.e. the bound spec's ``cohort``.
    """

    threshold: float | int = 0.7
    authenticated: bool = False
    min_cohort: int | None = None
    registry: Identities = field(default_factory=IdentityRegistry, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "secagg"

    def _graph(self) -> GraphSpec:
        return GraphSpec(complete=True)

    def bind(self, spec: ValueSpec) -> ValueSpec:
        _check_ring(spec)
        _check_cohort(spec, 2)
        _check_threshold(self.threshold, spec.cohort, authenticated=self.authenticated)
        _check_min_cohort(self, spec)
        return spec



@dataclass(frozen=True, slots=True)
class SecAggPlus(_MaskedSum):
    """SecAgg+ : each client masks against, and shares secrets with, k neighbours of a public random graph.

    ``neighbours``: k; ``None`` finds the smallest k (and its threshold t) meeting ``security_bits`` and
    ``correctness_bits`` when at most a ``dropout`` fraction of the clients drop and a ``corrupt``
    fraction are corrupt, from exact hypergeometric tails (:func:`secagg.masking.graph.find_parameters`; small
    cohorts get the complete graph). ``threshold``: ``None`` takes that t (or, with explicit
    ``neighbours``, the smallest t meeting ``security_bits``); a fraction of each share group (a client
    and its k neighbours) or an absolute count overrides it, and the guarantee then states the bits it
    achieves. ``authenticated``: signed keys and the consistency check, parameters for an active server.
    ``min_cohort``: as for :class:`SecAgg`.
    """

    threshold: float | int | None = None
    neighbours: int | None = None
    authenticated: bool = False
    min_cohort: int | None = None
    security_bits: float = 40.0
    correctness_bits: float = 30.0
    dropout: float = 0.1
    corrupt: float = 0.1
    registry: Identities = field(default_factory=IdentityRegistry, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "secagg+"

    def _graph(self) -> GraphSpec:
        return GraphSpec(
            complete=False,
            neighbours=self.neighbours,
            sigma=self.security_bits,
            eta=self.correctness_bits,
            dropout=self.dropout,
            corrupt=self.corrupt,
            active=self.authenticated,
        )

    def bind(self, spec: ValueSpec) -> ValueSpec:
        _check_ring(spec)
        if self.neighbours is not None and self.neighbours < 2:
            raise CompositionError(f"SecAggPlus(neighbours=...) needs at least 2 neighbours, got {self.neighbours}")
        _check_cohort(spec, 2)
        try:
            k, t = self._graph().parameters(spec.cohort, self.threshold)
        except ValueError as exc:
            raise CompositionError(str(exc)) from exc
        _check_t(t, k + 1, authenticated=self.authenticated, what=f"threshold {self.threshold}")
        _check_min_cohort(self, spec)
        return spec


def _client(
    ad: _MaskedSum, cid: int, value: NDArray[Any], *, spec: ValueSpec, session: bytes, round: int
) -> SecAggClient:
    _check_ring(spec)
    assert spec.modulus is not None
    return SecAggClient(
        cid,
        value,
        session=session,
        round=round,
        modulus=spec.modulus,
        size=spec.size,
        threshold=ad.threshold,
        min_cohort=_min_cohort(ad, spec),
        graph=ad._graph(),
        identity_key=ad.registry.private(cid) if ad.authenticated else None,
        identities=ad.registry.publics() if ad.authenticated else None,
    )


def _check_min_cohort(ad: _MaskedSum, spec: ValueSpec) -> None:
    if ad.min_cohort is not None and not 2 <= ad.min_cohort <= spec.cohort:
        raise CompositionError(
            f"min_cohort={ad.min_cohort} must be in [2, {spec.cohort}] (the planned cohort): clients refuse "
            f"any round whose cohort is smaller"
        )


def _min_cohort(ad: _MaskedSum, spec: ValueSpec) -> int:
    """The client's own floor on the cohort size: configured, else the planned cohort of the bound spec."""
    m = spec.cohort if ad.min_cohort is None else ad.min_cohort
    if m < 2:
        raise CompositionError(
            f"a secure sum over {m} client(s) protects nobody: plan a cohort of at least 2 (min_cohort={m})"
        )
    return m


def _server(
    ad: _MaskedSum, cids: Sequence[int], *, spec: ValueSpec, session: bytes, round: int
) -> SecAggServer:
    _check_ring(spec)
    assert spec.modulus is not None
    if ad.authenticated:
        ad.registry.ensure(cids)
    return SecAggServer(
        cids,
        session=session,
        round=round,
        modulus=spec.modulus,
        size=spec.size,
        threshold=ad.threshold,
        graph=ad._graph(),
        identities=ad.registry.publics() if ad.authenticated else None,
    )


def _guarantee(
    name: str, graph: GraphSpec, threshold: float | int | None, authenticated: bool, spec: ValueSpec, info: RoundInfo
) -> Guarantee:
    n = max(1, len(info.planned))
    k, t = graph.parameters(n, threshold)
    m = k + 1
    complete = k >= n - 1
    c = max_colluders(t, m, authenticated=authenticated)
    scope = "cohort" if complete else "share group"
    who = "an active (malicious) server" if authenticated else "an honest-but-curious server"
    against = (
        f"{who} colluding with at most {c} clients"
        if complete
        else f"{who} colluding with at most {c} clients of any share group (< {graph.corrupt:.0%} of all clients)"
    )
    bound = f"at most {c} colluding clients per {scope}: c <= t - 1"
    if authenticated:
        bound += f" and 2t > {scope} + c (t = {t}, {scope} = {m})"
    assumptions = [
        f"t = {t} of each {scope} of {m}",
        f"k = {k} neighbours"
        + (" (complete graph)" if complete else " (Harary graph under a public pseudorandom permutation)"),
        "X25519, HKDF-SHA256, AES-GCM and AES-CTR are secure",
        bound,
        f"at most {m - t} dropouts per {scope}",
    ]
    if authenticated:
        assumptions.append(
            "identity keys were distributed honestly at set-up (PKI); every client pins the planned cohort size "
            "(min_cohort) in its own configuration; messages are signed, so tampering is detected"
        )
    else:
        assumptions.append(
            "message integrity and client authentication come from the transport (TLS with server and client "
            "authentication); without it a network attacker can alter a masked input or substitute relayed keys "
            "undetected (wrong sum); altered shares are still caught by the self-mask commitments"
        )
    params: dict[str, Any] = {
        "t": t,
        "k": k,
        "n": n,
        "group": m,
        "authenticated": authenticated,
        "max_colluders": c,
        "max_dropouts": m - t,
        "modulus_bits": ring_bits(spec.modulus or 2),
        "included": info.n_included,
    }
    if not complete:
        sec, cor = achieved_bits(n, k, t, dropout=graph.dropout, corrupt=graph.corrupt, active=authenticated)
        assumptions.append(
            f"dropouts <= {graph.dropout:g} and corruptions <= {graph.corrupt:g} of clients, fixed before the "
            f"session seed: security 2^-{sec:.1f}, correctness 2^-{cor:.1f} (exact hypergeometric tails)"
        )
        params.update(sigma_bits=sec, eta_bits=cor, assumed_dropout=graph.dropout, assumed_corrupt=graph.corrupt)
    prop = "input privacy: the server learns only the sum of the included clients' updates"
    if info.n_included == 1 or c < 0:
        prop = "none: a sum of one client's update is that update"
        against = "no one"
    return Guarantee(layer=name, property=prop, against=against, assumptions=tuple(assumptions), params=params)
