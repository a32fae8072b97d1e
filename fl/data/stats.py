"""Federated preprocessing: standardization statistics and category vocabularies without pooling rows.

Each site keeps its raw rows. To standardize, every site computes one vector from its own rows --
the sums of its (clipped, rescaled) numeric features, of their squares, and its counts of the candidate
categories -- and the sites add these vectors through a secure sum (the one the privacy plan uses, or
``PlainSum``). Only the total reaches the server; the means, standard deviations and the shared
vocabulary are computed from it alone and then applied by every site to its own rows and by the server
to its held-out evaluation data.

**Public range and sensitivity.** A numeric column ``j`` has a public range ``[lo_j, hi_j]`` (declared,
or fixed by the server's own evaluation data). A row contributes ``u = (x - c) / w`` with
``c = (lo + hi) / 2`` and ``w = hi - lo``, clipped to ``[-1/2, 1/2]`` whenever DP is on or the sum works on
a ring, and ``u^2``; a categorical column contributes a one-hot indicator over its candidates. Replacing
one row moves a site's vector by at most ``sqrt(d_num + 2 * d_cat)`` in L2 (``(u - u')^2 (1 + (u + u')^2)
<= 1`` on that box; a changed category moves two indicators). For client-level DP every site sends its
per-row *average* instead, which lies in the convex hull of the same box, so replacing a whole site moves
the sum by at most the same bound.

**DP.** With DP on, each of the ``K`` sites adds ``N(0, sigma^2 / K)`` to its vector before the secure
sum (``sigma = z * sensitivity``): the total carries ``N(0, sigma^2)``, a Gaussian mechanism with noise
multiplier ``z`` for every observer of the total (with a secure sum, the server too). Row counts ``n_k``
and the set of class labels are public metadata, as in the training loop. With ``labels=`` (for
``--class-weight balanced``) the vector also holds the site's count of each class: one more indicator
pair per row, so the sensitivity grows to ``sqrt(d_num + 2 * d_cat + 2)`` under the same noise multiplier
(the same epsilon, one ledger entry), and the class counts are released with the same noise.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from dp_accounting import dp_event
from numpy.typing import NDArray
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from dp.accounting import calibrate_noise, event_from_json, event_to_json, gaussian_epsilon
from dp.rng import SecureRandom
from fl.errors import DataError
from fl.spec import Guarantee, RandomSource, SecureSum, ValueSpec

__all__ = [
    "DataError",
    "DataWarning",
    "FederatedStats",
    "Schema",
    "StatsPlan",
    "StatsPrivacy",
    "encode_contribution",
    "federated_statistics",
    "plan_statistics",
    "public_ranges",
    "public_statistics",
    "site_vector",
    "stats_info",
    "stats_pipeline",
]

log = logging.getLogger(__name__)

Unit = Literal["example", "client"]

PRIOR_VARIANCE = 1.0 / 64
"""Under DP, noisy estimates are shrunk towards a prior that does not read any site (post-processing, no
privacy cost): the moments of the server's own reference rows when it has them, else mean at the centre
of the public range and variance ``(width / 8)^2``; each is weighted by its prior precision against the
known noise (``tau^2 / (tau^2 + s^2)``, ``s = sigma / rows``). Large data sets keep their estimates; small
ones fall back towards the prior instead of dividing by a noisy variance."""
PRIOR_MEAN_SPREAD = 0.25
PRIOR_VARIANCE_SPREAD = 1.0 / 64


class DataWarning(UserWarning):
    """Data that trains but may train badly (one class at a site, a constant column, rare classes)."""


@dataclass(frozen=True, slots=True)
class Schema:
    """The columns every site shares: the label, numeric features and categorical features (in order)."""

    target: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatsPrivacy:
    """DP for the statistics: Gaussian noise multiplier ``z`` on the summed vector, per ``unit``."""

    noise_multiplier: float
    delta: float
    unit: Unit = "example"

    @classmethod
    def for_epsilon(cls, epsilon: float, *, delta: float, unit: Unit = "example") -> StatsPrivacy:
        """The smallest noise multiplier whose single Gaussian release is (epsilon, delta)-DP."""
        z = calibrate_noise(epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1)
        return cls(noise_multiplier=z, delta=delta, unit=unit)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.delta < 1):
            raise ValueError(f"StatsPrivacy needs noise_multiplier > 0 and delta in (0, 1), got "
                             f"{self.noise_multiplier}, {self.delta}")

    @property
    def epsilon(self) -> float:
        return _gaussian_epsilon(self.noise_multiplier, self.delta)

    @property
    def event(self) -> dp_event.DpEvent:
        return dp_event.GaussianDpEvent(self.noise_multiplier)


@dataclass(frozen=True)
class FederatedStats:
    """What the sum revealed, turned into a transform: numeric means/stds and the shared vocabulary."""

    schema: Schema
    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    vocabulary: Mapping[str, tuple[str, ...]]
    rows: int
    guarantee: Guarantee
    event: dp_event.DpEvent | None = None
    constant: tuple[str, ...] = ()
    # the summed count of each class label (same sum, same noise and ledger entry as the moments), when
    # asked for (``labels=``: "balanced" class weights); ``label_classes`` names them in order
    label_classes: tuple[str, ...] = ()
    label_counts: NDArray[np.float64] | None = None
    _scaler: StandardScaler = field(init=False, repr=False, compare=False)
    _encoder: OneHotEncoder | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scaler = StandardScaler()
        scaler.mean_ = np.asarray(self.mean, dtype=np.float64)
        scaler.scale_ = np.asarray(self.std, dtype=np.float64)
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(self.schema.numeric)
        scaler.n_samples_seen_ = self.rows
        object.__setattr__(self, "_scaler", scaler)
        encoder = None
        if self.schema.categorical:
            cats = [list(self.vocabulary[c]) for c in self.schema.categorical]
            encoder = OneHotEncoder(categories=cats, handle_unknown="ignore", sparse_output=False, dtype=np.float64)
            # fitted on the vocabulary itself (no data): unknown or dropped categories encode as all zeros
            width = max(1, max(len(c) for c in cats))
            dummy = pd.DataFrame({c: [v[i % len(v)] if v else "" for i in range(width)]
                                  for c, v in zip(self.schema.categorical, cats, strict=True)})
            encoder.fit(dummy.astype(object))
        object.__setattr__(self, "_encoder", encoder)

    def to_json(self) -> dict[str, Any]:
        """The release as plain JSON (no pickle): what a run ships to its nodes so all use one release."""
        return {
            "schema": {"target": self.schema.target, "numeric": list(self.schema.numeric),
                       "categorical": list(self.schema.categorical)},
            "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
            "vocabulary": {c: list(v) for c, v in self.vocabulary.items()}, "rows": int(self.rows),
            "guarantee": self.guarantee.as_dict(),
            "event": event_to_json(self.event) if self.event is not None else None,
            "constant": list(self.constant),
            "label_classes": list(self.label_classes),
            "label_counts": None if self.label_counts is None else [float(v) for v in self.label_counts],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederatedStats:
        """Read :meth:`to_json`'s output back; a malformed release is a :class:`DataError` naming the field."""
        try:
            sch = data["schema"]
            schema = Schema(target=str(sch["target"]), numeric=tuple(str(c) for c in sch["numeric"]),
                            categorical=tuple(str(c) for c in sch["categorical"]))
            mean = np.asarray(data["mean"], dtype=np.float64)
            std = np.asarray(data["std"], dtype=np.float64)
            if mean.shape != (len(schema.numeric),) or std.shape != mean.shape or not np.all(np.isfinite(mean)) \
                    or not np.all(std > 0):
                raise ValueError("mean/std must be finite, one per numeric column, std > 0")
            vocab = {str(c): tuple(str(v) for v in data["vocabulary"][c]) for c in schema.categorical}
            g = data["guarantee"]
            guarantee = Guarantee(layer=str(g["layer"]), property=str(g["property"]), against=str(g["against"]),
                                  assumptions=tuple(str(a) for a in g.get("assumptions", ())),
                                  params=dict(g.get("params", {})))
            event = event_from_json(data["event"]) if data.get("event") is not None else None
            label_classes, label_counts = _labels_from_json(data)
            return cls(schema=schema, mean=mean, std=std, vocabulary=vocab, rows=int(data["rows"]),
                       guarantee=guarantee, event=event, constant=tuple(str(c) for c in data.get("constant", ())),
                       label_classes=label_classes, label_counts=label_counts)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed preprocessing release ({exc!r}); rerun the job so it carries a fresh one") \
                from exc

    @property
    def feature_names(self) -> tuple[str, ...]:
        cats = tuple(f"{c}={v}" for c in self.schema.categorical for v in self.vocabulary[c])
        return self.schema.numeric + cats

    def transform(self, frame: pd.DataFrame) -> NDArray[np.float32]:
        """Standardize numeric columns and one-hot the categorical ones of one party's own rows."""
        parts = []
        if self.schema.numeric:
            x = frame[list(self.schema.numeric)].to_numpy(dtype=np.float64)
            parts.append((x - self._scaler.mean_) / self._scaler.scale_)
        if self._encoder is not None:
            parts.append(self._encoder.transform(_as_text(frame[list(self.schema.categorical)])))
        return np.concatenate(parts, axis=1).astype(np.float32)


