"""The Python API: your own torch model and your own sites' data in, the trained model out.

In the spirit of Opacus's ``make_private``, plain objects instead of a configuration file::

    result = fl.train(model=net, sites={"north": (x1, y1), "south": (x2, y2)}, rounds=20,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss=nn.CrossEntropyLoss(),
                      privacy=[Clip(l2=1.0), "noise", SecAggPlus()], epsilon=2.0, delta=1e-5,
                      evaluation=(x_test, y_test))
    result.model     # the trained nn.Module (a copy; ``net`` itself is not touched)
    result.report    # the same JSON-ready report as ``privagg train --report``
    result.ledger    # what every layer guaranteed, round by round
    result.save("model/")   # weights, model.json and an exported program: fl.load_model("model/") needs no class

This module only translates: the sites become an :class:`fl.data.sites.Dataset` whose parts are the
sites, the privacy objects become the same :class:`fl.config.PrivacyConfig` the CLI builds (so one
table, :func:`fl.privacy.plan.build_plan`, decides every guarantee and its accounting), and the rounds
run on :class:`fl.training.loop.Federation`. Every check of the user's input happens before round 1.

A site is a torch ``Dataset`` / ``DataLoader`` (materialized once into tensors; the trainer batches
itself), an ``(X, y)`` pair of arrays, tensors or a pandas ``(DataFrame, Series)``, or a CSV path
(then every site is a CSV, preprocessing is federated as in ``privagg train --site``, and ``target=``
names the label column). Labels are class indices ``0..C-1``; ``C`` is the model's output width.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import Dataset, load_federated
from fl.data.stats import DataError
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.privacy.ledger import Ledger
from fl.spec import CompositionError
from fl.sums.paillier import PaillierSum
from fl.sums.plain import PlainSum
from fl.sums.secagg import SecAgg, SecAggPlus
from fl.training.class_weights import normalize_class_weight
from fl.training.dp_sgd import DpSgdTrainer
from fl.training.loop import BudgetExhaustedError, Federation
from fl.training.models import set_flat
from fl.training.trainers import PlainTrainer

__all__ = ["DPSGD", "DpRelease", "FederatedResult", "private_sum", "secure_sum", "train"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Evaluation = tuple[Any, Any] | Callable[[nn.Module], Mapping[str, float]] | str | Path | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DPSGD:
    """Example-level DP-SGD in every site's local training (the ``dp-sgd`` stage) as an object.

    ``clip``: per-example gradient norm; ``batch_size``: expected Poisson batch size;
    ``noise_multiplier``: fixed z, or ``None`` to calibrate it to ``train(epsilon=...)``.
    """

    clip: float = 1.0
    batch_size: int = 32
    noise_multiplier: float | None = None


@dataclass(frozen=True)
class FederatedResult:
    """What :func:`train` returns: the trained module with its report and privacy ledger beside it."""

    model: nn.Module
    report: dict[str, Any]
    ledger: Ledger
    card: Mapping[str, Any] | None = field(default=None, repr=False)  # what save() writes beside the weights

    def save(self, directory: Path | str, *, example_input: Any = None) -> Path:
        """Write the trained model to ``directory`` for :func:`fl.load_model` and ``privagg predict``.

        ``weights.pt`` (the state_dict, read back tensors-only), ``model.json`` (feature order,
        preprocessing, class labels, the privacy summary and guarantee list) and ``program.pt2``: the
        module exported by ``torch.export`` (dynamic batch), which loads without your class's code.
        ``example_input``: rows to trace the export with (default: zero rows of the sites' row shape).
        A module torch.export cannot take is saved as weights and JSON only, with a warning; load it
        with ``fl.load_model(DIR, module=YourClass(...))``.
        """
        from fl.saved import privacy_summary, write_model

        if self.card is None:
            raise ValueError("this result has no model card (it was not made by fl.train); save its model with "
                             "torch.save(result.model.state_dict(), PATH)")
        return write_model(self.model, self.card, Path(directory), privacy=privacy_summary(self.report),
                           example_input=example_input)

    @property
    def epsilon(self) -> float | None:
        """The run's final epsilon (``None`` without DP)."""
        eps = self.report["final"].get("epsilon")
        return None if eps is None else float(eps)

    @property
    def delta(self) -> float | None:
        delta = self.report["final"].get("delta")
        return None if delta is None else float(delta)


# ---- privacy objects -> the CLI's privacy configuration ---------------------------------------------
def _fields_of(obj: object) -> tuple[str, dict[str, Any], dict[str, tuple[Any, Any]]]:
    """(token, PrivacyConfig fields, fields that must keep their defaults) for one privacy object."""
    if isinstance(obj, Clip):
        return "clip", {"clip": obj.l2}, {}
    if isinstance(obj, Quantize):
        return "quantize", {"quant_bits": obj.bits}, {"bound": (obj.bound, None)}
    if isinstance(obj, GaussianNoise):
        fixed: dict[str, tuple[Any, Any]] = {"discrete": (obj.discrete, False), "shares": (obj.shares, None),
                 "granularity": (obj.granularity, None)}
        return ("dnoise" if obj.placement == "clients" else "noise"), {"noise_multiplier": obj.multiplier}, fixed
    if isinstance(obj, SecAggPlus):
        fixed = {"authenticated": (obj.authenticated, False), "min_cohort": (obj.min_cohort, None),
                 "security_bits": (obj.security_bits, 40.0), "correctness_bits": (obj.correctness_bits, 30.0)}
        return "secagg+", {"threshold": obj.threshold, "neighbours": obj.neighbours,
                           "dropout_fraction": obj.dropout, "corrupt_fraction": obj.corrupt}, fixed
    if isinstance(obj, SecAgg):
        fixed = {"authenticated": (obj.authenticated, False), "min_cohort": (obj.min_cohort, None)}
        return "secagg", {"threshold": obj.threshold}, fixed
    if isinstance(obj, PaillierSum):
        fixed = {"key_bits": (obj.key_bits, 2048), "key_holder": (obj.key_holder, "separate"),
                 "randomness": (obj.randomness, "fixed-base"), "workers": (obj.workers, None)}
        return "paillier", {}, fixed
    if isinstance(obj, DPSGD):
        return "dp-sgd", {"dpsgd_clip": obj.clip, "dpsgd_batch_size": obj.batch_size,
                          "dpsgd_noise_multiplier": obj.noise_multiplier}, {}
    raise CompositionError(
        f"privacy stage {obj!r} is not one fl.train knows; use Clip, Quantize, GaussianNoise, SecAgg, SecAggPlus, "
        f"PaillierSum, fl.api.DPSGD or the CLI's words ('clip', 'noise', 'secagg+', ...)"
    )


def privacy_config(
    privacy: str | Sequence[object], *, epsilon: float | None, delta: float, options: Mapping[str, Any] | None = None
) -> PrivacyConfig:
    """The :class:`PrivacyConfig` for a token string (``"clip,noise,secagg+"``) or a list of stage objects.

    List items are objects (their parameters become the config's) or the CLI's words; a word takes its
    parameters from ``options`` (PrivacyConfig fields). ``epsilon`` calibrates noise written as the word
    ``"noise"``/``"dnoise"`` (or ``DPSGD(noise_multiplier=None)``); a fixed multiplier and ``epsilon``
    together are refused, as on the command line.
    """
    fields: dict[str, Any] = dict(options or {})
    known = {f.name for f in dataclasses.fields(PrivacyConfig)} - {"spec", "epsilon", "delta"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown privacy option(s) {unknown}; choose from {', '.join(sorted(known))}")
    if isinstance(privacy, str):
        return PrivacyConfig(spec=privacy, epsilon=epsilon, delta=delta, **fields)
    if not isinstance(privacy, Sequence):
        raise TypeError(f"privacy= takes a string like 'clip,noise,secagg+' or a list of stages, got {privacy!r}")
    tokens: list[str] = []
    for stage in privacy:
        if isinstance(stage, str):
            tokens.append(stage)
            continue
        if isinstance(stage, PlainSum):
            continue
        token, values, fixed = _fields_of(stage)
        odd = {k: v for k, (v, default) in fixed.items() if v != default}
        if odd:
            raise CompositionError(
                f"{type(stage).__name__}({', '.join(f'{k}={v!r}' for k, v in odd.items())}) cannot be set through "
                f"fl.train; leave those at their defaults, or compose fl.pipeline.Pipeline and drive "
                f"fl.training.loop.Federation yourself"
            )
        if epsilon is not None and values.get("noise_multiplier", values.get("dpsgd_noise_multiplier")) is not None:
            word = "'dp-sgd' or DPSGD(noise_multiplier=None)" if token == "dp-sgd" else f"the word {token!r}"
            raise CompositionError(
                f"{stage!r} fixes the noise multiplier but epsilon={epsilon:g} asks to calibrate it: write the stage "
                f"as {word} (privacy=[Clip(l2=1.0), 'noise', SecAggPlus()]) or drop epsilon="
            )
        for key, value in values.items():
            if key in fields and fields[key] != value:
                raise CompositionError(f"{key} is set twice ({fields[key]!r} and {value!r} from {stage!r}); keep one")
            fields[key] = value
        tokens.append(token)
    return PrivacyConfig(spec=",".join(tokens) or "none", epsilon=epsilon, delta=delta, **fields)


# ---- factories and losses ---------------------------------------------------------------------------
def _check_optimizer(optimizer: object, model: nn.Module) -> OptimizerFactory:
    """A factory ``params -> Optimizer`` (each site builds its own optimizer each round)."""
    if optimizer is None:
        return lambda params: torch.optim.SGD(params, lr=0.1)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer= got a {type(optimizer).__name__} instance, which is bound to one model's parameters; pass "
            f"a factory that builds one per site: optimizer=lambda params: torch.optim.{type(optimizer).__name__}"
            f"(params, lr=...)"
        )
    if isinstance(optimizer, type) or not callable(optimizer):
        raise TypeError(
            f"optimizer= must be a factory params -> torch.optim.Optimizer (e.g. lambda params: "
            f"torch.optim.SGD(params, lr=0.1)), got {optimizer!r}"
        )
    built = optimizer(copy.deepcopy(model).parameters())
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer= returned {type(built).__name__}, not a torch.optim.Optimizer; write it as lambda params: "
            f"torch.optim.SGD(params, lr=0.1)"
        )
    factory: OptimizerFactory = optimizer
    return factory


