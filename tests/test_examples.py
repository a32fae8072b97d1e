"""The examples keep working: each script's config trains for one round through the public API."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from fl.training.loop import train

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_trains(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts only train under __main__
    report = train(replace(module.config, rounds=1), baseline=False)
    assert report["final"]["rounds_completed"] == 1
    assert 0.5 < report["final"]["accuracy"] <= 1.0
    assert report["guarantees"], "every example runs with privacy layers on"