def _labels_from_json(data: Mapping[str, Any]) -> tuple[tuple[str, ...], NDArray[np.float64] | None]:
    """The release's class names and class counts (none in releases made without ``labels=``)."""
    classes = tuple(str(c) for c in data.get("label_classes", ()) or ())
    if data.get("label_counts") is None:
        return classes, None
    counts = np.asarray(data["label_counts"], dtype=np.float64)
    if counts.shape != (len(classes),) or not np.all(np.isfinite(counts)):
        raise ValueError("label_counts must be finite, one per label class")
    return classes, counts


def _gaussian_epsilon(z: float, delta: float) -> float:
    """Exact epsilon of one Gaussian release with noise multiplier ``z`` (inf when z is negligible)."""
    try:
        return gaussian_epsilon(mu=1.0 / z, delta=delta)
    except OverflowError:
        return math.inf


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Category values as strings (so ``1`` and ``"1"`` from different CSVs are one category)."""
    return frame.astype(str).astype(object)


def public_ranges(
    schema: Schema, *, declared: Mapping[str, tuple[float, float]], reference: pd.DataFrame | None,
    margin: float = 0.1,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Centre and width of each numeric column's public range.

    A declared ``(lo, hi)`` wins; otherwise the range comes from the server's own ``reference`` rows
    (its evaluation data), widened by ``margin`` of the width on each side. Nothing here reads a site.
    """
    lo, hi = np.zeros(len(schema.numeric)), np.ones(len(schema.numeric))
    for j, col in enumerate(schema.numeric):
        if col in declared:
            a, b = (float(v) for v in declared[col])
            if not (math.isfinite(a) and math.isfinite(b) and a < b):
                raise DataError(f"bounds for {col!r} must be finite with LO < HI, got {a}:{b}; "
                                 f"pass --bounds {col}=LO:HI")
        elif reference is not None and reference[col].notna().any():
            a, b = float(reference[col].min()), float(reference[col].max())
            pad = margin * (b - a) if b > a else max(1.0, abs(a))
            a, b = a - pad, b + pad
        else:
            raise DataError(f"column {col!r} has no public range: declare it with --bounds {col}=LO:HI")
        lo[j], hi[j] = a, b
    return (lo + hi) / 2.0, hi - lo