def _check_loss(loss: object, *, per_example: bool) -> LossFn:
    """A callable ``(output, labels) -> loss``; under DP-SGD one loss per example (``reduction='none'``)."""
    if loss is None:
        return nn.functional.cross_entropy if not per_example else _per_example_ce
    if isinstance(loss, type):
        raise TypeError(f"loss= got the class {loss.__name__}; pass an instance: loss={loss.__name__}()")
    if not callable(loss):
        raise TypeError(
            f"loss= must be callable as loss(output, labels) (e.g. torch.nn.CrossEntropyLoss()), got {loss!r}"
        )
    if per_example and isinstance(loss, nn.Module) and hasattr(loss, "reduction"):
        unreduced = copy.copy(loss)
        setattr(unreduced, "reduction", "none")  # noqa: B010 - the attribute is not in nn.Module's type
        fn: LossFn = unreduced
        return fn
    checked: LossFn = loss
    return checked


def _per_example_ce(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, labels, reduction="none")


def _probe_loss(loss: LossFn, output: torch.Tensor, labels: torch.Tensor, *, per_example: bool) -> None:
    """Call the loss once on the model's output for a few rows: it must give a finite loss (per example)."""
    try:
        value = loss(output, labels)
    except Exception as exc:
        raise TypeError(f"loss(output, labels) failed on the model's output of shape {tuple(output.shape)} and "
                        f"labels of shape {tuple(labels.shape)} ({exc}); pass a loss for class logits, e.g. "
                        f"nn.CrossEntropyLoss()") from exc
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss(output, labels) returned {type(value).__name__}, not a tensor")
    if per_example and tuple(value.shape) != (labels.shape[0],):
        raise TypeError(
            f"DP-SGD clips each example's gradient and class weights scale each example's loss, so the loss must "
            f"return one value per example (shape "
            f"({labels.shape[0]},)), got shape {tuple(value.shape)}: use a torch loss module (its reduction is "
            f"set to 'none' for you) or a function with reduction='none'"
        )


