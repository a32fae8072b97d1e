"""``privagg sweep`` and ``privagg audit`` as their modules expose them."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from fl.cli import audit as audit_cli
from fl.cli import sweep
from fl.config import PrivacyConfig, TrainConfig


def parse(mod: object, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    mod.add_arguments(p)  # type: ignore[attr-defined]
    return p.parse_args(argv)


def test_parse_epsilons() -> None:
    assert sweep.parse_epsilons("0.5, 1,inf") == [0.5, 1.0, math.inf]
    with pytest.raises(ValueError, match="positive"):
        sweep.parse_epsilons("0,1")


def test_sweep_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(sweep, ["--dataset", "breast_cancer", "--clients", "3", "--rounds", "2", "--epsilons", "2,inf",
                         "--privacy", "clip,noise",
                         "--seeds", "2", "--quiet", "--out", str(tmp_path), "--insecure-seeded-randomness"])
    assert sweep.run(args) == 0
    out = capsys.readouterr().out
    assert "accuracy mean +- std" in out and "centralized" in out
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert len(data["runs"]) == 4
    finite = [r for r in data["runs"] if r["epsilon"] == 2.0]
    assert all(r["epsilon_spent"] <= 2.0 for r in finite)
    assert data["baselines"]["federated_nonprivate_accuracy"] is not None
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_refuses_a_spec_without_dp() -> None:
    base = TrainConfig(privacy=PrivacyConfig(spec="secagg+"))
    with pytest.raises(ValueError, match="no DP stage"):
        sweep.sweep(base, [1.0], [0], progress=False)


@pytest.mark.parametrize("target", ["dp-fedavg", "dp-sgd"])
def test_audit_cli_passes_and_catches_a_planted_bug(target: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--target", target, "--epsilon", "1", "--steps", "10", "--seed", "0"]
    assert audit_cli.run(parse(audit_cli, [*common, "--json", str(tmp_path / "a.json")])) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["pass"] is True
    assert audit_cli.run(parse(audit_cli, [*common, "--weaken", "10"])) == 1
    assert "FAIL" in capsys.readouterr().out


def test_audit_dp_fedavg_distributed_noise() -> None:
    from dp.accounting import calibrate_noise
    from dp.rng import SecureRandom

    z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=5)
    res = audit_cli.audit_dp_fedavg(noise_multiplier=z, rounds=5, placement="clients", canaries=400, guesses=60,
                                    rng=SecureRandom.for_testing("dist"))
    assert res.epsilon_lower_bound <= 1.0
    bug = audit_cli.audit_dp_fedavg(noise_multiplier=z / 10, rounds=5, placement="clients", canaries=400,
                                    guesses=60, rng=SecureRandom.for_testing("dist"))
    assert bug.epsilon_lower_bound > 1.0