def site_vector(
    frame: pd.DataFrame, schema: Schema, *, centre: NDArray[np.float64], width: NDArray[np.float64],
    candidates: Mapping[str, Sequence[str]], clip: bool, unit: Unit, labels: Sequence[str] = (),
) -> NDArray[np.float64]:
    """One site's contribution, computed from its own rows only: ``[sum u, sum u^2, category counts]``,
    then the count of each class in ``labels`` (when given).

    For ``unit="client"`` the per-row average (each site then weighs the same; see the module docstring).
    """
    x = frame[list(schema.numeric)].to_numpy(dtype=np.float64)
    u = (x - centre) / width
    if clip:
        u = np.clip(u, -0.5, 0.5)
    pieces = [u.sum(axis=0), (u * u).sum(axis=0)]
    for col in schema.categorical:
        values = _as_text(frame[[col]])[col]
        pieces.append(np.array([(values == v).sum() for v in candidates[col]], dtype=np.float64))
    if labels:
        target = _as_text(frame[[schema.target]])[schema.target]
        pieces.append(np.array([(target == c).sum() for c in labels], dtype=np.float64))
    vec = np.concatenate(pieces) if pieces else np.zeros(0)
    return vec / max(1, len(frame)) if unit == "client" else vec


def sensitivity(schema: Schema, *, labels: bool = False) -> float:
    """L2 change of a site's vector when one row (or, client level, one site) is replaced.

    ``labels``: the vector also counts the class labels (a changed label moves two counts by 1: +2)."""
    return math.sqrt(len(schema.numeric) + 2 * len(schema.categorical) + 2 * int(labels))


