"""Turn a privacy spec (``--privacy clip,noise,secagg+``) into a pipeline, a client trainer and accounting.

This is the one place that knows every token; each token maps to a layer or sum class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fl.config import TrainConfig
from fl.layers import Clip, Quantize
from fl.pipeline import Pipeline
from fl.spec import ClientTrainer, CompositionError, Layer, PrivacyAccounting, SecureSum
from fl.sums import PlainSum

__all__ = ["KNOWN_TOKENS", "PrivacyPlan", "build_plan"]

KNOWN_TOKENS = ("none", "clip", "quantize", "secagg", "secagg+", "paillier")


@dataclass(frozen=True)
class PrivacyPlan:
    """What the training loop needs from a privacy spec."""

    pipeline: Pipeline
    trainer: ClientTrainer | None = None  # None: the loop's plain trainer
    accounting: PrivacyAccounting | None = None
    weighting: Literal["samples", "uniform"] | None = None  # forced by the layers (DP needs uniform)
    notes: tuple[str, ...] = field(default_factory=tuple)


def _secure_sum(token: str, config: TrainConfig) -> SecureSum:
    threshold = config.privacy.threshold
    if token == "secagg":
        from fl.sums_secagg import SecAgg

        return SecAgg(threshold=threshold)
    if token == "secagg+":
        from fl.sums_secagg import SecAggPlus

        return SecAggPlus(threshold=threshold)
    from fl.sums_paillier import PaillierSum

    return PaillierSum()


def build_plan(
    config: TrainConfig, *, size: int, population: int, client_sizes: Mapping[int, int]
) -> PrivacyPlan:
    """Build the plan for ``config.privacy``; raises ``CompositionError`` for an unknown or bad spec."""
    tokens = config.privacy.tokens()
    unknown = [t for t in tokens if t not in KNOWN_TOKENS]
    if unknown:
        raise CompositionError(
            f"unknown privacy stage(s) {unknown}; choose from {', '.join(KNOWN_TOKENS)} (comma-separated)"
        )
    layers: list[Layer] = []
    ssum: SecureSum = PlainSum()
    sums = [t for t in tokens if t in ("secagg", "secagg+", "paillier")]
    if len(sums) > 1:
        raise CompositionError(f"pick one secure sum, got {sums}")
    for t in tokens:
        if t == "clip":
            layers.append(Clip(l2=config.privacy.clip))
        elif t == "quantize":
            layers.append(Quantize(bits=config.privacy.quant_bits))
    if sums:
        if tokens[-1] != sums[0]:
            raise CompositionError(f"the secure sum {sums[0]!r} must be the last stage of --privacy")
        if not any(isinstance(layer, Quantize) for layer in layers):
            if not any(isinstance(layer, Clip) for layer in layers):
                layers.append(Clip(l2=config.privacy.clip))
            layers.append(Quantize(bits=config.privacy.quant_bits))
        ssum = _secure_sum(sums[0], config)
    return PrivacyPlan(Pipeline(layers, sum=ssum))
