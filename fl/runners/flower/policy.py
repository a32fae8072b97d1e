"""A SuperNode's own policy: what this node accepts from a job, whatever the server sends.

A Flower job arrives from the SuperLink, i.e. from whoever runs the server. Nothing in it selects code
(the wire codec is always :mod:`secagg.wire`) and nothing in it can weaken this node's privacy: the node
operator's :class:`NodePolicy` (a JSON file named by the ``policy-file`` key of the SuperNode's
``--node-config``, written by ``privagg flower policy`` and passed with ``privagg flower supernode
--policy``) pins the protocols it runs, the smallest threshold and cohort, the DP it requires of the
noise it adds itself, and the test seams. A job that asks for less is refused with
:class:`PolicyError`: the node logs it and sends the error back, and the ServerApp logs the reply.

Safe defaults (no policy file): SecAgg or SecAgg+ only (never ``plain``); on a complete graph (SecAgg,
or SecAgg+ when its k >= n - 1) a threshold >= 1/2 of the cohort; SecAgg+ on a sparse graph only with
(k, t) that keep 40 bits of security when 10% of the planned clients are corrupt and 10% drop (see
:class:`NodePolicy`); >= 2 clients, no seeded randomness, and only the installed privagg ClientApp (see
:mod:`fl.runners.flower.pin`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["POLICY_FILE_KEY", "SECURE_PROTOCOLS", "JobTerms", "NodePolicy", "PolicyError", "protocol_word", "sum_terms",
           "train_terms"]

POLICY_FILE_KEY = "policy-file"
"""The SuperNode ``--node-config`` key that names this node's policy file (JSON)."""

SECURE_PROTOCOLS = ("secagg", "secagg+")
"""Secure sums a node accepts by default (``plain`` sends the update in the clear)."""

_KNOWN_PROTOCOLS = ("secagg", "secagg+", "paillier", "plain")


class PolicyError(RuntimeError):
    """A job asks this node for less privacy (or other code) than the node's own policy allows."""


@dataclass(frozen=True)
class JobTerms:
    """What a job makes this node do, read from the objects the node built from it (not from strings).

    ``protocol``: ``secagg``, ``secagg+``, ``paillier`` or ``plain``; ``threshold_fraction``: the secure
    sum's t / n (None for a sum without a threshold); ``cohort``: the planned clients per round;
    ``own_noise``: the noise multiplier of the DP noise THIS node adds (distributed noise or DP-SGD),
    None if it adds none; ``central_noise``: the multiplier the server claims it adds (the node cannot
    check it); ``clip``: the L2 clip norm of the update (None: unclipped); ``epsilon``: the job's target
    budget (None: none); ``seeded``: the named test seam that derives noise from a public seed;
    ``authenticated``: SecAgg(+) with identity keys and the consistency round (active-server security).
    """

    protocol: str
    threshold_fraction: float | None
    cohort: int
    own_noise: float | None = None
    central_noise: float | None = None
    clip: float | None = None
    epsilon: float | None = None
    seeded: bool = False
    authenticated: bool = False
    graph: tuple[int, int] | None = None
    """SecAgg+ only: ``(k, t)``, the neighbour degree and threshold its graph uses for ``cohort`` clients."""


