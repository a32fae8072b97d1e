"""The SecAgg+ neighbour graph, derived from public data so every client can recompute and check it.

Bell et al. (CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", section 3)
replace SecAgg's complete graph with a random k-regular graph, k = O(log n): each client shares secrets
with, and masks against, its k neighbours only. We use their construction: the Harary graph H(n, k)
(positions on a circle, each joined to the k/2 nearest positions on either side) under a uniformly
random permutation of the clients. The permutation is a Fisher-Yates shuffle driven by AES-CTR from a
seed = HKDF(session, label, round), so it is public, deterministic and checkable, and cannot be steered
by anyone who does not choose the session id. ``k >= n - 1`` is the complete graph (original SecAgg).

Choosing k (:func:`choose_k`). Assume each client independently is corrupt with probability at most
``gamma`` and drops with probability at most ``delta``, independently of the graph (both are fixed before
the session seed is known). Let ``m = k + 1`` (a client's share group: itself and its k neighbours) and
``t`` the threshold per group. With the Chernoff-Hoeffding bound ``P[Bin(k, p) >= a k] <=
exp(-k D(a || p))`` (valid for sampling without replacement too, Hoeffding 1963) and a union bound over
the n clients, k is the smallest even number with

* correctness   ``n exp(-k D((k - t + 1)/k || delta)) <= 2^-eta``  -- every group keeps >= t survivors;
* share privacy ``n exp(-k D(t/k || gamma)) <= 2^-sigma``          -- no group holds >= t corrupt clients;
* connectivity  ``n (gamma + delta)^(k/2) <= 2^-sigma``             -- removing corrupt and dropped clients
  cannot cut the graph (H(n, k) only disconnects when k/2 circle-consecutive clients are all removed),
  so the server learns nothing beyond the total of the honest survivors.

If no k < n - 1 qualifies, the complete graph is used. The three conditions are those of Bell et al.'s
analysis (correctness, no group with t corrupt members, connectivity of the honest survivors); the
explicit constants above are derived here with Chernoff and union bounds, not copied from the paper.
With sigma = 40, eta = 30, gamma = delta = 0.1 and a 0.5 threshold fraction, k = 60, 64, 68, 74 for
n = 10^2, 10^3, 10^4, 10^5 (of order log n). A 0.7 fraction needs k ~ 200 (only 30% of a group may then
drop), so cohorts of a few hundred get the complete graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from secagg._hazmat import kex, prg

__all__ = ["GRAPH_LABEL", "GraphSpec", "NeighbourGraph", "achieved_bits", "choose_k", "threshold_for"]

GRAPH_LABEL = b"privagg/secagg+/graph-seed/v1"


def threshold_for(threshold: float | int, group_size: int) -> int:
    """A threshold given as a fraction of the group (``0.7``) or an absolute count (``7``) -> count.

    A float in (0, 1] is a fraction, anything else a count (``fl.sums.threshold_count`` wraps this).
    """
    if isinstance(threshold, float) and 0 < threshold <= 1:
        return max(1, math.ceil(threshold * group_size))
    t = int(threshold)
    if t < 1:
        raise ValueError(f"threshold must be a fraction in (0, 1] or a count >= 1, got {threshold}")
    return t


def _kl(a: float, p: float) -> float:
    """Binary KL divergence D(a || p) in nats, for 0 < p < 1 and a in [0, 1]."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / p)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - p))
    return out


def _log_upper_tail(k: int, a_count: int, p: float) -> float:
    """ln of a Chernoff bound on P[Bin(k, p) >= a_count] (0 when the bound is trivial)."""
    if a_count > k:
        return -math.inf
    if p <= 0:
        return -math.inf if a_count > 0 else 0.0
    a = a_count / k
    if a <= p:
        return 0.0
    return -k * _kl(a, p)


