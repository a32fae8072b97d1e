"""The trained model out and back in, for every model: the CLI's families and any user ``nn.Module``.

A saved model is a directory:

- ``model.json``: the format version, the architecture, the feature order, the preprocessing the
  federation released (numeric means and standard deviations, category vocabularies; ``null`` when the
  sites were in-memory arrays used as given), the class labels and the run's privacy summary (pipeline,
  epsilon, delta and every guarantee the ledger recorded).
- ``weights.pt``: the ``state_dict``, tensors only, read back with ``torch.load(weights_only=True)``.
- ``program.pt2`` (a user's own module only): ``torch.export.export`` of the trained module with a
  dynamic batch dimension, saved by ``torch.export.save``. It runs without the user's class code.

**Loading never runs code from the directory.** ``torch.export.load`` is *not* safe on its own (its
documentation says "uses pickle under the hood ... never load data from an untrusted source"): in torch
2.13 it retries a failing ``weights_only=True`` load of the sample inputs with ``weights_only=False``,
reads pickled tensor subclasses and opaque constants with ``pickle``, evaluates symbolic shape
expressions with ``sympy.sympify`` (``eval``), turns ``guards_code`` into Python functions, and resolves
graph targets by ``getattr`` on ``torch``, which would let a graph call e.g. ``torch.load``. So
:func:`check_program` reads the archive first and refuses anything beyond a plain exported graph: only
the expected entries, no pickled payloads (the sample inputs must load with ``weights_only=True``), no
guard code, no custom objects, only ``torch.ops.aten`` operators (and ``operator.getitem``), and shape
expressions made only of symbols, integers and arithmetic. Then ``torch.export.load`` runs with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, so no ``torch.load`` inside it can fall back to full unpickling.

If ``torch.export`` cannot take a module (data-dependent control flow, unsupported ops), the weights and
the JSON are still written and :func:`load_model` asks for the class: ``load_model(DIR,
module=YourClass(...))``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fl.data.stats import DataError, FederatedStats, Schema
from fl.spec import Guarantee

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fl.training.loop import Federation

__all__ = ["FORMAT", "PROGRAM", "SavedModel", "check_program", "load_model", "model_card", "save_model", "write_model"]

log = logging.getLogger(__name__)

FORMAT = "privagg-model"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: logreg/mlp only, no program, no guarantee list
WEIGHTS = "weights.pt"
META = "model.json"
PROGRAM = "program.pt2"
BUILT_IN = ("logreg", "mlp", "mlp-ln", "cnn")  # rebuilt from the JSON by fl.training.models.build_model


# ---- what is saved ------------------------------------------------------------------------------------
def _ignored_columns(fed: Federation) -> list[str]:
    """Raw columns the run never used as features (declared ids, the partition column): allowed in new data."""
    cols = list(fed.config.drop_columns)
    if fed.config.partition.startswith("by-column:"):
        cols.append(fed.config.partition.split(":", 1)[1])
    return cols


def _preprocessing(fed: Federation) -> dict[str, Any] | None:
    stats = fed.data.stats
    if stats is None:
        return None
    return {
        "target": stats.schema.target, "numeric": list(stats.schema.numeric),
        "categorical": list(stats.schema.categorical), "mean": [float(v) for v in stats.mean],
        "std": [float(v) for v in stats.std], "vocabulary": {c: list(v) for c, v in stats.vocabulary.items()},
        "rows": int(stats.rows), "ignored_columns": _ignored_columns(fed),
    }


def model_card(fed: Federation) -> dict[str, Any]:
    """Everything but the weights and the privacy summary: architecture, features, classes, preprocessing."""
    data = fed.data
    kind = fed.config.model
    row = data.x_train[:1]
    arch: dict[str, Any] = {"kind": kind, "num_features": data.num_features, "num_classes": data.num_classes,
                            "input_shape": [int(s) for s in row.shape[1:]], "input_dtype": str(row.dtype)}
    if kind in BUILT_IN:
        arch["hidden"] = fed.config.hidden
    else:  # a user's module: its class is recorded for people, never imported
        arch["kind"] = "custom"
        arch["class"] = f"{type(fed.model).__module__}.{type(fed.model).__qualname__}"
    return {"architecture": arch, "features": list(data.feature_names), "classes": list(data.classes),
            "preprocessing": _preprocessing(fed)}


def privacy_summary(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's pipeline, epsilon, delta and guarantee list, as the report states them."""
    report = report or {}
    final = dict(report.get("final", {}))
    guarantees = [{k: g.get(k) for k in ("layer", "property", "against")} for g in report.get("guarantees", [])
                  if isinstance(g, Mapping)]
    return {"pipeline": report.get("pipeline"), "epsilon": final.get("epsilon"), "delta": final.get("delta"),
            "guarantees": guarantees}