# ---- sites -> one Dataset whose parts are the sites -------------------------------------------------
def _named_sites(sites: object) -> dict[str, object]:
    """``{name: data}`` from a mapping; for a sequence the CSV file stems, else ``site-0, site-1, ...``."""
    if isinstance(sites, Mapping):
        named = {str(k): v for k, v in sites.items()}
    elif isinstance(sites, Sequence) and not isinstance(sites, str | bytes):
        if sites and all(_is_path(v) for v in sites):  # CSV files: the file stem names the site, as --sites DIR
            stems = [Path(str(v)).stem for v in sites]
            if len(set(stems)) == len(stems):
                return dict(zip(stems, sites, strict=True))
        named = {f"site-{k}": v for k, v in enumerate(sites)}
    else:
        raise TypeError("sites= takes a list of sites or a {name: site} dict; a site is a torch Dataset, a DataLoader, "
                        f"an (X, y) pair or a CSV path, got {type(sites).__name__}")
    if not named:
        raise DataError("sites= is empty; give at least one site's data")
    return named


def _is_path(obj: object) -> bool:
    return isinstance(obj, str | Path)


def _to_numpy(value: object, what: str) -> NDArray[Any]:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{what} cannot be read as an array ({exc})") from exc


def _rows(obj: object, name: str) -> tuple[NDArray[Any], NDArray[Any], tuple[str, ...] | None]:
    """(features, labels, column names or None) of one in-memory site."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data import Dataset as TorchDataset

    who = f"site {name!r}"
    if isinstance(obj, DataLoader):  # every batch once; the trainer does its own batching
        batches = [(b[0], b[1]) for b in obj]
        if not batches:
            return np.zeros((0, 1), np.float32), np.zeros(0, np.int64), None
        return (_to_numpy(torch.cat([torch.as_tensor(x) for x, _ in batches]), who),
                _to_numpy(torch.cat([torch.as_tensor(y).reshape(-1) for _, y in batches]), who), None)
    if isinstance(obj, TensorDataset) and len(obj.tensors) >= 2:
        return _to_numpy(obj.tensors[0], who), _to_numpy(obj.tensors[1], who), None
    if isinstance(obj, TorchDataset):
        items = [obj[i] for i in range(len(obj))]  # type: ignore[arg-type]
        if not items:
            return np.zeros((0, 1), np.float32), np.zeros(0, np.int64), None
        return (np.stack([_to_numpy(x, who) for x, _ in items]), np.asarray([int(y) for _, y in items]), None)
    if isinstance(obj, tuple | list) and len(obj) == 2:
        x, y = obj
        columns = tuple(map(str, x.columns)) if hasattr(x, "columns") else None
        return _to_numpy(x, f"{who}'s X"), _to_numpy(y, f"{who}'s y").reshape(-1), columns
    raise TypeError(f"{who}: a site is a torch Dataset, a DataLoader, an (X, y) pair or a CSV path, "
                    f"got {type(obj).__name__}")


def _check_site(name: str, x: NDArray[Any], y: NDArray[Any], *, single_class_ok: bool) -> None:
    """No rows, a row/label mismatch, NaN features or a single class: each refused with its fix."""
    if len(y) == 0 or x.shape[0] == 0:
        raise DataError(f"site {name!r} has no rows; remove it from sites= or give it data")
    if x.shape[0] != len(y):
        raise DataError(f"site {name!r} has {x.shape[0]} feature rows but {len(y)} labels; give one label per row")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
        raise DataError(
            f"site {name!r} has NaN/Inf features in {len(bad)} row(s) (first: {bad[:5].tolist()}); drop or impute them "
            f"before training (CSV sites can use missing='drop' or 'impute')"
        )
    if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
        raise DataError(f"site {name!r} has non-numeric features ({x.dtype}); encode them, or pass CSV sites (one-hot "
                        f"with a shared vocabulary)")
    if len(np.unique(y)) < 2 and not single_class_ok:
        raise DataError(
            f"site {name!r} holds a single class ({np.unique(y)[0]!r}); its updates only push towards that class. Give "
            f"it rows of other classes, or pass allow_single_class_sites=True if the label skew is intended"
        )


def _labels(name: str, y: NDArray[Any]) -> NDArray[np.int64]:
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise DataError(f"site {name!r}: labels must be class indices 0..C-1 (got {y.dtype}); map them first, e.g. "
                    f"classes, y = np.unique(y, return_inverse=True)")


def _same_shape(shapes: Mapping[str, tuple[tuple[int, ...], tuple[str, ...] | None]]) -> None:
    """Every site's features have the same shape and (for DataFrames) the same named columns."""
    first, (shape0, cols0) = next(iter(shapes.items()))
    for name, (shape, cols) in shapes.items():
        if cols0 is not None and cols is not None and cols != cols0:
            missing = [c for c in cols0 if c not in cols]
            extra = [c for c in cols if c not in cols0]
            what = "; ".join(p for p in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "",
                                         "same columns in another order" if not (missing or extra) else "") if p)
            raise DataError(f"columns differ across sites: site {name!r} vs {first!r}: {what}. Give every site "
                            f"the same columns in the same order")
        if shape != shape0:
            raise DataError(f"columns differ across sites: site {name!r} has features of shape {shape}, site {first!r} "
                            f"{shape0}; give every site the same feature columns")