@dataclass(frozen=True)
class NodePolicy:
    """The node operator's terms; every field can only make the node stricter than the job.

    ``protocols``: secure sums this node runs (add ``"plain"`` only for public test data).
    ``min_threshold``: smallest t / n accepted (t survivors needed to unmask) on a complete graph: SecAgg,
    and SecAgg+ when its degree k >= n - 1. ``min_security_bits``, ``assumed_corrupt``, ``assumed_dropout``:
    how SecAgg+ on a sparse graph (k < n - 1) is judged instead (there t is a count in a share group of
    k + 1, and t / n says nothing); see below. ``min_clients``: smallest planned cohort.
    ``min_noise_multiplier``: if set, the node itself must add DP noise (``dnoise`` or ``dp-sgd``) with at
    least this multiplier; central noise does not count (the server adds it).
    ``max_epsilon``: if set, the job must target an (epsilon, delta) budget no larger than this.
    ``max_clip``: if set, updates must be clipped to at most this L2 norm. ``allow_insecure_seeded_randomness``:
    the test seam that makes DP noise repeatable from the job's seed (whoever knows it removes the noise).
    ``trusted_app_hashes``: SHA-256 (hex) of Flower app bundles (FABs) this node runs besides the
    installed privagg ClientApp; ``allow_any_app``: run any app the server ships (benchmarks of other
    apps on a test cluster only). ``paillier_key_fingerprint``: the fingerprint (hex) of the key holder's
    Paillier public key this client encrypts to; a ``paillier`` job naming another key is refused, and
    so is any ``paillier`` job while it is unset (else the server could name a key it holds itself).
    ``min_summands``: a key-holder node decrypts no aggregate of fewer clients (at least 2).
    ``require_authenticated``: run only authenticated SecAgg/SecAgg+ (signed messages and the consistency
    round, :mod:`fl.runners.flower.identity`). ``roster_sha256``: the SHA-256 (hex) of the consortium's identity
    roster this node accepts (``privagg flower policy --roster``).

    **The SecAgg+ bound.** For a sparse SecAgg+ graph the node takes the (k, t) the job's sum object will
    use for the planned cohort n (the parameter finder's choice, or the job's explicit threshold or
    neighbours: :attr:`JobTerms.graph`) and THIS policy's assumptions, never the job's: C = max(1,
    floor(assumed_corrupt * n)) corrupt clients colluding with the server and D = floor(assumed_dropout *
    n) dropouts, both sets fixed before the round's session seed fixes the graph. It accepts only if
    :func:`secagg.masking.graph.achieved_bits` (exact hypergeometric tails, union bounds) gives at least
    ``min_security_bits`` = sigma, i.e. P[some honest client has t corrupt neighbours (an authenticated
    job, an active server: more than 2t - k - 2), or the graph without the corrupt and dropped clients
    splits] <= 2^-(sigma + 1). Outside that event the server and the C corrupt clients learn nothing about
    this node's update beyond the sum of the honest clients' inputs that the round releases (Bell et al.,
    CCS 2020, section 3). Not covered: more corrupt or dropped clients than assumed, a cohort other than the
    planned one (Poisson sampling: the expected cohort is judged), and an active server against an
    unauthenticated job (use ``require_authenticated``). The finder's own choice for the job's stated
    fractions meets this at the defaults (0.1, 0.1, 40 bits: n = 10 gives k = 4, t = 2); a lower t does not.
    """

    protocols: tuple[str, ...] = SECURE_PROTOCOLS
    min_threshold: float = 0.5
    min_clients: int = 2
    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    max_clip: float | None = None
    allow_insecure_seeded_randomness: bool = False
    trusted_app_hashes: tuple[str, ...] = ()
    allow_any_app: bool = False
    paillier_key_fingerprint: str | None = None
    min_summands: int = 2
    require_authenticated: bool = False
    roster_sha256: str | None = None
    min_security_bits: float = 40.0
    assumed_corrupt: float = 0.1
    assumed_dropout: float = 0.1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.protocols) - set(_KNOWN_PROTOCOLS))
        if unknown or not self.protocols:
            raise ValueError(f"policy protocols {list(self.protocols)}: choose from {', '.join(_KNOWN_PROTOCOLS)}")
        if not 0 < self.min_threshold <= 1:
            raise ValueError(f"policy min_threshold must be a fraction in (0, 1], got {self.min_threshold}")
        if self.min_clients < 1:
            raise ValueError(f"policy min_clients must be >= 1, got {self.min_clients}")
        for name in ("min_noise_multiplier", "max_epsilon", "max_clip"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"policy {name} must be a positive finite number or absent, got {v}")
        for h in self.trusted_app_hashes:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"policy trusted_app_hashes holds SHA-256 hex digests (64 lowercase hex), got {h!r}")
        fp = self.paillier_key_fingerprint
        if fp is not None and (len(fp) != 32 or any(c not in "0123456789abcdef" for c in fp)):
            raise ValueError(f"policy paillier_key_fingerprint is 32 lowercase hex digits "
                             f"(`privagg flower policy --paillier-key PUBLIC.json`), got {fp!r}")
        if isinstance(self.min_summands, bool) or not isinstance(self.min_summands, int) or self.min_summands < 2:
            raise ValueError(f"policy min_summands must be an integer >= 2 (a sum of one client is its update), "
                             f"got {self.min_summands!r}")
        r = self.roster_sha256
        if r is not None and (not isinstance(r, str) or len(r) != 64 or any(c not in "0123456789abcdef" for c in r)):
            raise ValueError(f"policy roster_sha256 is a SHA-256 hex digest (64 lowercase hex), got {r!r}")
        self._check_graph_terms()

    def _check_graph_terms(self) -> None:
        """The SecAgg+ assumptions: fractions in [0, 1) with a sum below 1, a positive finite bit count."""
        bits, c, d = self.min_security_bits, self.assumed_corrupt, self.assumed_dropout
        if isinstance(bits, bool) or not isinstance(bits, int | float) or not (bits > 0 and math.isfinite(bits)):
            raise ValueError(f"policy min_security_bits must be a positive finite number, got {bits!r}")
        for name, v in (("assumed_corrupt", c), ("assumed_dropout", d)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
                raise ValueError(f"policy {name} must be a fraction in [0, 1), got {v!r}")
        if c + d >= 1:
            raise ValueError(f"policy assumed_corrupt + assumed_dropout must be below 1, got {c} + {d}")

    # -------------------------------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodePolicy:
        """Build from a JSON object; unknown keys are an error (a typo must not silently weaken nothing)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown node policy key(s) {unknown}; known: {', '.join(sorted(known))}")
        kw = dict(data)
        for key in ("protocols", "trusted_app_hashes"):
            if key in kw:
                if not isinstance(kw[key], list | tuple) or not all(isinstance(x, str) for x in kw[key]):
                    raise ValueError(f"node policy {key} must be a list of strings, got {kw[key]!r}")
                kw[key] = tuple(kw[key])
        return cls(**kw)

    @classmethod
    def load(cls, path: Path) -> NodePolicy:
        """Read a policy file (JSON object); a missing or malformed file is an error naming the fix."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read node policy {path}: {exc}; write one with `privagg flower policy`") from exc
        if not isinstance(data, dict):
            raise ValueError(f"node policy {path} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """The policy named by ``policy-file`` in the SuperNode's own ``--node-config``; the defaults if absent."""
        path = node_config.get(POLICY_FILE_KEY)
        if path is None or path == "":
            return cls()
        if not isinstance(path, str):
            raise ValueError(f"--node-config {POLICY_FILE_KEY} must be a file path string, got {path!r}")
        return cls.load(Path(path))

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    # -------------------------------------------------------------------------------------------- checks
    def refusals(self, terms: JobTerms) -> list[str]:
        """Every way ``terms`` is weaker than this policy (empty: accepted)."""
        why: list[str] = []
        if terms.protocol not in self.protocols:
            why.append(f"protocol {terms.protocol!r} is not one this node runs ({', '.join(self.protocols)})")
        if terms.protocol == "secagg+" and terms.graph is not None and terms.graph[0] < terms.cohort - 1:
            why += self._graph_refusals(terms.cohort, *terms.graph, active=terms.authenticated)
        elif terms.protocol != "plain" and (terms.threshold_fraction is None or
                                            terms.threshold_fraction < self.min_threshold):
            why.append(f"threshold {terms.threshold_fraction} is below this node's minimum {self.min_threshold:g}")
        if terms.cohort < self.min_clients:
            why.append(f"{terms.cohort} planned client(s) per round, this node needs at least {self.min_clients}")
        if self.min_noise_multiplier is not None:
            if terms.own_noise is None:
                extra = " (central noise is added by the server, which this node does not check)" \
                    if terms.central_noise is not None else ""
                why.append(f"the job adds no DP noise on this node{extra}; it needs dnoise or dp-sgd with a noise "
                           f"multiplier >= {self.min_noise_multiplier:g}")
            elif terms.own_noise < self.min_noise_multiplier:
                why.append(f"noise multiplier {terms.own_noise:g} is below this node's minimum "
                           f"{self.min_noise_multiplier:g}")
        if self.max_epsilon is not None and (terms.epsilon is None or terms.epsilon > self.max_epsilon):
            why.append(f"target epsilon {terms.epsilon} exceeds this node's maximum {self.max_epsilon:g} "
                       "(give --epsilon)")
        if self.max_clip is not None and (terms.clip is None or terms.clip > self.max_clip):
            why.append(f"clip norm {terms.clip} exceeds this node's maximum {self.max_clip:g}")
        if self.require_authenticated and not terms.authenticated:
            why.append(f"protocol {terms.protocol!r} is not authenticated SecAgg/SecAgg+ and this node requires it "
                       "(identity keys and the consistency round: --authenticated with a roster; in your own "
                       "Flower app SecureAggregation(authenticated=True, roster=...))")
        if terms.seeded and not self.allow_insecure_seeded_randomness:
            why.append("the job turns on insecure_seeded_randomness (noise derived from a seed the server knows); "
                       "only a node whose own policy sets allow_insecure_seeded_randomness runs it")
        return why

    def assumed_counts(self, n: int) -> tuple[int, int]:
        """(C, D): the corrupt (at least one) and dropped clients this node assumes among ``n`` planned."""
        eps = 1e-12  # 0.1 * 1000 is 100, as in secagg.masking.graph
        return max(1, math.floor((self.assumed_corrupt + eps) * n)), math.floor((self.assumed_dropout + eps) * n)

    def secagg_plus_bits(self, n: int, k: int, t: int, *, active: bool = False) -> float:
        """The security bits SecAgg+ with degree ``k`` and threshold ``t`` keeps for ``n`` clients under this
        policy's assumptions (:func:`secagg.masking.graph.achieved_bits`; ``inf``: no leak possible)."""
        from secagg.masking.graph import achieved_bits

        c, d = self.assumed_counts(n)
        if c + d >= n:  # nobody honest is left to protect: nothing is guaranteed
            return 0.0
        return achieved_bits(n, k, t, corrupt=c / n, dropout=d / n, active=active)[0]

    def _graph_refusals(self, n: int, k: int, t: int, *, active: bool) -> list[str]:
        """Why a sparse SecAgg+ graph with degree ``k`` and threshold ``t`` is too weak (empty: accepted)."""
        bits = self.secagg_plus_bits(n, k, t, active=active)
        if bits >= self.min_security_bits:
            return []
        c, d = self.assumed_counts(n)
        return [f"SecAgg+ with k={k} neighbours and threshold t={t} for {n} planned clients keeps {bits:.1f} bits "
                f"of security against {c} corrupt client(s) and {d} dropout(s) (this node's assumed fractions "
                f"{self.assumed_corrupt:g} and {self.assumed_dropout:g}), below its minimum "
                f"{self.min_security_bits:g}: "
                "leave t to SecAgg+'s parameter finder with --corrupt-fraction and --dropout-fraction at least "
                "this node's, or raise --threshold"]

    def check(self, terms: JobTerms) -> None:
        """Raise :class:`PolicyError` listing every refusal; return if the job meets this policy."""
        why = self.refusals(terms)
        if why:
            raise PolicyError("this node's policy refuses the job: " + "; ".join(why))


def protocol_word(ssum: Any) -> str:
    """The policy word of a secure-sum object, by its class (an unknown class counts as ``plain``)."""
    from fl.sums.secagg import SecAgg, SecAggPlus

    if isinstance(ssum, SecAggPlus):
        return "secagg+"
    if isinstance(ssum, SecAgg):
        return "secagg"
    try:
        from fl.sums.paillier import PaillierSum
    except ImportError:  # pragma: no cover - phe is a core dependency
        PaillierSum = ()  # type: ignore[assignment,misc]
    if isinstance(ssum, PaillierSum):
        return "paillier"
    return "plain"


def _threshold_fraction(ssum: Any, cohort: int) -> float | None:
    if protocol_word(ssum) == "paillier":  # the fewest clients a decrypted sum may have
        return int(ssum.min_clients) / cohort if cohort >= 1 else None
    threshold = getattr(ssum, "threshold", None)
    if cohort < 1:
        return None
    if threshold is None and hasattr(ssum, "_graph"):  # SecAgg+ from exact tails: the t it will use
        k, t = ssum._graph().parameters(cohort, None)
        return float(t) / (int(k) + 1)  # a fraction of each share group, as an explicit threshold is
    if threshold is None:
        return None
    if isinstance(threshold, float) and 0 < threshold <= 1:
        return threshold
    return int(threshold) / cohort


def graph_of(ssum: Any, cohort: int) -> tuple[int, int] | None:
    """SecAgg+'s (k, t) for ``cohort`` clients, as its own sum object computes them; None for other sums."""
    if protocol_word(ssum) != "secagg+" or cohort < 1:
        return None
    k, t = ssum._graph().parameters(cohort, ssum.threshold)
    return int(k), int(t)


def sum_terms(ssum: Any, cohort: int) -> JobTerms:
    """Terms of a ``sum`` job (public test vectors: no DP)."""
    return JobTerms(protocol=protocol_word(ssum), threshold_fraction=_threshold_fraction(ssum, cohort), cohort=cohort,
                    authenticated=_authenticated(ssum), graph=graph_of(ssum, cohort))


def _authenticated(ssum: Any) -> bool:
    """True only for SecAgg/SecAgg+ objects in authenticated mode (read from the object, not a string)."""
    return protocol_word(ssum) in SECURE_PROTOCOLS and getattr(ssum, "authenticated", False) is True


def train_terms(fed: Any, cid: int) -> JobTerms:
    """Terms of a ``train`` job for client ``cid``, read from the client side it built (``ClientSide``)."""
    from fl.layers.clip import Clip
    from fl.layers.noise import GaussianNoise
    from fl.training.dp_sgd import DpSgdTrainer

    plan = fed.plan
    cohort = int(fed.bound.sum_spec.cohort)
    own: float | None = None
    central: float | None = None
    clips = [layer.l2 for layer in plan.pipeline.layers if isinstance(layer, Clip)]
    for layer in plan.pipeline.layers:
        if isinstance(layer, GaussianNoise):
            if layer.placement == "clients":
                own = float(layer.multiplier)
            else:
                central = float(layer.multiplier)
    if isinstance(plan.trainer, DpSgdTrainer):
        own = plan.trainer.noise_for(cid)
        clips.append(plan.trainer.max_grad_norm)
    if fed.config.sample_rate is not None:  # Poisson sampling: the expected cohort
        cohort = max(1, round(fed.config.sample_rate * fed.population))
    return JobTerms(
        protocol=protocol_word(plan.pipeline.sum), threshold_fraction=_threshold_fraction(plan.pipeline.sum, cohort),
        cohort=cohort, own_noise=own, central_noise=central, clip=min(clips) if clips else None,
        epsilon=fed.config.privacy.epsilon, seeded=bool(fed.config.insecure_seeded_randomness),
        authenticated=_authenticated(plan.pipeline.sum), graph=graph_of(plan.pipeline.sum, cohort),
    )