def _is_plain(ssum: SecureSum) -> bool:
    """A sum that takes real vectors sends them in the clear (``PlainSum``); masking and Paillier need a ring."""
    from fl.spec import CompositionError

    try:
        ssum.bind(ValueSpec(size=1, cohort=2, domain="real"))
    except CompositionError:
        return False
    return True


def stats_pipeline(ssum: SecureSum, *, size: int, cohort: int, bound: float) -> Any:
    """The bound pipeline of a statistics sum: ``Quantize`` (public ``bound`` per coordinate) before a ring sum.

    Every site and the server build it from public facts alone, in memory and over Flower alike."""
    from fl.layers.clip import Quantize
    from fl.pipeline import Pipeline
    from secagg.ring import MAX_RING_BITS, value_bits_for

    layers = [] if _is_plain(ssum) else [
        Quantize(bits=min(48, value_bits_for(MAX_RING_BITS, max(2, cohort))), bound=bound)
    ]
    return Pipeline(layers, sum=ssum).bind(ValueSpec(size=max(1, size), cohort=cohort))


def stats_info(cids: Sequence[int]) -> Any:
    """The :class:`~fl.spec.RoundInfo` of the statistics sum (round 0, every site)."""
    from fl.spec import RoundInfo

    return RoundInfo(round=0, planned=tuple(cids), included=tuple(cids), population=len(cids), sample_rate=1.0)


def secure_total(
    vectors: Mapping[int, NDArray[np.float64]], ssum: SecureSum, *, bound: float, noise_share: float,
    rng_for: Callable[[int], RandomSource], session: bytes,
) -> NDArray[np.float64]:
    """Sum the sites' vectors through ``ssum``; each site adds its noise share and quantizes first.

    A ring sum (SecAgg, SecAgg+, Paillier) gets ``Quantize`` with the public ``bound`` per coordinate, so
    the decoded total differs from the exact one by at most the quantizer's stated error.
    """
    from fl.runners.local import run_secure_sum

    cids = sorted(vectors)
    bound_pipe = stats_pipeline(ssum, size=len(next(iter(vectors.values()))), cohort=len(cids), bound=bound)
    encoded = {cid: encode_contribution(bound_pipe, vectors[cid], noise_share, rng_for(cid)) for cid in cids}
    outcome = run_secure_sum(ssum, encoded, spec=bound_pipe.sum_spec, session=session, round=0)
    if tuple(outcome.included) != tuple(cids):
        raise RuntimeError(f"the statistics sum left out sites {sorted(set(cids) - set(outcome.included))}")
    return np.asarray(bound_pipe.decode(outcome.total, stats_info(cids), rng_for(-1)), dtype=np.float64)


