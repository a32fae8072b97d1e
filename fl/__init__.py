"""fl: federated training that composes privacy layers (``dp``) and secure sums (``secagg``).

The curated public API (static imports; importing ``fl`` never imports Flower, which is optional):

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
"""

from typing import Any

from fl import api
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
from fl.training import loop
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


def train(config: TrainConfig | None = None, /, **kwargs: Any) -> Any:
    """``train(model=..., sites=..., ...)``: :func:`fl.api.train` (your module and sites, a
    :class:`FederatedResult`); ``train(config, ...)``: :func:`fl.training.loop.train` (a report dict)."""
    if config is not None:
        return loop.train(config, **kwargs)
    return api.train(**kwargs)
