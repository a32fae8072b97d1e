"""The SecAgg+ neighbour graph and its parameters, derived from public data so every client can check them.

Bell et al. (CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", section 3)
replace SecAgg's complete graph with a random k-regular graph, k = O(log n): each client shares secrets
with, and masks against, its k neighbours only. We use their construction: the Harary graph H(n, k)
(positions on a circle, each joined to the k/2 nearest positions on either side) under a pseudorandom
permutation of the clients. ``k >= n - 1`` is the complete graph (original SecAgg).

**Own neighbourhood in O(k + log n).** The permutation is a keyed Feistel network over AES (10 rounds,
cycle walking onto ``[0, n)``) with key HKDF(session, label, round): public, deterministic, and not
steerable by anyone who does not choose the session id. A client finds its index in the sorted cohort
(binary search), its position ``P(index)`` and the indices ``P^-1(position +- j)`` of its k neighbours
-- k + 1 permutation evaluations, never the whole permutation. The server evaluates all n at once
(vectorised).

**Parameters from exact counts** (:func:`find_parameters`). As in the SecAgg+ parameter finder of the
paper's authors (Google's federated-compute, ``fcp/secagg/server/graph_parameter_finder.cc``), at most
``C = floor(gamma n)`` clients are corrupt and at most ``D = floor(delta n)`` drop, both sets fixed
before the session seed is known, so a client's k neighbours are a uniform k-subset of the other n - 1
clients and every count below is hypergeometric (exact tails, no Chernoff bound). For even k and a
threshold t (shares needed out of the group of the client and its k neighbours):

* share privacy: ``(n - C) P[Hyp(n-1, C, k) >= t] <= 2^-(sigma+1)`` -- no honest client has t corrupt
  neighbours (union over the honest clients); an active server (authenticated mode) can split the honest
  neighbours into two views, so then also ``2 t >= k + a + 2`` where ``a`` bounds the corrupt neighbours
  at the same level (the client's own share counts: it answers for itself);
* connectivity: ``n (n - k - 1) / 2 * [B]_k [n - B]_2 / [n]_(k+2) <= 2^-(sigma+1)`` with ``B = C + D``
  -- H(n, k) splits only when two disjoint runs of k/2 circle-consecutive clients are removed; each run
  is maximal (its predecessor survives), so a pair of runs fixes k removed and 2 surviving positions;
* correctness: ``n max(P[Hyp(n-1, n-D, k) < t], P[Hyp(n-1, n-1-D, k) < t - 1]) <= 2^-eta`` -- every
  group keeps t members who answer (a dropped client's k neighbours hold its shares; a surviving one
  also answers for itself).

k is the smallest even degree for which some t qualifies, t the smallest such t (the fewest shares to
interpolate, the most dropouts tolerated). Every bound here is at most the reference finder's, so our k
never exceeds theirs (checked against their published table in ``tests/secagg/test_graph.py``). If no
sparse k works, the complete graph with ``t = C + 1`` (active: ``floor((n + C) / 2) + 1``) is used.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from secagg._hazmat import kex, prg

__all__ = [
    "GRAPH_LABEL",
    "GraphSpec",
    "NeighbourGraph",
    "achieved_bits",
    "choose_k",
    "find_parameters",
    "threshold_for",
]

GRAPH_LABEL = b"privagg/secagg+/graph-permutation-key/v2"
FEISTEL_ROUNDS = 10
_LN2 = math.log(2)


def threshold_for(threshold: float | int, group_size: int) -> int:
    """A threshold given as a fraction of the group (``0.7``) or an absolute count (``7``) -> count.

    A float in (0, 1] is a fraction, anything else a count (``fl.sums.plain.threshold_count`` wraps this).
    """
    if isinstance(threshold, float) and 0 < threshold <= 1:
        return max(1, math.ceil(threshold * group_size))
    t = int(threshold)
    if t < 1:
        raise ValueError(f"threshold must be a fraction in (0, 1] or a count >= 1, got {threshold}")
    return t


# ---------------------------------------------------------------------------------------- exact tails
def _log_hyp_pmf(total: int, marked: int, sampled: int) -> tuple[int, NDArray[np.float64]]:
    """(lo, ln P[X = lo + i]) for X ~ Hypergeometric(total, marked, sampled) over its whole support."""
    lo, hi = max(0, sampled - (total - marked)), min(sampled, marked)
    lg = math.lgamma
    first = (
        lg(marked + 1) - lg(lo + 1) - lg(marked - lo + 1)
        + lg(total - marked + 1) - lg(sampled - lo + 1) - lg(total - marked - sampled + lo + 1)
        - lg(total + 1) + lg(sampled + 1) + lg(total - sampled + 1)
    )
    x = np.arange(lo, hi, dtype=np.float64)
    steps = np.log((marked - x) * (sampled - x)) - np.log((x + 1) * (total - marked - sampled + x + 1))
    return lo, np.concatenate(([first], first + np.cumsum(steps)))


def _log_cdf(total: int, marked: int, sampled: int) -> tuple[int, NDArray[np.float64]]:
    """(lo, ln P[X <= lo + i]) over the support of Hypergeometric(total, marked, sampled)."""
    lo, lp = _log_hyp_pmf(total, marked, sampled)
    return lo, np.logaddexp.accumulate(lp)


def _log_sf(total: int, marked: int, sampled: int) -> tuple[int, NDArray[np.float64]]:
    """(lo, ln P[X >= lo + i]) over the support."""
    lo, lp = _log_hyp_pmf(total, marked, sampled)
    return lo, np.logaddexp.accumulate(lp[::-1])[::-1]


def _ln_tail_ge(total: int, marked: int, sampled: int, t: int) -> float:
    """ln P[X >= t]."""
    lo, sf = _log_sf(total, marked, sampled)
    if t <= lo:
        return 0.0
    i = t - lo
    return float(sf[i]) if i < len(sf) else -math.inf


def _ln_tail_lt(total: int, marked: int, sampled: int, t: int) -> float:
    """ln P[X < t]."""
    lo, cdf = _log_cdf(total, marked, sampled)
    i = t - 1 - lo
    if i < 0:
        return -math.inf
    return float(cdf[min(i, len(cdf) - 1)])


def _counts(n: int, corrupt: float, dropout: float) -> tuple[int, int]:
    if not (0 <= corrupt < 1 and 0 <= dropout < 1 and corrupt + dropout < 1):
        raise ValueError(
            f"corrupt ({corrupt}) and dropout ({dropout}) fractions must be in [0, 1) with a sum below 1"
        )
    eps = 1e-12  # 0.1 * 1000 must count as 100, not 99.99999
    return math.floor((corrupt + eps) * n), math.floor((dropout + eps) * n)


def _ln_disconnect(n: int, k: int, bad: int) -> float:
    """ln of the union bound on H(n, k) splitting once ``bad`` uniformly placed clients are removed."""
    if k > bad or n < k + 2:
        return -math.inf
    lg = math.lgamma
    pairs = math.log(n) + math.log(n - k - 1) - _LN2
    # [bad]_k [n - bad]_2 / [n]_{k+2}: k given positions removed, the two run predecessors kept.
    ln_p = lg(bad + 1) - lg(bad - k + 1) + lg(n - bad + 1) - lg(n - bad - 1) - lg(n + 1) + lg(n - k - 1)
    return pairs + ln_p if n - bad >= 2 else -math.inf


def _ln_share_leak(n: int, k: int, t: int, c: int) -> float:
    """ln of the union bound on some honest client having >= t corrupt among its k neighbours."""
    if n - c <= 0:
        return 0.0
    return math.log(n - c) + _ln_tail_ge(n - 1, c, k, t)


def _ln_fail(n: int, k: int, t: int, d: int) -> float:
    """ln of the union bound on some share group keeping fewer than t answering members."""
    dropped = _ln_tail_lt(n - 1, n - d, k, t) if d >= 1 else -math.inf  # the client itself dropped
    alive = _ln_tail_lt(n - 1, n - 1 - d, k, t - 1)  # it answers for itself
    return math.log(n) + max(dropped, alive)


def _min_secure_t(n: int, k: int, c: int, sigma: float, active: bool) -> int:
    """Smallest t in [2, k + 1] whose share-leak bound is <= 2^-(sigma+1) (k + 2 when none is)."""
    goal = -(sigma + 1) * _LN2
    lo, sf = _log_sf(n - 1, c, k)
    ln_honest = math.log(max(1, n - c))
    ok = np.nonzero(ln_honest + sf <= goal)[0]
    t = lo + int(ok[0]) if len(ok) else min(k, c) + 1  # beyond the support the tail is 0
    if active:
        a = t - 1  # at most a corrupt neighbours, at the same level
        t = max(t, (k + a + 2 + 1) // 2)
    return max(2, t)


def _max_correct_t(n: int, k: int, d: int, eta: float) -> int:
    """Largest t whose correctness bound is <= 2^-eta (0 when none is)."""
    goal = -eta * _LN2 - math.log(n)
    ts = np.arange(1, k + 2)

    def ln_lt(total: int, marked: int, below: NDArray[np.int64]) -> NDArray[np.float64]:
        lo, cdf = _log_cdf(total, marked, k)
        i = below - 1 - lo
        return np.where(i < 0, -np.inf, cdf[np.clip(i, 0, len(cdf) - 1)])

    worst = ln_lt(n - 1, n - 1 - d, ts - 1)
    if d >= 1:
        worst = np.maximum(worst, ln_lt(n - 1, n - d, ts))
    ok = np.nonzero(worst > goal)[0]  # the bound grows with t: the first failure ends the range
    return int(ok[0]) if len(ok) else k + 1


def _min_connected_k(n: int, bad: int, goal: float) -> int:
    """Smallest even k whose disconnection bound is <= e^goal (the bound falls as k grows)."""
    lo, hi = 1, max(1, (n - 1) // 2)  # in units of 2
    if _ln_disconnect(n, 2 * hi, bad) > goal:
        return 2 * hi + 2
    while lo < hi:
        mid = (lo + hi) // 2
        if _ln_disconnect(n, 2 * mid, bad) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return 2 * lo


@lru_cache(maxsize=256)
def find_parameters(
    n: int, *, corrupt: float, dropout: float, sigma: float = 40.0, eta: float = 30.0, active: bool = False
) -> tuple[int, int]:
    """(k, t) for ``n`` clients: the smallest even degree k and threshold t meeting the module's bounds.

    ``corrupt``/``dropout``: fractions of the n clients that may be corrupt / may drop (fixed before the
    session seed); ``sigma``/``eta``: security / correctness in bits; ``active``: an active server
    (authenticated mode). ``k = n - 1`` is the complete graph. Raises ``ValueError`` when not even the
    complete graph meets the bounds.
    """
    if n < 1:
        raise ValueError(f"a cohort needs at least one client, got n={n}")
    c, d = _counts(n, corrupt, dropout)
    goal = -(sigma + 1) * _LN2
    for k in range(_min_connected_k(n, c + d, goal), n - 1, 2):
        t = _min_secure_t(n, k, c, sigma, active)
        if t <= k + 1 and t <= _max_correct_t(n, k, d, eta):
            return k, t
    t = (n + c) // 2 + 1 if active else c + 1
    t = max(t, 2) if n > 1 else 1
    if t > n - d:
        raise ValueError(
            f"no graph for n={n} tolerates {d} dropouts with {c} corrupt clients (t={t} > {n - d} survivors): "
            f"lower the corrupt or dropout fraction, or sample a larger cohort"
        )
    return max(0, n - 1), t


def achieved_bits(
    n: int, k: int, t: int, *, corrupt: float, dropout: float, active: bool = False
) -> tuple[float, float]:
    """(security bits, correctness bits) that degree ``k`` and threshold ``t`` achieve (inf = certain)."""
    c, d = _counts(n, corrupt, dropout)
    if k >= n - 1:
        need = (n + c) // 2 + 1 if active else c + 1
        sec = math.inf if t >= need else 0.0
        return sec, (math.inf if t <= n - d else 0.0)
    # Curious: t corrupt neighbours leak; active: more than 2t - k - 2 do (two views of the honest ones).
    bad = 2 * t - k - 1 if active else t
    shares = _ln_share_leak(n, k, bad, c) if bad >= 1 else 0.0
    leak = max(shares, _ln_disconnect(n, k, c + d))
    fail = _ln_fail(n, k, t, d)
    sec = math.inf if leak == -math.inf else max(0.0, -leak / _LN2 - 1)
    cor = math.inf if fail == -math.inf else max(0.0, -fail / _LN2)
    return sec, cor


def choose_k(
    n: int,
    *,
    threshold: float | int | None = None,
    sigma: float = 40.0,
    eta: float = 30.0,
    dropout: float = 0.1,
    corrupt: float = 0.1,
) -> int:
    """Compatibility wrapper: the degree of :func:`find_parameters` (``threshold`` is ignored)."""
    del threshold
    return find_parameters(n, corrupt=corrupt, dropout=dropout, sigma=sigma, eta=eta)[0]


# ---------------------------------------------------------------------------------------- the permutation
class _FeistelPermutation:
    """A keyed pseudorandom permutation of ``range(n)``: balanced Feistel over AES-ECB, cycle walking.

    Rounds: ``(L, R) -> (R, L xor F_r(R))`` with ``F_r(x)`` = the low half-width bits of AES_key(r, x).
    The domain is ``2^(2h) >= n`` (at most 4n), so a point walks at most a few steps on average.
    """

    __slots__ = ("_enc", "_half", "_mask", "n")

    def __init__(self, n: int, key: bytes) -> None:
        self.n = n
        bits = max(2, (max(1, n - 1)).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._enc = prg.BlockPrf(key)

    def _f(self, r: int, x: NDArray[np.uint64]) -> NDArray[np.uint64]:
        blocks = np.zeros((len(x), 2), dtype="<u8")
        blocks[:, 0] = r
        blocks[:, 1] = x
        out = np.frombuffer(self._enc.blocks(blocks.tobytes()), dtype="<u8").reshape(-1, 2)
        return out[:, 0] & self._mask

    def _once(self, x: NDArray[np.uint64], inverse: bool) -> NDArray[np.uint64]:
        h = np.uint64(self._half)
        left, right = x >> h, x & self._mask
        if not inverse:
            for r in range(FEISTEL_ROUNDS):
                left, right = right, left ^ self._f(r, right)
        else:
            for r in reversed(range(FEISTEL_ROUNDS)):
                left, right = right ^ self._f(r, left), left
        out: NDArray[np.uint64] = (left << h) | right
        return out

    def __call__(self, x: Iterable[int] | NDArray[np.integer], *, inverse: bool = False) -> NDArray[np.int64]:
        """P(x) (or P^-1(x)) for every x in ``x``, each in ``range(n)``."""
        y = np.asarray(x, dtype=np.uint64).copy()
        if y.size and int(y.max()) >= self.n:
            raise ValueError(f"permutation inputs must be in [0, {self.n})")
        todo = np.arange(len(y))
        while len(todo):  # cycle walking: re-apply until the value falls back into [0, n)
            y[todo] = self._once(y[todo], inverse)
            todo = todo[y[todo] >= self.n]
        return y.astype(np.int64)


@dataclass(frozen=True)
class NeighbourGraph:
    """Who masks against whom. ``k >= n - 1`` is the complete graph.

    Neighbourhoods are computed on demand (O(k + log n) each) and cached; :meth:`materialise` computes
    all of them at once for the server.
    """

    cohort: tuple[int, ...]
    k: int
    seed: bytes
    _perm: _FeistelPermutation | None = field(repr=False, compare=False)
    _adj: dict[int, frozenset[int]] = field(default_factory=dict, repr=False, compare=False)
    _pos: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _arrays: dict[str, NDArray[np.int64]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, cohort: Iterable[int], *, k: int | None, session: bytes, round: int) -> NeighbourGraph:
        """The graph of a round; ``k`` is rounded up to an even number (Harary graphs with even degree)."""
        ids = _sorted_cohort(cohort)
        n = len(ids)
        seed = kex.derive(session, label=GRAPH_LABEL, context=round.to_bytes(8, "big", signed=True))
        kk = n - 1 if k is None else k + (k % 2)
        if kk < 2 and n > 2:
            raise ValueError(f"a neighbour graph needs k >= 2, got {k}")
        if kk >= n - 1:
            return cls(ids, max(0, n - 1), seed, None)
        return cls(ids, kk, seed, _FeistelPermutation(n, seed))

    @property
    def n(self) -> int:
        return len(self.cohort)

    @property
    def complete(self) -> bool:
        return self.k >= self.n - 1

    def _index(self, u: int) -> int:
        i = bisect.bisect_left(self.cohort, u)
        if i == len(self.cohort) or self.cohort[i] != u:
            raise KeyError(f"client {u} is not in the cohort")
        return i

    def neighbours(self, u: int) -> frozenset[int]:
        """The k neighbours of ``u`` (O(k + log n) the first time)."""
        got = self._adj.get(u)
        if got is None:
            if self._perm is None:
                self._index(u)
                got = frozenset(self.cohort) - {u}
            else:
                pos = int(self._perm([self._index(u)])[0])
                h = self.k // 2
                around = [(pos + j) % self.n for j in range(-h, h + 1) if j != 0]
                ids = [self.cohort[i] for i in self._perm(around, inverse=True)]
                self._pos[u] = pos
                self._pos.update(zip(ids, around, strict=True))
                got = frozenset(ids)
            self._adj[u] = got
        return got

    def share_x(self, u: int, v: int) -> int:
        """The Shamir evaluation point at which group member ``v`` holds ``u``'s shares.

        Complete graph: ``v + 1``. Sparse graph: v's offset from u on the circle, shifted into
        ``[1, k + 1]`` (u itself at ``k/2 + 1``). Every share group then uses the same points, so the
        server computes Lagrange coefficients once per pattern of answering offsets, not per client.
        """
        if self._perm is None:
            return v + 1
        if v != u and v not in self.neighbours(u):
            raise KeyError(f"client {v} holds no share of client {u}")
        h = self.k // 2
        return (self._pos[v] - self._pos[u] + h) % self.n + 1

    def group(self, u: int) -> frozenset[int]:
        """``u`` and its neighbours: the holders of u's shares."""
        return self.neighbours(u) | {u}

    def holder_xs(self, holder: int, owners: Sequence[int]) -> list[int]:
        """:meth:`share_x` of ``holder`` in each of the ``owners``' groups (which must contain it), fast."""
        if self._perm is None:
            return [holder + 1] * len(owners)
        pos, h, n = self._pos, self.k // 2, self.n
        mine = pos[holder] + h
        return [(mine - pos[v]) % n + 1 for v in owners]

    def holder_points(self, holders: NDArray[np.int64], owners: NDArray[np.int64]) -> NDArray[np.int64]:
        """:meth:`share_x` of each ``holders[i]`` in ``owners[i]``'s group, vectorised (the server's unmask).

        Every pair must lie in one group (as the server's share requests guarantee).
        """
        if self._perm is None:
            return np.asarray(holders, dtype=np.int64) + 1
        return self.points_at(self.indices(holders), self.indices(owners))

    def points_at(self, holders: NDArray[np.int64], owners: NDArray[np.int64]) -> NDArray[np.int64]:
        """:meth:`holder_points` for cohort *indices* (:meth:`indices`) of holders and owners."""
        if self._perm is None:
            return np.asarray(self.cohort, dtype=np.int64)[holders] + 1
        pos = self._arrays.get("pos")
        if pos is None:
            self.materialise()
            pos = self._arrays["pos"] = np.fromiter(map(self._pos.__getitem__, self.cohort), np.int64, self.n)
        return (pos[holders] - pos[owners] + self.k // 2) % self.n + 1

    def indices(self, ids: NDArray[np.int64]) -> NDArray[np.int64]:
        """Each member's index in the sorted cohort, vectorised: one gather from a lookup table when the
        ids are compact (below 4n + 1024, the usual 0..n-1), else a binary search. ``ids`` must be members."""
        lut = self._arrays.get("lut")
        if lut is None:
            cohort = np.asarray(self.cohort, dtype=np.int64)
            if self.n and int(cohort[-1]) < 4 * self.n + 1024:
                lut = np.full(int(cohort[-1]) + 1, -1, dtype=np.int64)
                lut[cohort] = np.arange(self.n)
            else:
                lut = np.empty(0, dtype=np.int64)
            self._arrays["lut"], self._arrays["ids"] = lut, cohort
        if len(lut):
            return lut[ids]
        return np.searchsorted(self._arrays["ids"], ids)

    def materialise(self) -> None:
        """Compute every neighbourhood at once (vectorised; the server's O(n k))."""
        if self._perm is None or len(self._adj) == self.n:
            return
        pos = self._perm(np.arange(self.n))
        at = np.empty(self.n, dtype=np.int64)
        at[pos] = np.arange(self.n)
        h = self.k // 2
        offsets = np.array([j for j in range(-h, h + 1) if j != 0], dtype=np.int64)
        ids = np.asarray(self.cohort, dtype=np.int64)
        nb = ids[at[(pos[:, None] + offsets[None, :]) % self.n]]
        for i, u in enumerate(self.cohort):
            self._adj.setdefault(u, frozenset(nb[i].tolist()))
        self._pos.update(zip(self.cohort, pos.tolist(), strict=True))

    def group_sizes(self) -> Sequence[int]:
        self.materialise()
        return [len(self.neighbours(u)) + 1 for u in self.cohort]


def _sorted_cohort(cohort: Iterable[int]) -> tuple[int, ...]:
    """The cohort as a sorted tuple of distinct non-negative ids (O(n) when already sorted)."""
    listed = tuple(map(int, cohort))  # C-level: every client checks the whole cohort list
    arr = np.asarray(listed, dtype=np.int64)
    if len(arr) > 1 and not bool(np.all(arr[1:] > arr[:-1])):
        if len(set(listed)) != len(listed):
            raise ValueError("the cohort lists a client twice")
        listed = tuple(sorted(listed))
        arr = np.asarray(listed, dtype=np.int64)
    if len(arr) and int(arr[0]) < 0:
        raise ValueError("client ids must be non-negative")
    return listed


@dataclass(frozen=True, slots=True)
class GraphSpec:
    """How the neighbour graph is chosen: complete (SecAgg), explicit ``neighbours`` k, or (k, t) found.

    ``sigma``/``eta``: security and correctness in bits; ``dropout``/``corrupt``: the assumed fractions of
    dropped and corrupt clients; ``active``: an active server (see :func:`find_parameters`).
    """

    complete: bool = True
    neighbours: int | None = None
    sigma: float = 40.0
    eta: float = 30.0
    dropout: float = 0.1
    corrupt: float = 0.1
    active: bool = False

    def degree(self, n: int, threshold: float | int | None = None) -> int:
        """The degree k used for a cohort of ``n`` (``n - 1`` for the complete graph)."""
        return self.parameters(n, threshold)[0]

    def parameters(self, n: int, threshold: float | int | None) -> tuple[int, int]:
        """(k, t) for a cohort of ``n``; ``threshold`` (fraction of the group, or a count) overrides t."""
        if self.complete or n <= 2:
            k = max(0, n - 1)
        elif self.neighbours is not None:
            if self.neighbours < 2:
                raise ValueError(f"SecAgg+ needs at least 2 neighbours, got {self.neighbours}")
            k = min(n - 1, self.neighbours + self.neighbours % 2)
        else:
            k, t = find_parameters(
                n, corrupt=self.corrupt, dropout=self.dropout, sigma=self.sigma, eta=self.eta, active=self.active
            )
            return k, (t if threshold is None else threshold_for(threshold, k + 1))
        if threshold is not None:
            return k, threshold_for(threshold, k + 1)
        c, _ = _counts(n, self.corrupt, self.dropout)
        if k >= n - 1:
            return k, max(2, (n + c) // 2 + 1 if self.active else c + 1) if n > 1 else 1
        return k, _min_secure_t(n, k, c, self.sigma, self.active)

    def build(
        self, cohort: Sequence[int], *, threshold: float | int | None, session: bytes, round: int
    ) -> NeighbourGraph:
        return NeighbourGraph.build(cohort, k=self.degree(len(cohort), threshold), session=session, round=round)
