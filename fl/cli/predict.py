"""``privagg predict --model DIR --data new.csv``: a saved model (:mod:`fl.saved`) applied to new rows.

``privagg train --save-model DIR`` and :meth:`fl.api.FederatedResult.save` write ``DIR`` (weights,
``model.json`` with the architecture, feature order, preprocessing, class labels and privacy summary,
and for a user's own module an exported ``program.pt2``). ``privagg predict`` rebuilds the CLI's model
families from the JSON and runs a user's module from its program (no class code needed), applies
exactly the training run's preprocessing and refuses a CSV whose columns differ, naming them. Loading
never runs code from the directory (see :mod:`fl.saved`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fl.data.stats import DataError
from fl.saved import FORMAT, SavedModel, load_model, rows_of, save_model

__all__ = ["FORMAT", "SavedModel", "add_arguments", "load_model", "predict_frame", "run", "save_model"]


def _feature_columns(saved: SavedModel) -> tuple[list[str], str | None]:
    """The raw columns the model reads, and the label column's name (unknown for in-memory sites)."""
    if saved.stats is None:
        return list(saved.features), None
    schema = saved.stats.schema
    return [*schema.numeric, *schema.categorical], schema.target


def _check_columns(saved: SavedModel, frame: pd.DataFrame, allow: Sequence[str]) -> None:
    """The new rows' columns must be the training features (plus the label and ignored columns)."""
    features, target = _feature_columns(saved)
    cols = [str(c) for c in frame.columns]
    missing = [c for c in features if c not in cols]
    extra = [c for c in cols if c not in features and c != target and c not in saved.ignored and c not in allow]
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"not in training {extra}" if extra else ""]
        fix = " (add them)" if missing else ""
        if extra:
            fix += "; drop the extra columns or pass --ignore COL for each"
        raise DataError(f"the CSV's columns differ from the model's features: {'; '.join(p for p in parts if p)}"
                        f"{fix}")
    gaps = [c for c in features if frame[c].isna().any()]
    if gaps:
        raise DataError(f"missing values in column(s) {gaps}; fill or drop those rows before predicting")


def predict_frame(saved: SavedModel, frame: pd.DataFrame, *, allow: Sequence[str] = ()) -> pd.DataFrame:
    """Class and class probabilities for each row of ``frame``, after the training run's preprocessing."""
    _check_columns(saved, frame, allow)
    if saved.stats is not None:
        x = saved.stats.transform(frame)
    else:  # in-memory sites: the feature columns as given, in the saved order and row shape
        features, _ = _feature_columns(saved)
        try:
            x = frame[features].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"the model reads numbers, but a feature column is not numeric ({exc}); encode it "
                            f"as in training") from exc
    prob = saved.predict_proba(rows_of(saved, x))
    out = pd.DataFrame({"prediction": [saved.classes[i] for i in prob.argmax(axis=1)]}, index=frame.index)
    for k, label in enumerate(saved.classes):
        out[f"probability_{label}"] = prob[:, k]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``privagg predict``."""
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="a directory written by privagg train --save-model or FederatedResult.save")
    parser.add_argument("--data", type=Path, required=True, metavar="CSV", help="the rows to predict")
    parser.add_argument("--out", type=Path, metavar="CSV", help="write predictions here (default: standard output)")
    parser.add_argument("--ignore", action="append", default=[], metavar="COL",
                        help="a column of the CSV that is not a feature (an id); repeat per column")


def run(args: argparse.Namespace) -> int:
    """``privagg predict``: one prediction per row; the accuracy too if the CSV has the label column."""
    saved = load_model(args.model)
    if not args.data.is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    frame = pd.read_csv(args.data)
    preds = predict_frame(saved, frame, allow=args.ignore)
    target = _feature_columns(saved)[1]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        preds.to_csv(args.out, index=False)
        sys.stdout.write(f"predictions: {args.out} ({len(preds)} rows)\n")
    else:
        preds.to_csv(sys.stdout, index=False)
    if target is not None and target in frame.columns:
        truth = frame[target].astype(str).to_numpy()
        acc = float(np.mean(preds["prediction"].to_numpy() == truth)) if len(truth) else math.nan
        stream = sys.stderr if args.out is None else sys.stdout  # stdout may be carrying the predictions
        stream.write(f"accuracy against column {target!r}: {acc:.4f}\n")
    return 0