def _feature_dtype(model: nn.Module, x: NDArray[Any]) -> type[np.generic]:
    """int64 for token ids fed to an embedding, else float32 (what the loop's tensors hold)."""
    embeds = any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in model.modules())
    return np.int64 if embeds and x.dtype.kind in "iu" else np.float32


def _array_dataset(
    named: Mapping[str, object], evaluation: Evaluation, model: nn.Module, *, single_class_ok: bool
) -> Dataset:
    """In-memory sites (site after site, ``parts`` = the sites) and the evaluation arrays, checked."""
    rows = {name: _rows(obj, name) for name, obj in named.items()}
    for name, (x, y, _) in rows.items():
        _check_site(name, x, y, single_class_ok=single_class_ok)
    _same_shape({n: (tuple(x.shape[1:]), cols) for n, (x, _, cols) in rows.items()})
    x0 = next(iter(rows.values()))[0]
    dtype = _feature_dtype(model, x0)
    xs = [x.astype(dtype) for x, _, _ in rows.values()]
    ys = [_labels(n, y) for n, (_, y, _) in rows.items()]
    if isinstance(evaluation, tuple | list):
        xt, yt, cols = _rows(tuple(evaluation), "evaluation")
        _check_site("evaluation", xt, yt, single_class_ok=True)
        _same_shape({next(iter(rows)): (tuple(x0.shape[1:]), next(iter(rows.values()))[2]),
                     "evaluation": (tuple(xt.shape[1:]), cols)})
        x_test, y_test = xt.astype(dtype), _labels("evaluation", yt)
    else:
        x_test, y_test = np.zeros((0, *x0.shape[1:]), dtype=dtype), np.zeros(0, dtype=np.int64)
    sizes = np.cumsum([0, *(len(y) for y in ys)])
    width = int(max(int(y.max()) for y in [*ys, y_test] if len(y)) + 1)
    names = tuple(rows)
    cols0 = next(iter(rows.values()))[2]
    return Dataset(
        name="sites", x_train=np.concatenate(xs), y_train=np.concatenate(ys), x_test=x_test, y_test=y_test,
        feature_names=cols0 or tuple(f"x{i}" for i in range(int(np.prod(x0.shape[1:])))),
        classes=tuple(str(c) for c in range(width)),
        parts=tuple(np.arange(sizes[k], sizes[k + 1], dtype=np.int64) for k in range(len(names))), site_names=names,
    )