def achieved_bits(n: int, k: int, *, threshold: float | int, dropout: float, corrupt: float) -> tuple[float, float]:
    """(security bits, correctness bits) that degree ``k`` achieves for ``n`` clients (inf = certain)."""
    if k >= n - 1:
        t = threshold_for(threshold, n)
        sec = math.inf if corrupt * n < t else 0.0
        tail = _log_upper_tail(n, n - t + 1, dropout)
        return sec, (math.inf if tail == -math.inf else -tail / math.log(2))
    m = k + 1
    t = threshold_for(threshold, m)
    ln_n = math.log(n)
    corr = _log_upper_tail(k, k - t + 1, dropout)
    shares = _log_upper_tail(k, t, corrupt)
    conn = (k // 2) * math.log(corrupt + dropout) if corrupt + dropout > 0 else -math.inf
    sec = -(ln_n + max(shares, conn)) / math.log(2)
    eta = -(ln_n + corr) / math.log(2)
    return sec, eta


def choose_k(
    n: int,
    *,
    threshold: float | int,
    sigma: float = 40.0,
    eta: float = 30.0,
    dropout: float = 0.1,
    corrupt: float = 0.1,
) -> int:
    """Smallest even degree meeting the module docstring's three conditions; ``n - 1`` (complete) if none."""
    if not (0 <= dropout < 1 and 0 <= corrupt < 1 and dropout + corrupt < 1):
        raise ValueError("dropout and corruption fractions must be in [0, 1) with a sum below 1")
    for k in range(2, n - 1, 2):
        sec, cor = achieved_bits(n, k, threshold=threshold, dropout=dropout, corrupt=corrupt)
        if sec >= sigma and cor >= eta:
            return k
    return max(1, n - 1)


def _permutation(n: int, seed: bytes) -> list[int]:
    """Uniform permutation of range(n): Fisher-Yates with rejection sampling on AES-CTR words."""
    words: list[int] = []
    pos = 0
    block = 2 * n + 16
    counter = 0

    def draw() -> int:
        nonlocal words, pos, counter
        if pos >= len(words):
            sub = kex.derive(seed, label=b"privagg/secagg+/permutation-block", context=counter.to_bytes(8, "big"))
            words = [int(w) for w in prg.expand(sub, block, np.uint64)]
            pos = 0
            counter += 1
        w = words[pos]
        pos += 1
        return w

    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            w = draw()
            if w < limit:
                break
        j = w % bound
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@dataclass(frozen=True)
class NeighbourGraph:
    """Who masks against whom. ``k >= n - 1`` (or ``None``) is the complete graph."""

    cohort: tuple[int, ...]
    k: int
    seed: bytes
    _adj: dict[int, frozenset[int]] = field(repr=False, compare=False)

    @classmethod
    def build(cls, cohort: Iterable[int], *, k: int | None, session: bytes, round: int) -> NeighbourGraph:
        """The graph of a round; ``k`` is rounded up to an even number (Harary graphs with even degree)."""
        listed = list(cohort)
        ids = tuple(sorted(set(listed)))
        if len(ids) != len(listed):
            raise ValueError("the cohort lists a client twice")
        if any(c < 0 for c in ids):
            raise ValueError("client ids must be non-negative")
        n = len(ids)
        seed = kex.derive(session, label=GRAPH_LABEL, context=round.to_bytes(8, "big", signed=True))
        kk = n - 1 if k is None else k + (k % 2)
        if kk < 2 and n > 2:
            raise ValueError(f"a neighbour graph needs k >= 2, got {k}")
        adj: dict[int, frozenset[int]]
        if kk >= n - 1:
            everyone = frozenset(ids)
            adj = {u: everyone - {u} for u in ids}
            kk = max(0, n - 1)
        else:
            perm = _permutation(n, seed)  # position -> index into ids
            at = [ids[perm[p]] for p in range(n)]
            adj = {}
            for p, u in enumerate(at):
                adj[u] = frozenset(at[(p + j) % n] for j in range(-(kk // 2), kk // 2 + 1) if j != 0)
        return cls(ids, kk, seed, adj)

    @property
    def n(self) -> int:
        return len(self.cohort)

    @property
    def complete(self) -> bool:
        return self.k >= self.n - 1

    def neighbours(self, u: int) -> frozenset[int]:
        return self._adj[u]

    def group(self, u: int) -> frozenset[int]:
        """``u`` and its neighbours: the holders of u's shares."""
        return self._adj[u] | {u}

    def group_sizes(self) -> Sequence[int]:
        return [len(self._adj[u]) + 1 for u in self.cohort]


@dataclass(frozen=True, slots=True)
class GraphSpec:
    """How the neighbour graph is chosen: complete (SecAgg), explicit ``neighbours`` k, or k from parameters.

    ``sigma``/``eta``: security and correctness in bits; ``dropout``/``corrupt``: the assumed fractions of
    dropped and corrupt clients (see :func:`choose_k`).
    """

    complete: bool = True
    neighbours: int | None = None
    sigma: float = 40.0
    eta: float = 30.0
    dropout: float = 0.1
    corrupt: float = 0.1

    def degree(self, n: int, threshold: float | int) -> int:
        """The degree k used for a cohort of ``n`` (``n - 1`` for the complete graph)."""
        if self.complete or n <= 2:
            return max(0, n - 1)
        if self.neighbours is not None:
            if self.neighbours < 2:
                raise ValueError(f"SecAgg+ needs at least 2 neighbours, got {self.neighbours}")
            return min(n - 1, self.neighbours + self.neighbours % 2)
        return choose_k(
            n, threshold=threshold, sigma=self.sigma, eta=self.eta, dropout=self.dropout, corrupt=self.corrupt
        )

    def build(self, cohort: Sequence[int], *, threshold: float | int, session: bytes, round: int) -> NeighbourGraph:
        return NeighbourGraph.build(cohort, k=self.degree(len(cohort), threshold), session=session, round=round)
