"""The README's library examples run as written: each ``<!-- library-example: NAME -->`` block is executed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
BLOCK = re.compile(r"<!-- library-example: (\w+) -->\s*```python\n(.*?)```", re.DOTALL)


def _blocks() -> dict[str, str]:
    return {name: code for name, code in BLOCK.findall(README.read_text())}


def _run(name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"readme_{name}"}
    exec(compile(_blocks()[name], f"README.md:{name}", "exec"), namespace)  # our own README, not received data
    return namespace


def test_the_readme_has_every_library_example() -> None:
    assert set(_blocks()) >= {"train", "secagg", "paillier", "dp"}


def test_secure_sum_with_secagg_plus_is_exact() -> None:
    ns = _run("secagg")
    assert ns["total"].tolist() == [12, 15, 18]


def test_packed_paillier_sum_is_exact() -> None:
    ns = _run("paillier")
    assert ns["total"].tolist() == [35, 25]


def test_dp_layer_reports_its_epsilon() -> None:
    ns = _run("dp")
    release = ns["release"]
    assert 0.99 < release.epsilon <= 1.0 + 1e-9  # calibrated to (1, 1e-5) for one release
    assert release.noise_multiplier > 1.0
    assert release.value.shape == (4,)
    layers = [g.layer for g in release.guarantees]
    assert layers[0].startswith("clip(l2=1") and "gaussian-noise" in layers[1]


@pytest.mark.slow
def test_train_example_returns_a_trained_model() -> None:
    ns = _run("train")
    result = ns["result"]
    assert isinstance(result.model, torch.nn.Module)
    assert result.epsilon is not None and result.epsilon <= 4.0 + 1e-9
    assert result.report["final"]["accuracy"] > 0.8
    x, y = ns["X"][500:], ns["y"][500:]
    with torch.no_grad():
        acc = float((result.model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(result.report["final"]["accuracy"], abs=1e-6)


def test_float_secure_sum_is_within_the_quantization_error() -> None:
    import fl

    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-2, 2, size=50) for _ in range(4)]
    total = fl.secure_sum(arrays, bound=2.0, bits=20)
    step = 2.0 / ((1 << 19) - 1)
    assert np.max(np.abs(total - np.sum(arrays, axis=0))) <= 4 * step


def test_secure_sum_refuses_what_it_cannot_sum() -> None:
    import fl

    with pytest.raises(ValueError, match="bound="):
        fl.secure_sum([np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match="at least two parties"):
        fl.secure_sum([np.ones(3, dtype=int)])
    with pytest.raises(ValueError, match="different shapes"):
        fl.secure_sum([np.ones(3, dtype=int), np.ones(4, dtype=int)])
    with pytest.raises(ValueError, match="raise bits="):
        fl.secure_sum([np.array([1 << 40]), np.array([1])])
    with pytest.raises(ValueError, match="unknown protocol"):
        fl.secure_sum([np.ones(3, dtype=int), np.ones(3, dtype=int)], protocol="magic")
