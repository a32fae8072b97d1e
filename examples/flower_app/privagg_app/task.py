"""The model, each node's data and local training (deterministic, so a test can recompute every update)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURES = 8
CLASSES = 2


def make_model(seed: int = 0) -> nn.Module:
    """A small MLP (8 -> 16 -> 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def load_data(node_config: dict) -> tuple[np.ndarray, np.ndarray]:
    """This node's own rows: ``data-path`` (a CSV with feature columns x0..x7 and a ``label``) if the node's
    config names one, else a synthetic site drawn from ``partition-id`` (sizes differ per site)."""
    path = node_config.get("data-path")
    if isinstance(path, str) and path:
        table = np.genfromtxt(path, delimiter=",", names=True)
        x = np.stack([table[f"x{i}"] for i in range(FEATURES)], axis=1).astype(np.float32)
        return x, table["label"].astype(np.int64)
    pid = int(node_config.get("partition-id", 0))
    rng = np.random.default_rng(1000 + pid)
    n = 40 + 20 * pid
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] - 0.25 * x[:, 2] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int) -> float:
    """Full-batch SGD for ``epochs`` epochs of 4 mini-batches in a seeded order; returns the last loss."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).chunk(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return float(loss.detach())
