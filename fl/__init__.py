"""fl: federated training that composes privacy layers (``dp``) and secure sums (``secagg``).

The curated public API (importing ``fl`` never imports Flower, which is optional):

- run: :func:`train` -- ``train(model=..., sites=[...], privacy=[...])`` federates your own module over
  your sites and returns a :class:`FederatedResult` (model, report, ledger; ``.save(DIR)``);
  :func:`load_model` reads a saved model back (no class code needed); ``train(config)`` runs a
  :class:`TrainConfig` (the CLI's path) and returns the JSON-ready report. :class:`Federation` is the
  in-memory composition of the halves :class:`ClientSide` (one site) and :class:`ServerSide`.
- library use: :func:`secure_sum` (SecAgg+, SecAgg or packed Paillier over a list of arrays),
  :func:`private_sum` (clip + Gaussian noise with its epsilon).
- compose: :class:`Pipeline` of layers (:class:`Clip`, :class:`Quantize`, :class:`GaussianNoise`) ending
  in one secure sum (:class:`PlainSum`, :class:`SecAgg`, :class:`SecAggPlus`, :class:`PaillierSum`);
  the contracts :class:`Layer`, :class:`SecureSum`, :class:`ValueSpec`, :class:`RoundInfo`,
  :class:`Guarantee`; the CLI words in :data:`STAGES` (:func:`build_plan`).
- errors: every error ``fl`` raises on purpose (:mod:`fl.errors`).

The names are resolved lazily (PEP 562), each on first access from its home module in :data:`_HOMES`,
by a static import: ``import fl`` (and so every ``fl.*`` submodule, e.g. the Flower ClientApp that a
stock SuperNode imports in a fresh interpreter per message) loads no torch, pandas or scikit-learn until
a name that needs them is used. The ``TYPE_CHECKING`` imports below are the same table, for mypy and IDEs.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl.api import DPSGD, DpRelease, FederatedResult, private_sum, secure_sum
    from fl.config import PrivacyConfig, TrainConfig
    from fl.errors import (
        BudgetExhaustedError,
        CheckpointError,
        CompositionError,
        DataError,
        NonFiniteUpdateError,
        TrainingInterrupted,
    )
    from fl.layers.clip import Clip, Quantize
    from fl.layers.noise import GaussianNoise
    from fl.pipeline import BoundPipeline, Pipeline
    from fl.privacy.ledger import Ledger
    from fl.privacy.plan import STAGES, PrivacyPlan, Stage, build_plan
    from fl.saved import load_model
    from fl.spec import Guarantee, Layer, RoundInfo, SecureSum, TrainResult, ValueSpec
    from fl.sums.paillier import PaillierSum
    from fl.sums.plain import PlainSum
    from fl.sums.secagg import SecAgg, SecAggPlus
    from fl.training.client import ClientSide
    from fl.training.dp_sgd import DpSgdTrainer
    from fl.training.loop import Federation
    from fl.training.server import ServerSide
    from fl.training.trainers import PlainTrainer

__all__ = [
    "DPSGD",
    "STAGES",
    "BoundPipeline",
    "BudgetExhaustedError",
    "CheckpointError",
    "ClientSide",
    "Clip",
    "CompositionError",
    "DataError",
    "DpRelease",
    "DpSgdTrainer",
    "FederatedResult",
    "Federation",
    "GaussianNoise",
    "Guarantee",
    "Layer",
    "Ledger",
    "NonFiniteUpdateError",
    "PaillierSum",
    "Pipeline",
    "PlainSum",
    "PlainTrainer",
    "PrivacyConfig",
    "PrivacyPlan",
    "Quantize",
    "RoundInfo",
    "SecAgg",
    "SecAggPlus",
    "SecureSum",
    "ServerSide",
    "Stage",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "ValueSpec",
    "build_plan",
    "load_model",
    "private_sum",
    "secure_sum",
    "train",
]

#: Each lazily exported name's home module (the ``TYPE_CHECKING`` imports above, as data).
_HOMES: dict[str, tuple[str, ...]] = {
    "fl.api": ("DPSGD", "DpRelease", "FederatedResult", "private_sum", "secure_sum"),
    "fl.config": ("PrivacyConfig", "TrainConfig"),
    "fl.errors": ("BudgetExhaustedError", "CheckpointError", "CompositionError", "DataError",
                  "NonFiniteUpdateError", "TrainingInterrupted"),
    "fl.layers.clip": ("Clip", "Quantize"),
    "fl.layers.noise": ("GaussianNoise",),
    "fl.pipeline": ("BoundPipeline", "Pipeline"),
    "fl.privacy.ledger": ("Ledger",),
    "fl.privacy.plan": ("STAGES", "PrivacyPlan", "Stage", "build_plan"),
    "fl.saved": ("load_model",),
    "fl.spec": ("Guarantee", "Layer", "RoundInfo", "SecureSum", "TrainResult", "ValueSpec"),
    "fl.sums.paillier": ("PaillierSum",),
    "fl.sums.plain": ("PlainSum",),
    "fl.sums.secagg": ("SecAgg", "SecAggPlus"),
    "fl.training.client": ("ClientSide",),
    "fl.training.dp_sgd": ("DpSgdTrainer",),
    "fl.training.loop": ("Federation",),
    "fl.training.server": ("ServerSide",),
    "fl.training.trainers": ("PlainTrainer",),
}
_LAZY: dict[str, str] = {name: home for home, names in _HOMES.items() for name in names}


def _home_module(home: str) -> ModuleType:
    """``home`` (a key of :data:`_HOMES`, never a caller's string) imported by a static statement."""
    module: ModuleType
    if home == "fl.api":
        from fl import api as module
    elif home == "fl.config":
        from fl import config as module
    elif home == "fl.errors":
        from fl import errors as module
    elif home == "fl.layers.clip":
        from fl.layers import clip as module
    elif home == "fl.layers.noise":
        from fl.layers import noise as module
    elif home == "fl.pipeline":
        from fl import pipeline as module
    elif home == "fl.privacy.ledger":
        from fl.privacy import ledger as module
    elif home == "fl.privacy.plan":
        from fl.privacy import plan as module
    elif home == "fl.saved":
        from fl import saved as module
    elif home == "fl.spec":
        from fl import spec as module
    elif home == "fl.sums.paillier":
        from fl.sums import paillier as module
    elif home == "fl.sums.plain":
        from fl.sums import plain as module
    elif home == "fl.sums.secagg":
        from fl.sums import secagg as module
    elif home == "fl.training.client":
        from fl.training import client as module
    elif home == "fl.training.dp_sgd":
        from fl.training import dp_sgd as module
    elif home == "fl.training.loop":
        from fl.training import loop as module
    elif home == "fl.training.server":
        from fl.training import server as module
    elif home == "fl.training.trainers":
        from fl.training import trainers as module
    else:  # pragma: no cover - _HOMES and this chain are checked equal by tests/test_exports.py
        raise AssertionError(f"fl: no static import for home module {home!r}")
    return module


def _lazy_attribute(name: str) -> Any:
    """PEP 562 ``__getattr__``: an ``__all__`` name from its home module, cached in the module dict."""
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'fl' has no attribute {name!r}")
    value = getattr(_home_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """``dir(fl)``: the module's own names and every exported one, loaded or not."""
    return sorted(set(globals()) | set(__all__))


if not TYPE_CHECKING:  # mypy reads the real imports above; a visible __getattr__ would make any typo Any
    __getattr__ = _lazy_attribute


def train(config: TrainConfig | None = None, /, **kwargs: Any) -> Any:
    """``train(model=..., sites=..., ...)``: :func:`fl.api.train` (your module and sites, a
    :class:`FederatedResult`); ``train(config, ...)``: :func:`fl.training.loop.train` (a report dict)."""
    if config is not None:
        from fl.training import loop

        return loop.train(config, **kwargs)
    from fl import api

    return api.train(**kwargs)