def encode_contribution(bound_pipe: Any, vector: NDArray[np.float64], noise_share: float,
                        rng: RandomSource) -> Any:
    """One site's noisy, encoded statistics vector (its noise share drawn from ``rng``, then quantized)."""
    noisy = vector + (rng.normal(len(vector), noise_share) if noise_share > 0 else 0.0)
    return bound_pipe.encode(noisy, rng)


def _candidates(
    sites: Sequence[pd.DataFrame], schema: Schema, declared: Mapping[str, Sequence[str]], dp: bool
) -> dict[str, tuple[str, ...]]:
    """Candidate categories per column: declared, or (no DP) the distinct values the sites hold."""
    out: dict[str, tuple[str, ...]] = {}
    for col in schema.categorical:
        if col in declared:
            out[col] = tuple(dict.fromkeys(str(v) for v in declared[col]))
        elif dp:
            raise DataError(
                f"with DP on, the categories of {col!r} must be declared (the values present at the sites are "
                f"not differentially private): pass --categories {col}=A,B,C"
            )
        else:
            seen: set[str] = set()
            for frame in sites:
                seen.update(_as_text(frame[[col]])[col].unique().tolist())
            out[col] = tuple(sorted(seen))
    return out


def default_session(seed: int | None) -> bytes:
    """A fresh session id for the statistics sum (seeded only through the named test seam)."""
    if seed is None:
        return os.urandom(16)
    return hashlib.sha256(f"stats-session:{seed}".encode()).digest()[:16]


def federated_statistics(
    sites: Sequence[pd.DataFrame],
    schema: Schema,
    *,
    secure_sum: SecureSum,
    privacy: StatsPrivacy | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    reference: pd.DataFrame | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    min_category_count: float = 1.0,
    rng_for: Callable[[int], RandomSource] | None = None,
    session: bytes | None = None,
    labels: Sequence[str] | None = None,
) -> FederatedStats:
    """Means, stds and vocabularies of the sites' rows, from one secure sum of per-site vectors.

    ``labels``: the run's (public) class names; the same sum then also counts each class over all sites
    (``label_counts``, for "balanced" class weights), under the same noise multiplier and so the same
    ledger entry: the sensitivity grows from ``sqrt(d)`` to ``sqrt(d + 2)`` and the noise with it.

    ``sites``: each site's own rows (already cleaned). ``reference``: the server's own rows, only used to
    fix public ranges where ``bounds`` declares none. ``categories``: declared candidate vocabularies
    (required under DP). Categories whose (noisy) total count is below ``min_category_count`` are dropped
    and encode as all zeros ("other"). Without DP and with ``PlainSum`` nothing is clipped, so the result
    equals the pooled statistics; otherwise rows are clipped to the public range for the statistics.
    """
    if not sites:
        raise DataError("federated statistics need at least one site")
    cand = _candidates(sites, schema, categories or {}, privacy is not None)
    plan = plan_statistics(schema, rows=[len(f) for f in sites], secure_sum=secure_sum, privacy=privacy,
                           bounds=bounds, reference=reference, candidates=cand, labels=labels or ())
    vectors = {k: plan.vector(f) for k, f in enumerate(sites)}
    rng_for = rng_for or (lambda _k: SecureRandom())
    total = secure_total(vectors, secure_sum, bound=plan.bound, noise_share=plan.share,
                         rng_for=rng_for, session=session or default_session(None))
    return plan.release(total, secure_sum=secure_sum, privacy=privacy, reference=reference,
                        min_category_count=min_category_count, declared=bool(categories))