def save_model(fed: Federation, directory: Path, *, report: Mapping[str, Any] | None = None,
               example_input: Any = None) -> Path:
    """Write ``fed``'s current global model, its preprocessing and its privacy summary to ``directory``."""
    from fl.training.models import set_flat

    set_flat(fed.model, fed.params)
    return write_model(fed.model, model_card(fed), directory, privacy=privacy_summary(report),
                       example_input=example_input)


def _example(card: Mapping[str, Any], example_input: Any) -> torch.Tensor:
    """The input ``torch.export`` traces with: the caller's rows, else two zero rows of the saved shape."""
    import torch

    arch = card["architecture"]
    dtype = getattr(torch, str(arch["input_dtype"]))
    if example_input is not None:  # in the sites' dtype (a float64 array would trace a float64 program)
        x = torch.as_tensor(np.asarray(example_input)).to(dtype)
        return x if x.shape[0] >= 2 else torch.cat([x, x])
    return torch.zeros((2, *arch["input_shape"]), dtype=dtype)


def write_model(model: nn.Module, card: Mapping[str, Any], directory: Path, *, privacy: Mapping[str, Any],
                example_input: Any = None) -> Path:
    """Write ``model``'s weights, the JSON and (for a user's module) the exported program to ``directory``."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    arch = dict(card["architecture"])
    if arch["kind"] == "custom":
        (directory / PROGRAM).unlink(missing_ok=True)
        reason = _export(model, _example(card, example_input), directory / PROGRAM)
        arch["program"] = PROGRAM if reason is None else None
        if reason is not None:
            arch["program_note"] = f"torch.export could not take this module: {reason}"
            log.warning("saved weights and JSON only (%s); load with load_model(%r, module=YourClass(...))",
                        arch["program_note"], str(directory))
    meta = {"format": FORMAT, "version": VERSION, **card, "architecture": arch, "privacy": dict(privacy)}
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Export ``model`` with a dynamic batch dimension and save it; the reason it failed, else None."""
    import torch
    from torch.export import Dim

    probe = copy.deepcopy(model).eval()
    try:
        program = torch.export.export(probe, (example,), dynamic_shapes=({0: Dim("batch", min=1)},), strict=False)
        with torch.no_grad():
            same = torch.allclose(program.module()(example), probe(example), atol=1e-6, rtol=1e-5)
        if not same:
            return "the exported program's output differs from the module's"
        torch.export.save(program, str(path))
        check_program(path)  # what we write must pass our own loader's checks
    except Exception as exc:
        path.unlink(missing_ok=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:200]}"
    return None


# ---- the exported program, checked before torch.export.load sees it ------------------------------------
_ENTRIES = re.compile(
    r"data/weights/weight_\d+|data/weights/model_weights_config\.json|data/constants/model_constants_config\.json"
    r"|data/constants/tensor_\d+|models/model\.json|data/sample_inputs/model\.pt|archive_format|archive_version"
    r"|\.data/version|\.data/serialization_id|byteorder"
)
# what a shape expression may contain: symbols like Symbol('s77', positive=True, integer=True), integers and
# arithmetic (no powers); no dots, no other quoted text, no other names, so sympify's eval builds only that
_EXPR = re.compile(
    r"(?:\s+|\d+|'[a-z]\d+'|[a-z]\d+|[-+*/(),=<>]|Symbol|Integer|Mul|Add|Mod|FloorDiv|CeilDiv|CleanDiv|PythonMod"
    r"|FloorToInt|CeilToInt|Max|Min|positive|integer|nonnegative|real|finite|True|False|oo|int_oo)*"
)
_OPERATORS = ("torch.ops.aten.", "_operator.getitem")
_DENIED_OPS = ("from_file", "_load", "save")  # aten ops that touch files
_FIX = "save the model again with FederatedResult.save / privagg train --save-model"


def _refuse(path: Path, why: str) -> DataError:
    return DataError(f"{path} is refused: {why}. It is not a plain exported graph that privagg wrote; {_FIX}")


