"""The models a federation can train, and flat-vector views of their parameters."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn.utils import parameters_to_vector

__all__ = ["MODELS", "build_cnn", "build_mlp_ln", "build_model", "flatten_parameters", "get_flat", "set_flat"]

MODELS = ("logreg", "mlp", "mlp-ln", "cnn")


def build_model(
    kind: str, num_features: int, num_classes: int, *, hidden: int = 64, seed: int = 0,
    prototype: nn.Module | None = None,
) -> nn.Module:
    """``logreg``: one linear layer (multinomial logistic regression). ``mlp``: two hidden ReLU layers.
    ``mlp-ln``: the MLP with LayerNorm after each hidden layer (:func:`build_mlp_ln`). ``cnn``: a small
    convolutional net for square single-channel images fed as flat rows (:func:`build_cnn`).

    ``prototype``: a user's own module (any ``nn.Module``); the result is an independent deep copy that
    keeps the prototype's own initialization (``kind``, ``hidden`` and ``seed`` are then not used), so
    the federation never trains the caller's object in place.
    """
    if prototype is not None:
        if not isinstance(prototype, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(prototype).__name__}")
        return copy.deepcopy(prototype)
    if kind == "cnn":
        return build_cnn(num_features, num_classes, hidden=hidden, seed=seed)
    if kind == "mlp-ln":
        return build_mlp_ln(num_features, num_classes, hidden=hidden, seed=seed)
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


def image_side(num_features: int) -> int:
    """The side of the square single-channel image a flat row of ``num_features`` pixels holds."""
    side = math.isqrt(num_features)
    if side * side != num_features or side < 4:
        raise ValueError(
            f"model 'cnn' reads each row as a square 1 x s x s image (s >= 4), but rows have {num_features} "
            "features; use a dataset of square images (e.g. digits: 64 = 8 x 8) or model 'mlp'"
        )
    return side


def build_cnn(num_features: int, num_classes: int, *, hidden: int = 64, seed: int = 0) -> nn.Module:
    """Conv(1->16, 3x3) - ReLU - MaxPool(2) - Conv(16->32, 3x3) - ReLU - MaxPool(2) - Linear(hidden) - ReLU -
    Linear(classes), for square single-channel images.

    The reshape hook: the first module, ``nn.Unflatten(1, (1, s, s))``, turns each flat row of ``s*s``
    pixels (how the data pipeline, the evaluation and every site hold images, e.g. digits' 64 columns)
    into a 1 x s x s image, so nothing outside the model needs to know about image shapes. Every layer
    is covered by DP-SGD's direct mode (:func:`dp.sgd.supports_direct`).
    """
    side = image_side(num_features)
    last = side // 4
    model = nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * last * last, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    _seeded_default_init(model, seed)
    return model


def build_mlp_ln(num_features: int, num_classes: int, *, hidden: int = 64, seed: int = 0) -> nn.Module:
    """Linear - LayerNorm - ReLU - Linear - LayerNorm - ReLU - Linear (LayerNorm, unlike BatchNorm, never
    mixes examples, so per-example DP-SGD applies)."""
    model = nn.Sequential(
        nn.Linear(num_features, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    _seeded_default_init(model, seed)
    return model


def _seeded_default_init(model: nn.Module, seed: int) -> None:
    """torch's default initialisation (uniform within ``1/sqrt(fan_in)``; norms at 1 and 0), from a
    seeded generator so that every party builds the same starting model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)
            elif isinstance(m, nn.LayerNorm | nn.GroupNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()


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
