"""What a user sees (issue 14): refusals that name the fix, summaries that cannot mislead, defaults that train.

Each test plays the user's mistake (or the misleading situation) against the real code path and checks
the exact refusal or number the user gets.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fl.cli.main import main
from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import DataError
from fl.report import _plot_title, summary_lines
from fl.training.loop import (
    CHECKPOINT,
    CheckpointError,
    Federation,
    TrainingInterrupted,
    centralized_baseline,
    format_round,
    train,
)

SMALL = TrainConfig(dataset="breast_cancer", clients=3, rounds=3, seed=0)
ROOT = Path(__file__).resolve().parents[2]


# ---- silent or unclear today -> a clear error naming the fix --------------------------------------
def test_rounds_zero_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        train(TrainConfig(rounds=0), baseline=False)
    assert main(["train", "--rounds", "0", "--quiet"]) == 2
    err = capsys.readouterr()
    assert "--rounds must be >= 1" in err.err and "final test accuracy" not in err.out


def test_epsilon_without_dp_stage_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no DP stage"):
        PrivacyConfig(spec="secagg+", epsilon=1.0)
    with pytest.raises(ValueError, match="no noise or dnoise stage"):
        PrivacyConfig(spec="dp-sgd", noise_multiplier=1.0)
    assert PrivacyConfig(spec="dp-sgd", epsilon=1.0).epsilon == 1.0  # with a DP stage it is used
    assert main(["train", "--epsilon", "1", "--privacy", "secagg+", "--quiet"]) == 2
    assert "--privacy dp-sgd,secagg+" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [1.5, 2.25, 0.0, -1.0, float("nan")])
def test_threshold_neither_fraction_nor_count_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="--threshold"):
        PrivacyConfig(threshold=bad)


def test_threshold_fraction_and_count_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert PrivacyConfig(threshold=0.7).threshold == 0.7
    assert PrivacyConfig(threshold=3.0).threshold == 3.0
    assert main(["train", "--threshold", "1.5", "--quiet"]) == 2
    assert "--threshold 3 (three clients)" in capsys.readouterr().err


def test_too_many_clients_is_one_short_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match=r"use --clients 227 or fewer"):
        Federation(TrainConfig(clients=1000))
    assert main(["train", "--clients", "1000", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--clients 227" in err and len(err) < 200  # not 545 client ids


def _checkpointed(tmp_path: Path) -> Path:
    train(SMALL, checkpoint_dir=tmp_path, baseline=False)
    return tmp_path / CHECKPOINT


def test_corrupt_checkpoint_names_file_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _checkpointed(tmp_path)
    path.write_bytes(b"not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match=r"--checkpoint-dir") as info:
        Federation(SMALL).load(tmp_path)
    assert str(path) in str(info.value)
    argv = ["train", "--dataset", "breast_cancer", "--clients", "3", "--rounds", "3", "--quiet", "--no-baselines",
            "--resume", str(tmp_path)]
    assert main(argv) == 2
    assert f"cannot read checkpoint {path}" in capsys.readouterr().err


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = _checkpointed(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        Federation(SMALL).load(tmp_path)


def test_checkpoint_with_wrong_structure_is_refused(tmp_path: Path) -> None:
    torch.save({"config": {}, "next_round": "three"}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="not a privagg checkpoint"):
        Federation(SMALL).load(tmp_path)


def test_ctrl_c_during_training_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Federation.run_round

    def interrupted(self: Federation, round: int) -> dict[str, Any]:
        if round == 3:
            raise KeyboardInterrupt
        return real(self, round)

    monkeypatch.setattr(Federation, "run_round", interrupted)
    argv = ["train", "--dataset", "breast_cancer", "--clients", "3", "--rounds", "5", "--quiet", "--no-baselines",
            "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert f"interrupted after round 2; resume with --resume {tmp_path}" in captured.err
    assert "Traceback" not in captured.err and len(captured.err.splitlines()) == 1
    fed = Federation(replace_rounds(5))
    fed.load(tmp_path)  # the checkpoint of the last completed round is intact
    assert fed.next_round == 3 and len(fed.history) == 2


def replace_rounds(rounds: int) -> TrainConfig:
    from dataclasses import replace

    return replace(SMALL, rounds=rounds)


def test_ctrl_c_without_checkpoint_dir_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Federation, round: int) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(Federation, "run_round", interrupted)
    with pytest.raises(TrainingInterrupted, match="pass --checkpoint-dir DIR") as info:
        train(SMALL, baseline=False)
    assert info.value.completed == 0


def test_ctrl_c_in_baseline_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """scikit-learn's MLP catches KeyboardInterrupt and returns; the run must stop anyway."""
    from sklearn.neural_network import MLPClassifier

    def fit_like_sklearn(self: Any, x: Any, y: Any) -> Any:
        # what MLPClassifier._fit_stochastic does with the user's Ctrl-C: "Training interrupted by user."
        with contextlib.suppress(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        return self

    monkeypatch.setattr(MLPClassifier, "fit", fit_like_sklearn)
    fed = Federation(replace_rounds(1))
    with pytest.raises(KeyboardInterrupt):
        centralized_baseline(fed.data, TrainConfig(model="mlp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_privacy_spec_as_list() -> None:
    assert PrivacyConfig(spec=["clip", "noise", "secagg+"], noise_multiplier=1.0) == PrivacyConfig(  # type: ignore[arg-type]
        spec="clip,noise,secagg+", noise_multiplier=1.0
    )
    with pytest.raises(TypeError, match="'clip,noise,secagg\\+' or a list"):
        PrivacyConfig(spec=5)  # type: ignore[arg-type]


def test_log_level_has_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "LOUD", "train"])
    assert info.value.code == 2 and "invalid choice: 'LOUD'" in capsys.readouterr().err


# ---- results that cannot mislead ------------------------------------------------------------------
@pytest.mark.slow
def test_summary_shows_baselines_privacy_and_per_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "r.json"
    rc = main(["train", "--dataset", "breast_cancer", "--clients", "3", "--rounds", "2", "--quiet",
               "--privacy", "dp-sgd", "--epsilon", "4", "--report", str(report_path)])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    b, final = report["baseline"], report["final"]
    assert 0.85 < b["federated_nonprivate_accuracy"] <= 1.0
    assert b["centralized_accuracy"] > 0.9
    assert b["majority_class_rate"] == pytest.approx(0.6316, abs=1e-3)  # 72 benign of 114 test rows
    assert 0 < final["balanced_accuracy"] <= 1 and 0 < final["auc"] <= 1
    assert sorted(report["per_client"]) == ["0", "1", "2"]
    assert sum(v["samples"] for v in report["per_client"].values()) == 455
    assert "federated without privacy" in out and "majority class 0.6316" in out
    assert "privacy: epsilon" in out and "example-level" in out and "per client" in out
    assert "outside the guarantee above" in out  # the raw-data diagnostics are not passed off as private


def test_no_baselines_skips_them(tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    assert main(["train", "--clients", "3", "--rounds", "1", "--quiet", "--privacy", "secagg", "--no-baselines",
                 "--report", str(report_path)]) == 0
    b = json.loads(report_path.read_text())["baseline"]
    assert b["centralized_accuracy"] is None and "federated_nonprivate_accuracy" not in b


def test_warning_at_or_below_majority_rate() -> None:
    report = {"final": {"accuracy": 0.62, "rounds_completed": 3},
              "baseline": {"centralized_accuracy": 0.97, "majority_class_rate": 0.63}}
    assert any(line.startswith("WARNING: final accuracy 0.6200 is at or below the majority-class rate 0.6300")
               for line in summary_lines(report))
    report["final"]["accuracy"] = 0.9
    assert not any("WARNING" in line for line in summary_lines(report))


def test_warning_barely_above_majority_on_imbalanced_classes() -> None:
    """The finance example's numbers: 96.95% looks fine, but always answering "no" gives 96.65%."""
    report = {"final": {"accuracy": 0.9695, "balanced_accuracy": 0.5592, "auc": 0.9558, "rounds_completed": 15},
              "baseline": {"centralized_accuracy": 0.972, "majority_class_rate": 0.9665}}
    warning = [line for line in summary_lines(report) if line.startswith("WARNING")]
    assert len(warning) == 1 and "only 0.3 points above the majority-class rate 0.9665" in warning[0]
    assert "balanced accuracy 0.5592" in warning[0] and "AUC 0.9558" in warning[0]
    report = {"final": {"accuracy": 0.79, "rounds_completed": 20},  # Pima: a real gain over 0.66
              "baseline": {"majority_class_rate": 0.66}}
    assert not any("WARNING" in line for line in summary_lines(report))


def test_round_line_shows_stable_dp_quantity() -> None:
    """DP-SGD records carry the worst client's z/q/steps; the line shows only the max epsilon."""
    a = {"round": 1, "planned": 3, "included": 3, "accuracy": 0.9, "epsilon": 0.5, "noise_multiplier": 1.1,
         "sample_rate": 0.2, "steps": 4, "worst_client": 0}
    b = {**a, "round": 2, "epsilon": 0.7, "noise_multiplier": 0.9, "sample_rate": 0.4, "steps": 9, "worst_client": 2}
    for rec in (a, b):
        line = format_round(rec, 2)
        assert f"eps max {rec['epsilon']:.3f}" in line
        assert " z " not in line and "steps" not in line and "| q " not in line


def test_plot_title_names_privacy_stages() -> None:
    title = _plot_title({"config": {"dataset": "d", "clients": 4, "privacy": {"spec": "dp-sgd,secagg+"}},
                         "pipeline": "clip(l2=5),quantize(bits=20),secagg+"})
    assert "privacy: dp-sgd,secagg+" in title and all(len(line) <= 90 for line in title.splitlines())


# ---- help, library behaviour ----------------------------------------------------------------------
def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["train", "--help"], capsys)
    assert "(default: all)" in text and "default: None" not in text
    for flag in text.split(" --")[1:]:
        assert flag.count("default:") <= 1, flag
    assert "(default: 20)" in text  # --rounds
    sweep = _help(["sweep", "--help"], capsys)
    assert "(default: 0.5,1,2,4,8,inf)" in sweep and "(default: out/sweep)" in sweep and "default: dp-sgd" in sweep
    assert "Five hospitals" in _help(["demo", "--help"], capsys)
    assert "privagg 0.1" in _help(["--version"], capsys)


def test_train_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train(replace_rounds(1), baseline=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_no_print_in_library_code() -> None:
    cli_modules = {"fl/cli/main.py", "fl/cli/sweep.py", "fl/cli/compare.py", "fl/cli/audit.py", "fl/cli/flower.py",
                   "fl/__main__.py"}
    offenders = []
    for pkg in ("secagg", "dp", "fl"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in cli_modules:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"use logging, not print, in library code: {offenders}"


# ---- early stopping on a validation split (fl.training.early_stop) --------------------------------
def _stop_after_two(**kw: Any) -> TrainConfig:
    """min_delta so large that only round 1 can improve: with patience 1 the run stops after round 2."""
    from fl.config import EarlyStopConfig

    return TrainConfig(clients=3, rounds=8, seed=0, early_stopping=EarlyStopConfig(patience=1, min_delta=1e9), **kw)


def test_validation_split_is_disjoint_from_the_final_test_set() -> None:
    from dataclasses import replace

    import numpy as np

    from fl.training.early_stop import split_validation

    data = Federation(SMALL).data
    tagged = replace(data, x_test=np.arange(len(data.y_test), dtype=np.float32)[:, None])  # row ids as features
    split = split_validation(tagged, 0.5, seed=0)
    assert split.x_val is not None and split.y_val is not None
    val, test = set(split.x_val[:, 0].tolist()), set(split.x_test[:, 0].tolist())
    assert not val & test and val | test == set(range(len(data.y_test)))
    assert abs(len(val) - len(test)) <= 2  # stratified halves
    assert split_validation(split, 0.5, seed=0) is split  # the non-private twin reuses the same split


def test_early_stopping_restores_best_round_and_reports_it() -> None:
    report = train(_stop_after_two(), baseline=True)
    es, final = report["early_stopping"], report["final"]
    assert final["rounds_completed"] == 2 and es["stopped_after"] == 2 and es["best_round"] == 1
    assert final["accuracy"] == report["rounds"][0]["accuracy"]  # round 1's model, on the test split
    assert all("val_loss" in r for r in report["rounds"])
    assert es["validation_rows"] + es["test_rows"] == 114  # the 20% held out of 569 rows
    for key in ("centralized_accuracy", "majority_class_rate"):  # baselines on the same 57 test rows
        hits = report["baseline"][key] * es["test_rows"]
        assert hits == pytest.approx(round(hits), abs=1e-6), key
    assert "early stopping after round 2" in report["stopped"]
    assert "early stopping after round 2" in "\n".join(summary_lines(report))


def test_early_stopping_under_dp_reports_the_epsilon_spent() -> None:
    """Calibrated for 8 rounds at epsilon 2; stopping after 2 charges exactly two Gaussian rounds."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    cfg = _stop_after_two(privacy=PrivacyConfig(spec="clip,noise", epsilon=2.0), stats_epsilon=0.2)
    report = train(cfg, baseline=False)
    z = report["privacy"]["mechanisms"][0]["noise_multiplier"]
    sigma = z / math.sqrt(2)  # two composed Gaussians (no sampling) = one with z / sqrt(2)

    def delta(eps: float) -> float:  # the exact Gaussian privacy profile (Balle and Wang 2018)
        return float(norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma))

    expected = brentq(lambda e: delta(e) - report["privacy"]["delta"], 1e-6, 50)  # training's share of delta
    assert report["final"]["epsilon_training"] == pytest.approx(expected, rel=2e-3)
    assert report["final"]["epsilon_training"] < 0.9 * (2.0 - 0.2)  # well under the 8-round budget


def test_early_stopping_resumes_to_the_same_model(tmp_path: Path) -> None:
    from dataclasses import replace

    from fl.config import EarlyStopConfig

    cfg = TrainConfig(clients=3, rounds=8, seed=0, early_stopping=EarlyStopConfig(patience=4, min_delta=1e9))
    whole = train(cfg, baseline=False, checkpoint_dir=tmp_path / "a")
    train(replace(cfg, rounds=3), baseline=False, checkpoint_dir=tmp_path / "b")
    resumed = train(cfg, baseline=False, checkpoint_dir=tmp_path / "b", resume=True)
    assert whole["early_stopping"] == resumed["early_stopping"] and whole["early_stopping"]["best_round"] == 1
    assert resumed["final"]["accuracy"] == whole["final"]["accuracy"] == whole["rounds"][0]["accuracy"]


def test_early_stopping_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    assert main(["train", "--clients", "3", "--rounds", "6", "--quiet", "--no-baselines", "--patience", "1",
                 "--min-delta", "1e9", "--report", str(path)]) == 0
    assert json.loads(path.read_text())["early_stopping"]["stopped_after"] == 2
    assert main(["train", "--min-delta", "0.01", "--quiet"]) == 2
    assert "add --patience N" in capsys.readouterr().err
    assert main(["train", "--patience", "0", "--quiet"]) == 2
    assert "--patience must be a whole number of rounds >= 1" in capsys.readouterr().err


# ---- plots and output paths -----------------------------------------------------------------------
def _captured_figure(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list[Any] = []
    real_close = plt.close

    def close(fig: Any = None) -> None:
        figures.append(fig)
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    return figures


def _assert_legend_off_axes_and_title_short(fig: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # pyplot.close detached the figure's canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    for axes in fig.axes:  # the twin epsilon axis shares the box
        assert not legend.overlaps(axes.get_window_extent(renderer)), "legend drawn over the data"
    assert all(len(line) <= 90 for line in ax.get_title().splitlines())


def test_epsilon_plot_legend_off_the_data_and_title_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fl.cli.sweep import write_plot

    figures = _captured_figure(monkeypatch)
    long_name = "csv:/data/" + "very_long_folder_name/" * 6 + "loans.csv"
    result = {"summary": [{"epsilon": e, "mean": 0.8 + e / 100, "std": 0.01} for e in (0.5, 1, 2, 4, 8)],
              "baselines": {"federated_nonprivate_accuracy": 0.9, "centralized_accuracy": 0.92},
              "config": {"dataset": long_name, "clients": 5, "privacy": {"spec": "dp-sgd,secagg+", "delta": 1e-5}}}
    write_plot(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    _assert_legend_off_axes_and_title_short(figures[-1])
    assert "dp-sgd,secagg+" in figures[-1].axes[0].get_title().replace("\n", " ")


def test_round_plot_legend_off_the_data_and_title_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fl.report import plot_rounds

    figures = _captured_figure(monkeypatch)
    report = {"rounds": [{"round": r, "accuracy": 0.7 + r / 100, "epsilon": r / 5} for r in range(1, 6)],
              "baseline": {"centralized_accuracy": 0.9, "majority_class_rate": 0.6},
              "config": {"dataset": "csv:/data/" + "long_folder/" * 10 + "x.csv", "clients": 3,
                         "privacy": {"spec": "clip,noise,secagg+"}},
              "pipeline": "clip(l2=1),gaussian(z=1.1),quantize(bits=20),secagg+"}
    plot_rounds(report, tmp_path / "r.png")
    _assert_legend_off_axes_and_title_short(figures[-1])
    assert "privacy: clip,noise,secagg+" in figures[-1].axes[0].get_title().replace("\n", " ")


def test_every_command_writes_under_out_by_default() -> None:
    from fl.cli.main import build_parser

    parser = build_parser()
    for argv, attrs in ((["sweep"], ("out", "json", "plot")), (["compare"], ("json", "plot")), (["demo"], ("out",))):
        args = parser.parse_args(argv)
        for attr in attrs:
            value = getattr(args, attr)
            assert value is None or Path(value).parts[0] == "out", (argv, attr, value)


def test_readme_links_stay_inside_the_repository() -> None:
    import re

    text = (ROOT / "README.md").read_text()
    assert not re.findall(r"https?://", text), "the README must not send users outside the repository"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links {target}, which is not in the repository"


# ---- DP-SGD batch size and clip chosen from epsilon -----------------------------------------------
def test_dpsgd_batch_and_clip_rule() -> None:
    from fl.training.dp_sgd import default_batch_and_clip

    assert default_batch_and_clip(1.0, 1000) == (64, 0.5)
    assert default_batch_and_clip(4.0, 1000) == (32, 1.0)
    assert default_batch_and_clip(0.25, 1000) == (128, 0.5)
    assert default_batch_and_clip(16.0, 1000) == (16, 2.0)
    assert default_batch_and_clip(1.0, 40) == (40, 0.5)  # never more than the smallest client's rows
    assert default_batch_and_clip(None, 1000) == (32, 1.0)  # a given noise multiplier: the fixed defaults
    sizes = [default_batch_and_clip(e, 10**6)[0] for e in (0.5, 1, 2, 4, 8)]
    assert sizes == sorted(sizes, reverse=True)  # larger batches at smaller epsilon


def test_dpsgd_rule_is_used_only_when_unset() -> None:
    cfg = TrainConfig(clients=3, rounds=2, privacy=PrivacyConfig(spec="dp-sgd", epsilon=4.0), stats_epsilon=0.4)
    from fl.training.dp_sgd import DpSgdTrainer

    fed = Federation(cfg)
    trainer = fed.plan.trainer
    assert isinstance(trainer, DpSgdTrainer)
    assert (trainer.batch_size, trainer.max_grad_norm) == (32, pytest.approx(math.sqrt(3.6) / 2))  # 3.6 trains
    assert any("chosen from epsilon" in note for note in fed.plan.notes)
    fixed = Federation(replace(cfg, privacy=replace(cfg.privacy, dpsgd_batch_size=50, dpsgd_clip=3.0)))
    assert isinstance(fixed.plan.trainer, DpSgdTrainer)
    assert (fixed.plan.trainer.batch_size, fixed.plan.trainer.max_grad_norm) == (50, 3.0)
    assert not any("chosen from epsilon" in note for note in fixed.plan.notes)


def test_help_documents_the_dpsgd_rule(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["train", "--help"], capsys)
    assert "8*round(8/sqrt(epsilon))" in text and "sqrt(epsilon)/2 within [0.5, 2]" in text
    assert "--patience" in text and "validation" in text


def test_flower_refuses_early_stopping_instead_of_ignoring_it() -> None:
    from fl.cli.flower import _job
    from fl.cli.main import build_parser

    argv = ["flower", "run", "--superlink", "127.0.0.1:8000", "--insecure", "--patience", "2"]
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match="runs in memory only"):
        _job(args)


@pytest.mark.parametrize(("model", "lr"), [("logreg", 1.0), ("mlp", 0.1), ("cnn", 0.1), ("mlp-ln", 0.1)])
def test_the_cli_learning_rate_default_is_the_model_familys(model: str, lr: float) -> None:
    """Without --lr the family's rate (was: logreg's 1.0 for every family, against what --help said)."""
    from fl.cli.main import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["train", "--model", model])).lr == lr
    assert config_from_args(build_parser().parse_args(["train", "--model", model, "--lr", "0.5"])).lr == 0.5