@dataclass(frozen=True)
class StatsPlan:
    """The public plan of one statistics sum: what every site computes and how the total is read.

    Built from public facts only (the schema, each site's row count ``rows``, the public ranges, the
    candidate categories and the run's DP parameters), so the sites and the server agree on it without
    any site's data: :func:`federated_statistics` in memory, the Flower statistics round across nodes.
    """

    schema: Schema
    rows: tuple[int, ...]
    centre: NDArray[np.float64]
    width: NDArray[np.float64]
    candidates: Mapping[str, tuple[str, ...]]
    clip: bool
    unit: Unit
    sigma: float
    classes: tuple[str, ...] = ()  # the run's public class names: the sum also counts each (class weights)

    @property
    def share(self) -> float:
        """The noise std each site adds (the total carries ``sigma``)."""
        return self.sigma / math.sqrt(len(self.rows))

    @property
    def bound(self) -> float:
        """Public per-coordinate bound of a noisy site vector (the quantizer's range)."""
        base = 1.0 if self.unit == "client" else float(max(max(self.rows), 1))
        return base + 10.0 * self.share + 1.0

    @property
    def size(self) -> int:
        return (2 * len(self.schema.numeric) + sum(len(self.candidates[c]) for c in self.schema.categorical)
                + len(self.classes))

    def vector(self, frame: pd.DataFrame) -> NDArray[np.float64]:
        """One site's contribution from its own rows (:func:`site_vector`)."""
        return site_vector(frame, self.schema, centre=self.centre, width=self.width, candidates=self.candidates,
                           clip=self.clip, unit=self.unit, labels=self.classes)

    def release(self, total: NDArray[np.float64], *, secure_sum: SecureSum, privacy: StatsPrivacy | None,
                reference: pd.DataFrame | None, min_category_count: float = 1.0,
                declared: bool = False) -> FederatedStats:
        """Means, stds and vocabulary from the decoded (noisy) total: the one release of the statistics."""
        schema, k = self.schema, len(self.rows)
        rows = sum(self.rows)
        scale = float(rows) if self.unit == "example" else float(k)
        prior = _prior(reference, schema, self.centre, self.width)
        mean, std, low = _moments(total, len(schema.numeric), scale, self.centre, self.width,
                                  noise=self.sigma / scale, prior=prior)
        counts = total[2 * len(schema.numeric):] * (rows / k if self.unit == "client" else 1.0)
        classes = self.classes
        vocab = _vocabulary(schema, dict(self.candidates), counts[:len(counts) - len(classes)], min_category_count)
        return FederatedStats(
            schema=schema, mean=mean, std=std, vocabulary=vocab, rows=rows,
            guarantee=_guarantee(schema, secure_sum, privacy, k, clip=self.clip, declared=declared,
                                 labels=bool(classes)),
            event=privacy.event if privacy is not None else None,
            constant=tuple(c for c, flat in zip(schema.numeric, low, strict=True) if flat) if privacy is None else (),
            label_classes=classes, label_counts=counts[len(counts) - len(classes):].copy() if classes else None,
        )


def plan_statistics(
    schema: Schema, *, rows: Sequence[int], secure_sum: SecureSum, privacy: StatsPrivacy | None,
    bounds: Mapping[str, tuple[float, float]] | None, reference: pd.DataFrame | None,
    candidates: Mapping[str, tuple[str, ...]],
    ranges: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
    labels: Sequence[str] = (),
) -> StatsPlan:
    """The :class:`StatsPlan` of a statistics sum over sites with ``rows`` rows each.

    ``ranges``: the public (centre, width) per numeric column, fixed earlier (a site given them by the
    server); else :func:`public_ranges` fixes them here from ``bounds`` / ``reference``. ``labels``: the
    run's public class names, counted by the same sum (see :func:`federated_statistics`).
    """
    dp = privacy is not None
    centre, width = ranges if ranges is not None else public_ranges(schema, declared=bounds or {},
                                                                    reference=reference)
    classes = tuple(str(c) for c in labels)
    sigma = privacy.noise_multiplier * sensitivity(schema, labels=bool(classes)) if privacy is not None else 0.0
    return StatsPlan(schema=schema, rows=tuple(int(n) for n in rows), centre=centre, width=width,
                     candidates=dict(candidates), clip=dp or not _is_plain(secure_sum),
                     unit=privacy.unit if privacy is not None else "example", sigma=sigma, classes=classes)


