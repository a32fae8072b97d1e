"""The trained model out and back in: ``privagg train --save-model DIR`` and ``privagg predict``.

``DIR/weights.pt`` holds the model's ``state_dict`` (tensors only, read back with
``torch.load(weights_only=True)``: loading never runs code from the file) and ``DIR/model.json`` what is
needed to use it on new rows: the architecture, the feature order, the preprocessing the federation
released (numeric means and standard deviations, category vocabularies), the class labels and the run's
privacy summary. ``privagg predict --model DIR --data new.csv`` rebuilds the model from the JSON, applies
exactly that preprocessing and refuses a CSV whose columns differ, naming them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fl.data.stats import DataError, FederatedStats, Schema
from fl.spec import Guarantee

if TYPE_CHECKING:
    from torch import nn

    from fl.training.loop import Federation

__all__ = ["FORMAT", "SavedModel", "add_arguments", "load_model", "predict_frame", "run", "save_model"]

FORMAT = "privagg-model"
VERSION = 1
WEIGHTS = "weights.pt"
META = "model.json"


def _ignored_columns(fed: Federation) -> list[str]:
    """Raw columns the run never used as features (declared ids, the partition column): allowed in new data."""
    cols = list(fed.config.drop_columns)
    if fed.config.partition.startswith("by-column:"):
        cols.append(fed.config.partition.split(":", 1)[1])
    return cols


def save_model(fed: Federation, directory: Path, *, report: Mapping[str, Any] | None = None) -> Path:
    """Write ``fed``'s current global model and its preprocessing to ``directory`` (created if needed)."""
    import torch

    from fl.training.models import set_flat

    stats = fed.data.stats
    if stats is None:
        raise DataError("this run has no preprocessing statistics to save; train on a table or per-site CSVs")
    if fed.config.model not in ("logreg", "mlp"):
        raise DataError(f"--save-model rebuilds logreg and mlp models from JSON; {fed.config.model!r} is not one")
    directory.mkdir(parents=True, exist_ok=True)
    set_flat(fed.model, fed.params)
    torch.save({k: v.detach().clone() for k, v in fed.model.state_dict().items()}, directory / WEIGHTS)
    final = dict(report.get("final", {})) if report else {}
    meta = {
        "format": FORMAT, "version": VERSION,
        "architecture": {"kind": fed.config.model, "hidden": fed.config.hidden,
                         "num_features": fed.data.num_features, "num_classes": fed.data.num_classes},
        "features": list(stats.feature_names),
        "classes": list(fed.data.classes),
        "preprocessing": {
            "target": stats.schema.target, "numeric": list(stats.schema.numeric),
            "categorical": list(stats.schema.categorical), "mean": [float(v) for v in stats.mean],
            "std": [float(v) for v in stats.std], "vocabulary": {c: list(v) for c, v in stats.vocabulary.items()},
            "rows": int(stats.rows), "ignored_columns": _ignored_columns(fed),
        },
        "privacy": {"pipeline": fed.plan.pipeline.name, "epsilon": final.get("epsilon"), "delta": final.get("delta")},
    }
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


class SavedModel:
    """A model read back by :func:`load_model`: the module, its preprocessing and its class labels."""

    def __init__(self, model: nn.Module, stats: FederatedStats, meta: Mapping[str, Any]) -> None:
        self.model = model
        self.stats = stats
        self.meta = meta
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.ignored: tuple[str, ...] = tuple(meta["preprocessing"].get("ignored_columns", ()))


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    if not path.is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"no saved model in {directory} (expected {META} and {WEIGHTS}); write one with "
                                f"privagg train ... --save-model {directory}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); save the model again with --save-model") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{path} is not a privagg model (format {FORMAT!r} version {VERSION}); save it again")
    return meta


def _stats(meta: Mapping[str, Any]) -> FederatedStats:
    pre = meta["preprocessing"]
    schema = Schema(target=str(pre["target"]), numeric=tuple(pre["numeric"]), categorical=tuple(pre["categorical"]))
    return FederatedStats(
        schema=schema, mean=np.asarray(pre["mean"], dtype=np.float64), std=np.asarray(pre["std"], dtype=np.float64),
        vocabulary={c: tuple(v) for c, v in pre["vocabulary"].items()}, rows=int(pre["rows"]),
        guarantee=Guarantee(layer="saved preprocessing", property="statistics released by the training run",
                            against="see the training run's ledger"),
    )


def load_model(directory: Path) -> SavedModel:
    """Rebuild the saved model; the weights are read as tensors only (``weights_only=True``)."""
    import torch

    from fl.training.models import build_model

    meta = _read_meta(directory)
    arch = meta["architecture"]
    model = build_model(str(arch["kind"]), int(arch["num_features"]), int(arch["num_classes"]),
                        hidden=int(arch["hidden"]))
    try:  # tensors only: a file holding any other object is refused, never run
        state = torch.load(directory / WEIGHTS, weights_only=True)
    except Exception as exc:
        raise DataError(f"{directory / WEIGHTS} is not a plain tensor file ({type(exc).__name__}); save the model "
                        f"again with --save-model") from exc
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DataError(f"{directory / WEIGHTS} does not fit the architecture in {META} ({exc}); save it "
                        f"again") from exc
    model.eval()
    return SavedModel(model, _stats(meta), meta)


def _check_columns(saved: SavedModel, frame: pd.DataFrame, allow: Sequence[str]) -> None:
    """The new rows' columns must be the training features (plus the label and ignored columns)."""
    schema = saved.stats.schema
    features = [*schema.numeric, *schema.categorical]
    cols = [str(c) for c in frame.columns]
    missing = [c for c in features if c not in cols]
    extra = [c for c in cols if c not in features and c != schema.target and c not in saved.ignored
             and c not in allow]
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
    import torch

    _check_columns(saved, frame, allow)
    x = torch.from_numpy(saved.stats.transform(frame))
    with torch.no_grad():
        prob = torch.softmax(saved.model(x), dim=1).numpy()
    out = pd.DataFrame({"prediction": [saved.classes[i] for i in prob.argmax(axis=1)]}, index=frame.index)
    for k, label in enumerate(saved.classes):
        out[f"probability_{label}"] = prob[:, k]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``privagg predict``."""
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="a directory written by privagg train --save-model")
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
    target = saved.stats.schema.target
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        preds.to_csv(args.out, index=False)
        sys.stdout.write(f"predictions: {args.out} ({len(preds)} rows)\n")
    else:
        preds.to_csv(sys.stdout, index=False)
    if target in frame.columns:
        truth = frame[target].astype(str).to_numpy()
        acc = float(np.mean(preds["prediction"].to_numpy() == truth)) if len(truth) else math.nan
        stream = sys.stderr if args.out is None else sys.stdout  # stdout may be carrying the predictions
        stream.write(f"accuracy against column {target!r}: {acc:.4f}\n")
    return 0