def _check_model(model: nn.Module, data: Dataset, num_classes: int | None) -> int:
    """Run the model on two rows: its output must be (rows, C) with C the number of classes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model= must be a torch.nn.Module, got {type(model).__name__}")
    probe = copy.deepcopy(model).eval()
    x = torch.from_numpy(data.x_train[:2])
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as exc:
        raise TypeError(f"the model cannot run on a batch of the sites' features (shape {tuple(x.shape)}): {exc}. "
                        f"Make its input match one row of X (batch first)") from exc
    classes = num_classes if num_classes is not None else data.num_classes
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"the model must return class scores of shape (batch, {classes}), got {shape} for a batch of "
                        f"{x.shape[0]}; end it with nn.Linear(..., {classes})")
    if out.shape[1] != classes:
        hint = "" if num_classes is not None else " (or pass num_classes= if some classes are absent from every site)"
        raise DataError(
            f"the model outputs {out.shape[1]} class score(s) per example but the labels have {classes} classes; end "
            f"the model with nn.Linear(..., {classes}){hint}"
        )
    top = max(int(data.y_train.max()), int(data.y_test.max()) if len(data.y_test) else 0)
    if top >= classes or min(int(data.y_train.min()), 0) < 0:
        raise DataError(f"labels must lie in 0..{classes - 1}, found {top}; map them to class indices first")
    return classes


class _ApiFederation(Federation):
    """A federation whose evaluation is the user's: arrays (the loop's metrics), a callable, or none."""

    user_evaluation: Callable[[nn.Module], Mapping[str, float]] | None = None
    has_test_rows: bool = True

    def use_evaluation(self) -> None:
        """Route the server side's evaluation (every round's record and the final metrics) through the user's."""
        user, has_rows, server = self.user_evaluation, self.has_test_rows, self.server

        def run(model: nn.Module) -> dict[str, float]:
            if user is not None:
                model.eval()
                with torch.no_grad():
                    metrics = user(model)
                if not isinstance(metrics, Mapping):
                    raise TypeError(f"evaluation(model) must return a dict of metrics, got {type(metrics).__name__}")
                return {str(k): float(v) for k, v in metrics.items()}
            return server.test_metrics() if has_rows else {}

        server.evaluation = run


def _csv_dataset(
    named: Mapping[str, object], evaluation: Evaluation, config: TrainConfig
) -> Dataset:
    """CSV sites through the CLI's loader: shared schema, federated statistics, held-out rows or a test CSV."""
    if not all(_is_path(p) for p in named.values()):
        kinds = sorted({"CSV path" if _is_path(p) else type(p).__name__ for p in named.values()})
        raise DataError(f"sites mix CSV paths with in-memory data ({', '.join(kinds)}); give every site the same kind")
    if config.target is None:
        raise DataError("CSV sites need target='COLUMN', the label column")
    if isinstance(evaluation, tuple | list):
        raise DataError("with CSV sites, evaluation= is a CSV path (the server's test set), a function or None (each "
                        "site holds out test_fraction of its rows)")
    return load_federated(config)