def public_statistics(
    schema: Schema,
    *,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    reference: pd.DataFrame | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    rows: int = 0,
) -> FederatedStats:
    """Standardization that reads no site: each numeric column scaled by its public range, declared vocabularies.

    The range of a column (declared ``bounds``, else the server's own ``reference`` rows, see
    :func:`public_ranges`) is mapped to ``[-sqrt(3), sqrt(3)]`` (unit variance for a uniform column). Costs no
    privacy budget, so all of ``--epsilon`` goes to training: the right choice when the ranges are a public
    fact of the data format (pixel intensities, sensor ranges, percentages).
    """
    centre, width = public_ranges(schema, declared=bounds or {}, reference=reference)
    vocab: dict[str, tuple[str, ...]] = {}
    for col in schema.categorical:
        if not categories or col not in categories:
            raise DataError(f"categorical column {col!r} needs a declared vocabulary with public standardization: "
                            f"pass --categories {col}=A,B,C (or --standardize federated)")
        vocab[col] = tuple(str(v) for v in categories[col])
    guarantee = Guarantee(
        layer="public-standardization",
        property="no site data read: numeric columns scaled by their public ranges, categories from the declared "
                 "vocabularies; the preprocessing spends no privacy budget",
        against="everyone (nothing about the sites is released by preprocessing)",
        assumptions=("the ranges come from declared bounds or the server's own data, never from the sites'",),
        params={"ranges": "declared" if bounds else "server reference data", "sites_read": 0},
    )
    return FederatedStats(schema=schema, mean=centre, std=width / (2.0 * math.sqrt(3.0)), vocabulary=vocab,
                          rows=rows, guarantee=guarantee)