def _archive_entries(path: Path, archive: zipfile.ZipFile) -> str:
    """The archive's one top-level folder; every entry inside it must be one that torch.export.save writes."""
    names = [i.filename for i in archive.infolist() if not i.filename.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        raise _refuse(path, f"entries under {len(roots)} top-level folders")
    root = roots.pop()
    odd = [n for n in names if "/" not in n or not _ENTRIES.fullmatch(n.split("/", 1)[1])]
    if odd:
        raise _refuse(path, f"unexpected entries {odd[:5]} (custom objects, compiled code or extra files)")
    return root


def _check_payloads(path: Path, archive: zipfile.ZipFile, root: str) -> None:
    """Weights and constants as raw tensor bytes only (no pickled subclasses or objects); inputs as tensors."""
    import torch

    for name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        try:
            config = json.loads(archive.read(f"{root}/{name}")).get("config", {})
        except (KeyError, ValueError, AttributeError) as exc:
            raise _refuse(path, f"{name} is missing or not JSON ({exc})") from exc
        for fqn, meta in config.items():
            if not isinstance(meta, Mapping) or meta.get("use_pickle") is not False:
                raise _refuse(path, f"{name}: {fqn!r} is stored as a pickle")
            if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
                raise _refuse(path, f"{name}: {fqn!r} is a custom or opaque object")
    try:  # the sample inputs are a torch.save pickle; tensors only, as for weights.pt
        torch.load(io.BytesIO(archive.read(f"{root}/data/sample_inputs/model.pt")), weights_only=True)
    except Exception as exc:
        raise _refuse(path, f"its sample inputs are not plain tensors ({type(exc).__name__})") from exc


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON tree, depth first."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield str(k), v
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _check_graph(path: Path, program: Mapping[str, Any]) -> None:
    """Only aten operators, no guard code, no custom objects, no subgraphs, shape expressions of symbols only."""
    if program.get("guards_code"):
        raise _refuse(path, "it carries guard code (Python source that torch would compile)")
    exprs = [str(k) for k in (program.get("range_constraints") or {})]
    for key, value in _walk(program.get("graph_module", {})):
        if key == "target":
            target = str(value)
            if not target.startswith(_OPERATORS) or any(d in target for d in _DENIED_OPS):
                raise _refuse(path, f"its graph calls {target!r}, not a torch.ops.aten operator")
        elif key in ("as_custom_obj", "as_graph", "custom_obj_values") and value:
            raise _refuse(path, f"its graph holds {key} (custom objects or subgraphs)")
        elif key == "expr_str":
            exprs.append(str(value))
    bad = [e for e in exprs if not _EXPR.fullmatch(e) or "**" in e or len(e) > 200]  # no power towers
    if bad:
        raise _refuse(path, f"shape expression {bad[0][:80]!r} is not made of symbols and integers")


def check_program(path: Path) -> None:
    """Refuse ``path`` unless it is a plain exported graph (see the module doc for what that excludes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            root = _archive_entries(path, archive)
            _check_payloads(path, archive, root)
            program = json.loads(archive.read(f"{root}/models/model.json"))
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not a readable exported program ({type(exc).__name__}: {exc}); {_FIX}") from exc
    if not isinstance(program, Mapping):
        raise _refuse(path, "models/model.json is not an object")
    _check_graph(path, program)


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside the block is ``weights_only=True``, whatever its call site asks."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def load_program(path: Path) -> nn.Module:
    """The exported program at ``path`` as a module, after :func:`check_program`; no user code needed."""
    import torch

    check_program(path)
    try:
        with _weights_only():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise DataError(f"{path} could not be loaded by torch.export ({type(exc).__name__}: {exc}); {_FIX}") from exc
    module: nn.Module = program.module()
    return module


# ---- reading a saved model back -----------------------------------------------------------------------
class SavedModel:
    """A model read back by :func:`load_model`: call it on rows (a tensor or array) for class scores.

    ``model``: the module (rebuilt, the exported program's module, or the one you passed); ``stats``:
    the training run's preprocessing (``None`` for in-memory sites); ``classes``: the class labels;
    ``meta``: the whole ``model.json``.
    """

    def __init__(self, model: nn.Module, stats: FederatedStats | None, meta: Mapping[str, Any]) -> None:
        self.model = model
        self.stats = stats
        self.meta = meta
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        pre = meta.get("preprocessing") or {}
        self.ignored: tuple[str, ...] = tuple(pre.get("ignored_columns", ()))
        self.features: tuple[str, ...] = tuple(meta.get("features", ()))

    def __call__(self, x: Any) -> torch.Tensor:
        """The model's class scores (logits) for rows ``x`` already preprocessed, batch first."""
        import torch

        arch = self.meta["architecture"]
        dtype = getattr(torch, str(arch.get("input_dtype", "float32")))
        with torch.no_grad():
            out: torch.Tensor = self.model(torch.as_tensor(np.asarray(x), dtype=dtype))
        return out

    def predict_proba(self, x: Any) -> NDArray[np.float32]:
        """Class probabilities (softmax of the scores), one row per input row."""
        import torch

        prob: NDArray[np.float32] = torch.softmax(self(x), dim=1).numpy()
        return prob

    def predict(self, x: Any) -> list[str]:
        """The class label of each row."""
        return [self.classes[i] for i in self.predict_proba(x).argmax(axis=1)]

    @property
    def guarantees(self) -> list[dict[str, Any]]:
        """What the training run's privacy layers guaranteed (from the saved report summary)."""
        return list((self.meta.get("privacy") or {}).get("guarantees", []))


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    if not path.is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"no saved model in {directory} (expected {META} and {WEIGHTS}); write one with "
                                f"privagg train ... --save-model {directory} or FederatedResult.save({directory})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {_FIX}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{path} is not a privagg model (format {FORMAT!r} version {VERSION}); {_FIX}")
    if not isinstance(meta.get("architecture"), dict) or not isinstance(meta.get("classes"), list):
        raise DataError(f"{path} lacks the architecture or the class labels; {_FIX}")
    return meta


def _stats(meta: Mapping[str, Any]) -> FederatedStats | None:
    pre = meta.get("preprocessing")
    if pre is None:
        return None
    schema = Schema(target=str(pre["target"]), numeric=tuple(pre["numeric"]), categorical=tuple(pre["categorical"]))
    return FederatedStats(
        schema=schema, mean=np.asarray(pre["mean"], dtype=np.float64), std=np.asarray(pre["std"], dtype=np.float64),
        vocabulary={c: tuple(v) for c, v in pre["vocabulary"].items()}, rows=int(pre["rows"]),
        guarantee=Guarantee(layer="saved preprocessing", property="statistics released by the training run",
                            against="see the training run's ledger"),
    )


def _state_dict(directory: Path) -> dict[str, Any]:
    import torch

    try:  # tensors only: a file holding any other object is refused, never run
        state = torch.load(directory / WEIGHTS, weights_only=True)
    except Exception as exc:
        raise DataError(f"{directory / WEIGHTS} is not a plain tensor file ({type(exc).__name__}); {_FIX}") from exc
    if not isinstance(state, dict):
        raise DataError(f"{directory / WEIGHTS} holds a {type(state).__name__}, not a state_dict; {_FIX}")
    return state


def _fill(module: nn.Module, directory: Path, what: str) -> nn.Module:
    """Load the saved weights into ``module`` (strictly: every name and shape must match)."""
    try:
        module.load_state_dict(_state_dict(directory))
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DataError(f"{directory / WEIGHTS} does not fit {what} ({str(exc).splitlines()[0]}); pass the module "
                        f"the model was trained as, or {_FIX}") from exc
    return module.eval()


def _module(directory: Path, meta: Mapping[str, Any], module: nn.Module | None) -> nn.Module:
    from torch import nn as torch_nn

    from fl.training.models import build_model

    arch = meta["architecture"]
    if module is not None:
        if not isinstance(module, torch_nn.Module):
            raise TypeError(f"module= must be an nn.Module instance (e.g. module=YourClass(...)), got {module!r}")
        return _fill(module, directory, f"the {type(module).__name__} you passed")
    kind = str(arch.get("kind"))
    if kind in BUILT_IN:
        built = build_model(kind, int(arch["num_features"]), int(arch["num_classes"]), hidden=int(arch["hidden"]))
        return _fill(built, directory, f"the architecture in {META}")
    if kind != "custom":
        raise DataError(f"{directory / META}: unknown architecture {kind!r}; {_FIX}")
    if arch.get("program") != PROGRAM or not (directory / PROGRAM).is_file():
        note = arch.get("program_note") or f"{directory / PROGRAM} is missing"
        raise DataError(f"{directory} holds the weights of a {arch.get('class', 'custom')} but no program it can run "
                        f"without that class ({note}); load with load_model(DIR, module=YourClass(...))")
    return load_program(directory / PROGRAM)


def load_model(directory: Path | str, *, module: nn.Module | None = None) -> SavedModel:
    """Read a saved model: the CLI's families are rebuilt from the JSON, a user's module runs from its
    exported program (no class code needed), or ``module=YourClass(...)`` receives the saved weights.

    The weights are read as tensors only (``weights_only=True``) and the program is checked before
    ``torch.export.load`` (:func:`check_program`): nothing in the directory can run code on load.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    return SavedModel(_module(directory, meta, module), _stats(meta), meta)


def rows_of(saved: SavedModel, x: NDArray[Any]) -> NDArray[Any]:
    """Flat feature columns back to the model's row shape and dtype (e.g. 64 pixels -> 1 x 8 x 8)."""
    arch = saved.meta["architecture"]
    shape: Sequence[int] = arch.get("input_shape") or [x.shape[1]]
    dtype = np.dtype(str(arch.get("input_dtype", "float32")))
    return np.ascontiguousarray(x.reshape((x.shape[0], *shape)).astype(dtype))

