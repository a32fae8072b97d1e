"""The models a federation can train, and flat-vector views of their parameters."""

from __future__ import annotations

import copy

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn.utils import parameters_to_vector

__all__ = ["MODELS", "build_model", "flatten_parameters", "get_flat", "set_flat"]

MODELS = ("logreg", "mlp")


def build_model(
    kind: str, num_features: int, num_classes: int, *, hidden: int = 64, seed: int = 0,
    prototype: nn.Module | None = None,
) -> nn.Module:
    """``logreg``: one linear layer (multinomial logistic regression). ``mlp``: two hidden ReLU layers.

    ``prototype``: a user's own module (any ``nn.Module``); the result is an independent deep copy that
    keeps the prototype's own initialization (``kind``, ``hidden`` and ``seed`` are then not used), so
    the federation never trains the caller's object in place.
    """
    if prototype is not None:
        if not isinstance(prototype, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(prototype).__name__}")
        return copy.deepcopy(prototype)
    gen = torch.Generator().manual_seed(seed)
    if kind == "logreg":
        model: nn.Module = nn.Sequential(nn.Linear(num_features, num_classes))
    elif kind == "mlp":
        model = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
    else:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    with torch.no_grad():
        for p in model.parameters():
            # the same init as torch's default (kaiming-uniform-like bound), from a seeded generator
            bound = 1.0 / np.sqrt(p.shape[-1]) if p.dim() > 1 else 1.0 / np.sqrt(max(1, p.shape[0]))
            p.uniform_(-bound, bound, generator=gen)
    return model


def get_flat(model: nn.Module) -> NDArray[np.float64]:
    """All parameters as one float64 vector (the order of ``model.parameters()``)."""
    with torch.no_grad():
        flat: NDArray[np.float64] = parameters_to_vector(model.parameters()).to(torch.float64).numpy()
    return flat


def set_flat(model: nn.Module, flat: NDArray[np.floating]) -> None:
    """Load a flat vector produced by :func:`get_flat` back into ``model``."""
    total = sum(p.numel() for p in model.parameters())
    if flat.shape != (total,):
        raise ValueError(f"parameter vector has shape {flat.shape}, the model needs ({total},)")
    src = torch.from_numpy(np.asarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():  # in place: parameters may be views into a flat buffer
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))
            offset += n


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Re-point every parameter of ``model`` into one contiguous buffer and return that buffer.

    Loading a whole model is then one ``buffer.copy_``, and reading it one ``buffer.numpy()``: the
    training loop does both for every client in every round. Optimizers must be created afterwards.
    """
    with torch.no_grad():
        buf = parameters_to_vector(model.parameters()).detach().clone()
        offset = 0
        for p in model.parameters():
            n = p.numel()
            p.data = buf[offset : offset + n].view_as(p)
            offset += n
    return buf