def _moments(
    total: NDArray[np.float64], d: int, scale: float, centre: NDArray[np.float64], width: NDArray[np.float64],
    *, noise: float = 0.0, prior: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Means, stds (original units) and which columns are flat, from the summed ``[sum u, sum u^2]``.

    ``noise``: std of the DP noise on ``total / scale``; then estimates are shrunk towards the prior
    (see :data:`PRIOR_VARIANCE`) and variances kept in ``[prior / 4, 1/4]`` (1/4: the largest possible).
    """
    mean_u = total[:d] / scale
    var_u = total[d:2 * d] / scale - mean_u**2
    if noise > 0:
        m0, v0 = prior if prior is not None else (np.zeros(d), np.full(d, PRIOR_VARIANCE))
        mean_u = m0 + (mean_u - m0) * PRIOR_MEAN_SPREAD**2 / (PRIOR_MEAN_SPREAD**2 + noise**2)
        keep = PRIOR_VARIANCE_SPREAD**2 / (PRIOR_VARIANCE_SPREAD**2 + noise**2)
        var_u = np.clip(v0 + keep * (var_u - v0), PRIOR_VARIANCE / 16, 0.25)
    # in units of the public range; 1e-12 (a std of a millionth of the range) is far above the rounding
    # of sum(u^2)/n - mean^2, which left truly constant columns with a tiny std (scaled values ~1e8)
    low = var_u < 1e-12
    if np.any(low):
        log.info("%d column(s) have (noisy) variance ~0; their scale is set to 1", int(low.sum()))
    std = np.where(low, 1.0, width * np.sqrt(np.where(low, 1.0, var_u)))
    return centre + width * mean_u, std, low


def _prior(
    reference: pd.DataFrame | None, schema: Schema, centre: NDArray[np.float64], width: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Mean and variance (range-width units, clipped) of the server's own rows: a prior that reads no site."""
    if reference is None or not schema.numeric or len(reference) < 2:
        return None
    u = np.clip((reference[list(schema.numeric)].to_numpy(dtype=np.float64) - centre) / width, -0.5, 0.5)
    if not np.all(np.isfinite(u)):
        return None
    return u.mean(axis=0), np.maximum(u.var(axis=0), PRIOR_VARIANCE / 16)


def _vocabulary(
    schema: Schema, cand: Mapping[str, tuple[str, ...]], counts: NDArray[np.float64], minimum: float
) -> dict[str, tuple[str, ...]]:
    vocab: dict[str, tuple[str, ...]] = {}
    at = 0
    for col in schema.categorical:
        c = cand[col]
        kept = tuple(v for v, n in zip(c, counts[at:at + len(c)], strict=True) if n >= minimum)
        if not kept and c:  # every (noisy) count fell below the floor: keep the candidates rather than none
            log.warning("column %r: every category's count is below %g; keeping all %d candidates", col, minimum,
                        len(c))
            kept = tuple(c)
        elif len(kept) < len(c):
            log.info("column %r: %d rare categories fall into 'other'", col, len(c) - len(kept))
        vocab[col] = kept
        at += len(c)
    return vocab


def _guarantee(
    schema: Schema, ssum: SecureSum, privacy: StatsPrivacy | None, sites: int, *, clip: bool, declared: bool,
    labels: bool = False,
) -> Guarantee:
    """What the server (and anyone it shows the statistics to) learns about the sites' rows."""
    plain = _is_plain(ssum)
    items = ["the sum over all sites of the rescaled numeric values and of their squares"
             + (" (clipped to the public range)" if clip else "")]
    if schema.categorical:
        items.append("the summed counts of the candidate categories")
        if not declared:
            items.append("which category values occur at some site (the candidates)")
    if labels:
        items.append("the summed count of each class label")
    learns = ("the server learns " + ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1]
              + ("; with plain-sum it also sees each site's own vector" if plain
                 else f"; through {ssum.name}, no single site's vector"))
    assumptions = ["row counts n_k per site and the set of class labels are public metadata"
                   + ("; the per-class counts are part of the release above" if labels else ""),
                   "the public ranges (and, under DP, the prior the noisy estimates are shrunk to) come from declared "
                   "bounds or the server's own data, never from the sites'"]
    params: dict[str, Any] = {"sites": sites, "sum": ssum.name, "clipped": clip,
                              "sensitivity": sensitivity(schema, labels=labels)}
    if labels:
        params["label_counts"] = True
    if privacy is None:
        return Guarantee(layer="federated-statistics", property="no DP: " + learns,
                         against="no one beyond what the sum hides", assumptions=tuple(assumptions), params=params)
    eps = privacy.epsilon
    z_server = privacy.noise_multiplier / math.sqrt(sites) if plain else privacy.noise_multiplier
    params |= {"epsilon": eps, "delta": privacy.delta, "noise_multiplier": privacy.noise_multiplier,
               "unit": privacy.unit, "dp_event": str(privacy.event),
               "epsilon_server": _gaussian_epsilon(z_server, privacy.delta)}
    assumptions.append("composes with the training guarantee (at most the sum of the epsilons and of the deltas)")
    against = ("the server and anyone who sees the statistics or the model" if not plain else
               "anyone who sees the statistics or the model; the server sees each site's vector with noise "
               f"multiplier {z_server:.3g} (epsilon_server)")
    return Guarantee(
        layer="federated-statistics",
        property=f"({eps:.4g}, {privacy.delta:g})-DP for each {privacy.unit} (Gaussian, z = "
                 f"{privacy.noise_multiplier:.4g}, L2 sensitivity {sensitivity(schema, labels=labels):.4g}): " + learns,
        against=against, assumptions=tuple(assumptions), params=params,
    )


def warn(message: str) -> None:
    """A data warning, shown once on the console (CLI) and catchable in tests."""
    warnings.warn(message, DataWarning, stacklevel=3)
