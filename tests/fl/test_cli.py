"""The privagg command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl.cli.main import build_parser, main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--privacy" in capsys.readouterr().out


def test_train_writes_report_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, plot = tmp_path / "r.json", tmp_path / "a.png"
    rc = main(["train", "--dataset", "breast_cancer", "--clients", "3", "--rounds", "2", "--quiet",
               "--report", str(report), "--plot", str(plot)])
    assert rc == 0
    data = json.loads(report.read_text())
    assert len(data["rounds"]) == 2 and "accuracy" in data["final"]
    assert data["baseline"]["centralized_accuracy"] > 0.9
    assert plot.stat().st_size > 1000
    assert "final test accuracy" in capsys.readouterr().out


def test_bad_input_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--partition", "weird", "--quiet"]) == 2
    assert "choose iid" in capsys.readouterr().err
    assert main(["train", "--model", "resnet", "--quiet"]) == 2
    assert "logreg" in capsys.readouterr().err
    assert main(["train", "--privacy", "magic", "--quiet"]) == 2
    assert "unknown privacy stage" in capsys.readouterr().err


def test_parser_defaults_match_config() -> None:
    from fl.cli.main import config_from_args
    from fl.config import TrainConfig

    args = build_parser().parse_args(["train"])
    assert config_from_args(args) == TrainConfig()
