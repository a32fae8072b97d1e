"""Plain (non-private) local training on one client: epochs of shuffled minibatches, any torch optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fl.spec import TrainResult

__all__ = ["PlainTrainer", "make_optimizer"]


def make_optimizer(kind: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """``sgd`` or ``adam``: a fresh optimizer per client per round (local state is not kept)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; choose sgd or adam")


@dataclass(frozen=True, slots=True)
class PlainTrainer:
    """``epochs`` passes over the local data in shuffled minibatches; cross-entropy loss.

    ``optimizer_factory`` (``params -> Optimizer``) and ``loss`` (``(output, labels) -> loss``, a mean or
    per-example losses) replace ``optimizer``/``lr`` and cross-entropy when given (the Python API).
    ``class_weight``: one weight per class (:mod:`fl.training.class_weights`); each example's loss is
    multiplied by its class's weight and the batch loss is their mean (the loss must then be per example).
    """

    epochs: int = 1
    lr: float = 0.1
    batch_size: int = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    class_weight: tuple[float, ...] | None = None

    def train(
        self, model: Any, features: Any, labels: Any, *, cid: int, round: int, seed: int
    ) -> TrainResult:
        assert isinstance(model, nn.Module)
        n = int(labels.shape[0])
        if n == 0:
            raise ValueError(f"client {cid} has no training samples")
        gen = torch.Generator().manual_seed(seed)
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(model.parameters())
        else:
            opt = make_optimizer(self.optimizer, model.parameters(), self.lr)
        loss_fn = self._loss_fn(features.dtype)
        bs = min(self.batch_size, n)
        steps, total = 0, torch.zeros(())
        if not model.training:
            model.train()
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(features[idx]), labels[idx]).mean()
                torch.autograd.backward(loss)
                opt.step()
                steps += 1
                total += loss.detach()
        return TrainResult(
            num_samples=n,
            steps=steps,
            loss=float(total) / max(1, steps),
            extra={"batches_per_epoch": math.ceil(n / bs)},
        )

    def _loss_fn(self, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loss of a batch: ``loss`` (default cross-entropy), class-weighted per example when weights are set."""
        if self.class_weight is None:
            return self.loss or nn.functional.cross_entropy
        weight = torch.tensor(self.class_weight, dtype=dtype)
        base = self.loss or _per_example_ce
        if not weight.dim() == 1 or not bool(torch.all(torch.isfinite(weight) & (weight > 0))):
            raise ValueError(f"class_weight must be one finite weight > 0 per class, got {self.class_weight}")

        def weighted(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            per = base(out, y)
            if per.shape != y.shape:
                raise ValueError(f"class weights scale each example's loss, but the loss returned shape "
                                 f"{tuple(per.shape)} for {y.shape[0]} labels: pass a per-example loss "
                                 f"(e.g. torch.nn.CrossEntropyLoss(reduction='none'))")
            return per * weight[y]

        return weighted


def _per_example_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")
