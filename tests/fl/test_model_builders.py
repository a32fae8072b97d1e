"""The cnn and mlp-ln builders: shapes, the reshape hook, seeded init, DP-SGD direct mode, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dp.sgd import resolve_mode
from fl.training.models import MODELS, build_model


@pytest.mark.parametrize("kind", ["cnn", "mlp-ln"])
def test_builders_take_flat_rows_and_are_seeded(kind: str) -> None:
    assert kind in MODELS
    a, b = build_model(kind, 64, 10, hidden=16, seed=3), build_model(kind, 64, 10, hidden=16, seed=3)
    c = build_model(kind, 64, 10, hidden=16, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert a(torch.randn(5, 64)).shape == (5, 10)  # flat rows in: the reshape to 1x8x8 is inside the model
    assert resolve_mode(a, "auto") == "direct"
    for m in a.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
        if isinstance(m, nn.Conv2d):  # torch's default bound 1/sqrt(fan_in), not 1/sqrt(kernel width)
            assert float(m.weight.abs().max()) <= 1 / (m.weight[0].numel() ** 0.5)


def test_cnn_needs_square_images() -> None:
    with pytest.raises(ValueError, match="square 1 x s x s image"):
        build_model("cnn", 30, 2)
    assert build_model("cnn", 16 * 16, 3)(torch.randn(2, 256)).shape == (2, 3)
