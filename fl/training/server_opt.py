"""Server optimizers: apply the aggregated client delta to the global model.

FedAvg (McMahan et al. 2017): ``x += lr * delta``. FedAdam (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021): Adam on the pseudo-gradient ``delta`` with ``tau`` as the adaptivity floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["FedAdam", "FedAvg", "make_server_optimizer"]


@dataclass
class FedAvg:
    lr: float = 1.0

    def step(self, params: NDArray[np.float64], delta: NDArray[np.float64]) -> NDArray[np.float64]:
        return params + self.lr * delta

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        return None


@dataclass
class FedAdam:
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: NDArray[np.float64] | None = field(default=None, repr=False)
    v: NDArray[np.float64] | None = field(default=None, repr=False)

    def step(self, params: NDArray[np.float64], delta: NDArray[np.float64]) -> NDArray[np.float64]:
        if self.m is None or self.v is None:
            self.m = np.zeros_like(params)
            self.v = np.zeros_like(params)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta * delta
        return params + self.lr * self.m / (np.sqrt(self.v) + self.tau)

    def state(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load(self, state: dict[str, Any]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


def make_server_optimizer(kind: str, lr: float) -> FedAvg | FedAdam:
    if kind == "fedavg":
        return FedAvg(lr=lr)
    if kind == "fedadam":
        return FedAdam(lr=lr)
    raise ValueError(f"unknown server optimizer {kind!r}; choose fedavg or fedadam")
