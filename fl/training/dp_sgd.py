"""Example-level DP-SGD as a federated client trainer (``--privacy dp-sgd``).

Each client runs :func:`dp.sgd.dp_sgd` on its own data: ``epochs`` passes' worth of Poisson-sampled
steps (``epochs * ceil(n / batch_size)`` steps at rate ``batch_size / n``), per-example clipping, and
CSPRNG Gaussian noise. It reports what it did in ``TrainResult.extra["dp_sgd"]`` (steps, sample rate,
noise multiplier), which :class:`fl.privacy.accounting.DpSgdAccounting` charges to that client's accountant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dp.rng import SecureRandom
from dp.sgd import PerSampleMode, dp_sgd, steps_per_epoch
from fl.spec import TrainResult

__all__ = ["DpSgdTrainer", "default_batch_and_clip"]


def _per_example_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


FIXED_BATCH, FIXED_CLIP = 32, 1.0  # without --epsilon (a given noise multiplier) nothing to choose from


def default_batch_and_clip(epsilon: float | None, smallest_client: int | None = None) -> tuple[int, float]:
    """DP-SGD's expected batch size and per-example clip norm when the user sets neither: from epsilon.

    The rule (after Ponomareva et al. 2023, "How to DP-fy ML", sec. 5.4, and De et al. 2022): larger
    batches at smaller epsilon -- ``B = 8 * round(8 / sqrt(epsilon))`` (64 at epsilon 1, 32 at 4, 24 at 8),
    at most ``smallest_client`` rows (the run's fewest, public n_k: every client side picks the same
    batch) -- because the noise on the averaged gradient,
    ``z * C / B``, falls with the batch while the calibrated ``z`` grows only about as ``sqrt(B)``; and a
    clip norm that grows with epsilon -- ``C = sqrt(epsilon) / 2`` within ``[0.5, 2]`` (1 at epsilon 4) --
    small enough that most per-example gradients of a model on standardized features clip (a linear
    model's start at about ``0.7 * sqrt(features + 1)``): once they all clip, C scales the step and the
    noise alike, and a smaller C trades progress for less noise, which pays off when epsilon is small.
    ``epsilon`` is the training budget; ``None`` (a noise multiplier was given) keeps 32 and 1.0.
    """
    if epsilon is None:
        return min(FIXED_BATCH, max(1, smallest_client or FIXED_BATCH)), FIXED_CLIP
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"--epsilon must be positive and finite to choose the DP-SGD batch and clip, got {epsilon}")
    batch = max(8, 8 * round(8 / math.sqrt(epsilon)))
    return max(1, min(batch, smallest_client or batch)), min(2.0, max(0.5, math.sqrt(epsilon) / 2))


@dataclass(frozen=True, kw_only=True)
class DpSgdTrainer:
    """DP-SGD on one client; ``noise_multiplier`` may be one value or per client (``cid -> z``).

    ``mode``: per-sample-gradient mode (``auto`` picks direct for models of Linear, Conv2d, LayerNorm,
    GroupNorm and Embedding layers, else Opacus ghost clipping). ``seeded_noise_for_testing`` is the named
    test seam: noise and batch sampling then come from ``SecureRandom.for_testing`` keyed by the loop's
    per-client seed, so runs repeat exactly.
    Never set it in production (whoever knows the seed can remove the noise).
    ``class_weight``: one public weight per class (:mod:`fl.training.class_weights`), scaling each
    example's loss before its gradient is clipped (:class:`dp.sgd.ClassWeightedLoss`): the clip norm still
    bounds every example's contribution, so the accounting is unchanged.
    """

    noise_multiplier: float | Mapping[int, float]
    max_grad_norm: float
    batch_size: int
    epochs: int = 1
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    mode: PerSampleMode = "auto"
    seeded_noise_for_testing: bool = False
    # the Python API's factories: ``params -> Optimizer`` and a loss returning one value per example
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    class_weight: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"DP-SGD batch size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"DP-SGD needs at least one local epoch, got {self.epochs}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"DP-SGD clip norm must be positive, got {self.max_grad_norm}")

    def noise_for(self, cid: int) -> float:
        if isinstance(self.noise_multiplier, Mapping):
            if cid not in self.noise_multiplier:
                raise ValueError(f"no DP-SGD noise multiplier for client {cid}")
            return float(self.noise_multiplier[cid])
        return float(self.noise_multiplier)

    def sample_rate(self, n: int) -> float:
        return min(1.0, self.batch_size / n)

    def steps_per_round(self, n: int) -> int:
        """DP-SGD steps one client takes per round: ``epochs * ceil(n / batch_size)``."""
        return self.epochs * steps_per_epoch(n, self.batch_size)

    def train(self, model: Any, features: Any, labels: Any, *, cid: int, round: int, seed: int) -> TrainResult:
        if not isinstance(model, nn.Module):
            raise TypeError("DpSgdTrainer trains a torch.nn.Module")
        n = int(labels.shape[0])
        if n == 0:
            raise ValueError(f"client {cid} has no training samples")
        rng = SecureRandom.for_testing(f"dp-sgd:{seed}") if self.seeded_noise_for_testing else SecureRandom()
        opt: torch.optim.Optimizer
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(model.parameters())
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        elif self.optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        extra: dict[str, Any] = {"loss_fn": self.loss} if self.loss is not None else {}
        if self.class_weight is not None:
            extra["class_weight"] = self.class_weight
        stats = dp_sgd(
            model,
            features,
            labels,
            noise_multiplier=self.noise_for(cid),
            max_grad_norm=self.max_grad_norm,
            batch_size=self.batch_size,
            steps=self.steps_per_round(n),
            optimizer=opt,
            mode=self.mode,
            rng=rng,
            **extra,
        )
        loss = stats.mean_loss
        if not math.isfinite(loss):  # no example was sampled in any step: report the loss on local data
            with torch.no_grad():
                per = (self.loss or _per_example_ce)(model(features), labels)
                if self.class_weight is not None:
                    per = per * torch.tensor(self.class_weight, dtype=per.dtype)[labels]
                loss = float(per.mean())
        return TrainResult(num_samples=n, steps=stats.steps, loss=loss, extra={"dp_sgd": stats.as_dict()})
