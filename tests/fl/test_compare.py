"""``privagg compare``: configurations x epsilons x seeds, table, JSON and plot, unit/observer per row, cost."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fl.cli.compare import Cell, cell_config, estimate_bytes, grid, parse_configs, parse_seeds
from fl.cli.main import build_parser, main
from fl.config import PrivacyConfig, TrainConfig

TINY = ["--rounds", "2", "--clients", "3", "--jobs", "1", "--quiet", "--seeds", "0", "--epsilons", "2,8"]


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str, Path]:
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    rc = main(["compare", *TINY, *extra, "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    return json.loads(out_json.read_text()), out_json.read_text(), out_png


def test_tiny_compare_writes_json_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, _, png = _run(tmp_path, "--configs", "dp-sgd;clip,dnoise,secagg+")
    printed = capsys.readouterr().out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = result["rows"]
    # 2 DP configurations x 2 epsilons, one row each; the baseline ("none") is not a row unless asked for
    assert [(r["config"], r["epsilon"]) for r in rows] == [
        ("dp-sgd", 2.0), ("dp-sgd", 8.0), ("clip,dnoise,secagg+", 2.0), ("clip,dnoise,secagg+", 8.0)]
    for r in rows:
        assert r["runs"] == 1 and 0.0 <= r["mean"] <= 1.0 and r["std"] == 0.0
        assert r["seconds_per_round"] > 0 and r["bytes_per_client_per_round"] > 0
        assert r["epsilon_spent_max"] <= r["epsilon"] + 1e-6  # never over the budget it is plotted at
        assert r["config"] in printed
    by = {r["config"]: r for r in rows}
    # DP-SGD is example-level against the server; distributed noise is client-level, the released model too
    assert by["dp-sgd"]["unit"] == "example" and by["dp-sgd"]["observers"] == ["server"]
    assert by["clip,dnoise,secagg+"]["unit"] == "client"
    assert "released model" in by["clip,dnoise,secagg+"]["observers"]
    assert by["dp-sgd"]["comparable_group"] != by["clip,dnoise,secagg+"]["comparable_group"]
    assert set(by["clip,dnoise,secagg+"]["epsilon_by_observer_max"]) == set(by["clip,dnoise,secagg+"]["observers"])
    b = result["baselines"]
    assert 0.5 < b["centralized_accuracy"] <= 1.0 and 0.0 <= b["federated_nonprivate_accuracy"] <= 1.0
    assert "ring" in result["costs"]["bytes_per_client_per_round"]
    # the centralized baseline is the one `privagg train` reports for the same data and seed
    from fl.training.loop import train

    same = train(TrainConfig(rounds=1, clients=3, seed=0), baseline=True, federated_baseline=False)
    assert b["centralized_accuracy"] == same["baseline"]["centralized_accuracy"]
    # the run list holds the baseline runs as well: none on seed 0, plus 4 DP cells
    assert len(result["runs"]) == 5 and sum(r["config"] == "none" for r in result["runs"]) == 1
    assert "same unit and observers" in printed


def test_configs_without_dp_run_once_per_seed_as_flat_lines() -> None:
    cells = grid(["none", "dp-sgd", "secagg+"], [1.0, 4.0], [0, 1])
    assert [c for c in cells if c.spec == "secagg+"] == [Cell("secagg+", None, 0), Cell("secagg+", None, 1)]
    assert sum(c.spec == "dp-sgd" for c in cells) == 4


def test_baseline_runs_even_when_not_asked_for() -> None:
    cells = grid(["paillier"], [1.0], [0])
    assert Cell("none", None, 0) in cells


def test_cell_config_recalibrates_for_the_cell_budget() -> None:
    base = TrainConfig(privacy=PrivacyConfig(spec="none", noise_multiplier=None))
    cfg = cell_config(base, Cell("clip,noise,secagg+", 3.0, 7))
    assert cfg.seed == 7 and cfg.privacy.epsilon == 3.0 and cfg.privacy.spec == "clip,noise,secagg+"
    assert cell_config(base, Cell("secagg+", None, 1)).privacy.epsilon is None


def test_parse_configs_keeps_commas_inside_a_spec_and_merges_repeats() -> None:
    assert parse_configs(["none; dp-sgd ;clip, noise", "clip,noise", "paillier"]) == [
        "none", "dp-sgd", "clip,noise", "paillier"]
    with pytest.raises(ValueError, match="at least one"):
        parse_configs([" ; "])
    assert parse_seeds("0,1,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="integers"):
        parse_seeds("a,b")


def test_repeated_config_flag_is_accepted() -> None:
    args = build_parser().parse_args(["compare", "--config", "dp-sgd", "--config", "clip,noise,secagg"])
    assert args.config == ["dp-sgd", "clip,noise,secagg"] and args.jobs >= 1


def test_bytes_estimate_follows_the_encoded_update() -> None:
    plain = estimate_bytes(TrainConfig(rounds=1, privacy=PrivacyConfig(spec="none")))
    assert plain["bytes_per_client_per_round"] == plain["parameters"] * 4
    sec = estimate_bytes(TrainConfig(rounds=1, clients=5, privacy=PrivacyConfig(spec="secagg+", quant_bits=20)))
    ring = 20 + math.ceil(math.log2(5))  # value bits + headroom for the sum of 5 clients
    assert sec["bytes_per_client_per_round"] == math.ceil(sec["parameters"] * ring / 8)
    pai = estimate_bytes(TrainConfig(rounds=1, privacy=PrivacyConfig(spec="paillier")))
    assert pai["bytes_per_client_per_round"] % (2 * 2048 // 8) == 0 and "ciphertexts" in pai["how"]


@pytest.mark.parametrize("flags, match", [
    (["--epsilons", "1,inf"], "finite"),
    (["--epsilon", "2"], "--epsilons"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_flags_are_refused_with_the_fix(flags: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compare", "--configs", "dp-sgd", "--rounds", "1", "--seeds", "0", "--quiet", *flags])
    assert rc == 2 and match in capsys.readouterr().err


@pytest.mark.slow
def test_jobs_spread_over_processes_give_the_same_shape(tmp_path: Path) -> None:
    result, _, png = _run(tmp_path, "--configs", "none;dp-sgd", "--jobs", "2")
    assert png.exists() and result["jobs"] == 2
    assert [(r["config"], r["epsilon"]) for r in result["rows"]] == [("none", None), ("dp-sgd", 2.0), ("dp-sgd", 8.0)]


def test_compare_on_the_users_own_sites(tmp_path: Path) -> None:
    from tests.fl.test_sites import site_frame, write_sites

    write_sites(tmp_path / "sites", {"north": site_frame(0), "south": site_frame(1, shift=5), "east": site_frame(2)})
    out_json = tmp_path / "s.json"
    rc = main(["compare", "--sites", str(tmp_path / "sites"), "--target", "outcome", "--drop", "smoker",
               "--configs", "clip,noise;secagg+", "--epsilons", "4", "--seeds", "0", "--rounds", "2", "--jobs", "1",
               "--quiet", "--json", str(out_json), "--plot", str(tmp_path / "s.png")])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["config"]["sites_dir"] == str(tmp_path / "sites")
    assert [(r["config"], r["epsilon"], r["unit"]) for r in result["rows"]] == [
        ("clip,noise", 4.0, "client"), ("secagg+", None, None)]
    assert result["rows"][1]["comparable_group"] == "no DP"
    assert (tmp_path / "s.png").exists()