def _config(
    *, model: nn.Module, sites: int, rounds: int, privacy: PrivacyConfig, target: str | None, test: str | None,
    options: Mapping[str, Any],
) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    allowed = {"local_epochs", "batch_size", "cohort", "sample_rate", "weighting", "server_opt", "server_lr",
               "dropout", "seed", "test_fraction", "missing", "drop_columns", "keep_columns", "categories",
               "feature_bounds", "stats_epsilon", "insecure_seeded_randomness", "class_weight"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise TypeError(f"unknown training option(s) {bad}; choose from {', '.join(sorted(allowed & known))}")
    return TrainConfig(
        dataset="sites", target=target, clients=sites, model=f"custom:{type(model).__name__}", rounds=rounds,
        privacy=privacy, test_site=test, **options,
    )


def train(
    *,
    model: nn.Module,
    sites: Mapping[str, object] | Sequence[object],
    rounds: int = 10,
    optimizer: OptimizerFactory | None = None,
    loss: LossFn | None = None,
    privacy: str | Sequence[object] = "none",
    epsilon: float | None = None,
    delta: float = 1e-5,
    evaluation: Evaluation = None,
    target: str | None = None,
    num_classes: int | None = None,
    privacy_options: Mapping[str, Any] | None = None,
    allow_single_class_sites: bool = False,
    progress: bool = False,
    class_weight: str | Mapping[Any, float] | Sequence[float] | None = None,
    **options: Any,
) -> FederatedResult:
    """Federate ``model`` over ``sites`` for ``rounds`` rounds with the ``privacy`` stages; see the module doc.

    ``optimizer``: a factory ``params -> Optimizer`` (default SGD at lr 0.1), built afresh by each site
    each round. ``loss``: any callable ``(output, labels) -> loss`` (default cross-entropy). ``evaluation``:
    ``(X, y)``, a function ``model -> {metric: value}`` or ``None``; CSV sites take a test CSV path.
    ``class_weight``: ``"balanced"``, ``{label: weight}`` or a weight per class (:mod:`fl.training.class_weights`).
    ``options``: further TrainConfig fields (``local_epochs``, ``batch_size``, ``cohort``, ``sample_rate``,
    ``seed``, ``missing``, ...). Every input is checked before round 1, each error naming its fix.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model= must be a torch.nn.Module, got {type(model).__name__}")
    factory = _check_optimizer(optimizer, model)
    pc = privacy_config(privacy, epsilon=epsilon, delta=delta, options=privacy_options)
    dpsgd = "dp-sgd" in pc.tokens()
    weighted = normalize_class_weight(class_weight)
    per_example = dpsgd or weighted != "none"  # DP-SGD's clip and class weights act on each example's loss
    loss_fn = _check_loss(loss, per_example=per_example)
    named = _named_sites(sites)
    test = str(evaluation) if _is_path(evaluation) else None
    config = _config(model=model, sites=len(named), rounds=rounds, privacy=pc, target=target, test=test,
                     options={**options, "class_weight": weighted})
    if any(_is_path(p) for p in named.values()):
        data = _csv_dataset(named, evaluation, dataclasses.replace(config, sites=tuple(
            (n, str(p)) for n, p in named.items())))
        for name, rows in zip(data.site_names, data.parts, strict=True):
            _check_site(name, data.x_train[rows], data.y_train[rows], single_class_ok=allow_single_class_sites)
    else:
        if test is not None:
            raise DataError("evaluation= is a CSV path but the sites are in memory; pass (X_test, y_test) instead")
        data = _array_dataset(named, evaluation, model, single_class_ok=allow_single_class_sites)
    classes = _check_model(model, data, num_classes)
    if classes != data.num_classes:
        data = dataclasses.replace(data, classes=tuple(str(c) for c in range(classes)))
    with torch.no_grad():
        out = copy.deepcopy(model).eval()(torch.from_numpy(data.x_train[:2]))
    _probe_loss(loss_fn, out, torch.from_numpy(data.y_train[:2]), per_example=per_example)
    # no loss given: the trainers keep their own cross-entropy (DP-SGD's closed form for one Linear layer)
    fed = _federation(config, data, model, factory, loss_fn if loss is not None else None, evaluation)
    return _run(fed, rounds, progress=progress)


def _federation(
    config: TrainConfig, data: Dataset, model: nn.Module, factory: OptimizerFactory, loss_fn: LossFn | None,
    evaluation: Evaluation,
) -> _ApiFederation:
    fed = _ApiFederation(config, dataset=data, model=model, own_parts=True)
    fed.has_test_rows = len(data.y_test) > 0
    if callable(evaluation):
        fed.user_evaluation = evaluation
    fed.use_evaluation()
    if isinstance(fed.trainer, PlainTrainer | DpSgdTrainer):
        fed.trainer = dataclasses.replace(fed.trainer, optimizer_factory=factory, loss=loss_fn)
    else:  # pragma: no cover - the plan only builds these two
        raise CompositionError(f"trainer {type(fed.trainer).__name__} takes no optimizer or loss factory")
    return fed


def _run(fed: _ApiFederation, rounds: int, *, progress: bool) -> FederatedResult:
    """The rounds, stopping (with the reason in the report) before one that would overspend the budget."""
    from fl.training.loop import format_round

    stopped: str | None = None
    for r in range(1, rounds + 1):
        try:
            record = fed.run_round(r)
        except BudgetExhaustedError as exc:
            stopped = f"stopped before round {r}: {exc}"
            log.warning("%s", stopped)
            break
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(format_round(record, rounds))
    with warnings.catch_warnings():  # no test rows: the majority rate of an empty set is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        report = fed.report(baseline=None, stopped=stopped)
    from fl.saved import model_card

    set_flat(fed.model, fed.params)
    trained = copy.deepcopy(fed.model)
    trained.train()
    card = model_card(fed)
    if fed.user_evaluation is not None:  # the user's own metrics of the released model, beside epsilon
        report["final"] = {**fed.evaluate(), **report["final"]}
    elif not fed.has_test_rows:
        report["baseline"]["majority_class_rate"] = math.nan
    return FederatedResult(model=trained, report=report, ledger=fed.ledger, card=card)



# ---- library use: a secure sum or a DP release in one call --------------------------------------------
Protocol = str
PROTOCOLS = ("secagg+", "secagg", "paillier", "plain")


def _stacked(arrays: Sequence[Any]) -> tuple[NDArray[Any], tuple[int, ...]]:
    """The parties' arrays as one (n, d) matrix and their common shape; at least two parties."""
    if isinstance(arrays, np.ndarray | torch.Tensor) or not isinstance(arrays, Sequence):
        raise TypeError("pass a list of arrays, one per party (a single array would be one party)")
    values = [_to_numpy(a, f"array {k}") for k, a in enumerate(arrays)]
    if len(values) < 2:
        raise ValueError(f"a secure sum needs at least two parties, got {len(values)}: the sum of one is its input")
    shapes = {v.shape for v in values}
    if len(shapes) > 1:
        raise ValueError(f"the arrays have different shapes {sorted(shapes)}; every party sends the same shape")
    shape = values[0].shape
    return np.stack([v.reshape(-1) for v in values]), shape


def _secure_sum_object(protocol: Protocol, threshold: float | int | None, n: int) -> Any:
    if protocol == "secagg+":
        return SecAggPlus(threshold=threshold)
    if protocol == "secagg":
        return SecAgg(threshold=0.7 if threshold is None else threshold)
    if protocol == "paillier":
        return PaillierSum(min_clients=2)
    if protocol == "plain":
        return PlainSum()
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def _run_ring_sum(protocol: Protocol, words: NDArray[np.uint64], *, value_bits: int, threshold: float | int | None,
                  session: bytes | None) -> NDArray[np.int64]:
    """One in-memory round of the protocol over ring words (n, d); the signed integer sum."""
    from fl.runners.local import run_secure_sum
    from fl.spec import ValueSpec
    from secagg.ring import MAX_RING_BITS, ring_bits_for, to_signed

    n, d = words.shape
    ring = ring_bits_for(value_bits, n)
    if ring > MAX_RING_BITS:
        raise ValueError(f"{n} parties' {value_bits}-bit values need a {ring}-bit ring, more than {MAX_RING_BITS}: "
                         f"lower bits=")
    words = words & np.uint64((1 << ring) - 1)  # two's complement in Z_2^ring (negative values wrap into it)
    ssum = _secure_sum_object(protocol, threshold, n)
    spec = ssum.bind(ValueSpec(size=d, cohort=n, domain="ring", modulus=1 << ring, value_bits=value_bits))
    outcome = run_secure_sum(ssum, {k: words[k] for k in range(n)}, spec=spec, session=session or os.urandom(16))
    if len(outcome.included) != n:
        raise RuntimeError(f"only {len(outcome.included)} of {n} parties made it into the sum")
    return to_signed(np.asarray(outcome.total, dtype=np.uint64), ring)


def secure_sum(
    arrays: Sequence[Any], *, protocol: Protocol = "secagg+", bits: int | None = None, bound: float | None = None,
    threshold: float | int | None = None, session: bytes | None = None,
) -> NDArray[Any]:
    """The element-wise sum of the parties' arrays, computed by a secure-aggregation protocol in memory.

    ``protocol``: ``"secagg+"`` (Bell et al. 2020), ``"secagg"`` (Bonawitz et al. 2017), ``"paillier"``
    (packed Paillier) or ``"plain"``. Integer arrays sum exactly: ``bits`` is the public width of one
    party's signed values (default 32: every ``|v| < 2^31``). Float arrays need the public ``bound`` on
    every ``|v|`` and are stochastically rounded to ``bits`` (default 20) bits; the result is within
    ``n * bound / (2^(bits-1) - 1)`` per coordinate. A value outside the declared range is refused.
    """
    matrix, shape = _stacked(arrays)
    integer = matrix.dtype.kind in "iub"
    if integer:
        width = 32 if bits is None else bits
        top = (1 << (width - 1)) - 1
        if matrix.size and int(np.abs(matrix.astype(np.int64)).max()) > top:
            raise ValueError(f"a value exceeds the declared {width}-bit range (|v| <= {top}); raise bits=")
        words = matrix.astype(np.int64).view(np.uint64)
        return _run_ring_sum(protocol, words, value_bits=width, threshold=threshold, session=session).reshape(shape)
    if matrix.dtype.kind != "f":
        raise TypeError(f"secure_sum adds numbers, got arrays of {matrix.dtype}")
    if bound is None:
        raise ValueError("float arrays need bound= (a public bound on every |value|) to be quantized for the ring; "
                         "integer arrays sum exactly without it")
    from dp.rng import SecureRandom
    from secagg.ring import Quantizer

    width = 20 if bits is None else bits
    q = Quantizer(bound=bound, value_bits=width, cohort=len(matrix))
    words = np.stack([q.encode(row, SecureRandom().uniform) for row in matrix])
    total = _run_ring_sum(protocol, words, value_bits=width, threshold=threshold, session=session)
    return (total.astype(np.float64) / q.scale).reshape(shape)


@dataclass(frozen=True)
class DpRelease:
    """A differentially private sum: the noisy total and its (epsilon, delta) guarantee, client level."""

    value: NDArray[np.float64]
    epsilon: float
    delta: float
    noise_multiplier: float
    guarantees: tuple[Any, ...]


def private_sum(
    updates: Sequence[Any], *, clip: float, delta: float, noise_multiplier: float | None = None,
    epsilon: float | None = None, protocol: Protocol = "plain",
) -> DpRelease:
    """Clip each party's update to L2 norm ``clip``, sum them and add Gaussian noise: the DP-FedAvg layer.

    Give ``noise_multiplier`` (z: noise std ``z * clip``) or ``epsilon`` (z is calibrated for one
    release); the returned ``epsilon`` is what this one release costs each party (add/remove-one,
    PLD accountant). ``protocol`` sums the clipped updates (``"secagg+"``: the server sees only the sum).
    """
    from dp.accounting import Accountant, calibrate_noise
    from dp.rng import SecureRandom
    from fl.pipeline import Pipeline
    from fl.runners.local import run_secure_sum
    from fl.spec import RoundInfo, ValueSpec

    if (noise_multiplier is None) == (epsilon is None):
        raise ValueError("give exactly one of noise_multiplier= (the noise) or epsilon= (to calibrate it)")
    matrix, shape = _stacked(updates)
    n, d = matrix.shape
    z = noise_multiplier if noise_multiplier is not None else calibrate_noise(
        epsilon=float(epsilon), delta=delta, sample_rate=1.0, steps=1)  # type: ignore[arg-type]
    layers: list[Any] = [Clip(l2=clip), GaussianNoise(multiplier=z)]
    if protocol != "plain":
        layers.append(Quantize(bits=20))
    bound = Pipeline(layers, sum=_secure_sum_object(protocol, None, n)).bind(ValueSpec(size=d, cohort=n))
    rng = SecureRandom()
    values = {k: bound.encode(matrix[k].astype(np.float64), rng) for k in range(n)}
    outcome = run_secure_sum(bound.pipeline.sum, values, spec=bound.sum_spec, session=os.urandom(16))
    info = RoundInfo(round=1, planned=tuple(range(n)), included=tuple(outcome.included), population=n,
                     sample_rate=1.0)
    total = bound.decode(outcome.total, info, rng)
    noise = next(layer for layer in layers if isinstance(layer, GaussianNoise))
    eps = 0.0
    for step in noise.steps(bound.specs[1], info, sum_hides_updates=protocol != "plain").values():
        acc = Accountant()
        acc.compose(step, 1)
        eps = max(eps, acc.epsilon(delta))
    return DpRelease(value=total.reshape(shape), epsilon=eps, delta=delta, noise_multiplier=z,
                     guarantees=bound.guarantees(info))
