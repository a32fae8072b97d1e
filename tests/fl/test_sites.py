"""Per-site CSVs from the CLI and the API, and bad input refused (or warned about) before any round starts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl.cli.main import main
from fl.config import PrivacyConfig, TrainConfig
from fl.data.sites import DataError, DataWarning, load_federated
from fl.training.loop import Federation


def site_frame(seed: int, n: int = 60, *, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(50 + shift, 10, n)
    smoker = rng.choice(["yes", "no"], n)
    logit = 0.1 * (age - 50) + 1.5 * (smoker == "yes") - 0.7
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "sick", "well")
    return pd.DataFrame({"age": age, "bp": rng.normal(120, 15, n), "smoker": smoker, "outcome": y})


def write_sites(folder: Path, frames: dict[str, pd.DataFrame]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        paths[name] = folder / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    return paths


def config_for(paths: dict[str, Path], **kw: object) -> TrainConfig:
    sites = tuple((n, str(p)) for n, p in paths.items())
    return replace(TrainConfig(target="outcome", rounds=1, seed=0), sites=sites, **kw)  # type: ignore[arg-type]


def test_cli_sites_dir_names_sites_in_report_and_one_hots_categories(tmp_path: Path) -> None:
    write_sites(tmp_path / "sites", {"north": site_frame(0), "south": site_frame(1, shift=5), "east": site_frame(2)})
    report = tmp_path / "r.json"
    rc = main(["train", "--sites", str(tmp_path / "sites"), "--target", "outcome", "--rounds", "2", "--quiet",
               "--report", str(report)])
    assert rc == 0
    out = json.loads(report.read_text())
    assert out["sites"] == {"0": "east", "1": "north", "2": "south"}
    pre = out["ledger"][0]
    assert pre["round"] == 0 and pre["stage"] == "preprocessing"
    assert pre["guarantees"][0]["layer"] == "federated-statistics"


def test_cli_site_flags_and_test_site(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0), "b": site_frame(1), "server": site_frame(9, n=40)})
    fed_args = ["train", "--site", f"a={paths['a']}", "--site", f"b={paths['b']}", "--test-site",
                f"server={paths['server']}", "--target", "outcome", "--rounds", "1", "--quiet",
                "--report", str(tmp_path / "r.json")]
    assert main(fed_args) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["sites"] == {"0": "a", "1": "b"}
    fed = Federation(config_for({"a": paths["a"], "b": paths["b"]}, test_site=f"server={paths['server']}"))
    assert len(fed.y_test) == 40 and [len(p) for p in fed.parts] == [60, 60]  # sites keep all their rows


def test_held_out_rows_come_from_each_site(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0, n=50), "b": site_frame(1, n=100)})
    data = load_federated(config_for(paths, test_fraction=0.2))
    assert [len(p) for p in data.parts] == [40, 80]
    assert len(data.y_test) == 30  # the union of each site's own held-out 20%
    assert data.site_names == ("a", "b")
    assert data.feature_names == ("age", "bp", "smoker=no", "smoker=yes")  # shared vocabulary, one-hot


def test_api_with_dp_adds_the_statistics_to_the_ledger(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0), "b": site_frame(1), "c": site_frame(2)})
    cfg = config_for(paths, categories=(("smoker", ("yes", "no")),), stats_epsilon=0.7,
                     privacy=PrivacyConfig(spec="dp-sgd,secagg+", dpsgd_noise_multiplier=1.0))
    fed = Federation(cfg)
    entry = fed.ledger.entries[0]
    g = entry["guarantees"][0]
    assert entry["stage"] == "preprocessing" and g["params"]["unit"] == "example"
    assert g["params"]["epsilon"] == pytest.approx(0.7, abs=1e-3) and g["params"]["sum"] == "secagg+"
    with pytest.raises(DataError, match="--categories smoker="):
        Federation(replace(cfg, categories=()))


# ---- bad input, one test per case ------------------------------------------------------------------
def test_site_with_no_rows(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0), "empty": site_frame(1).iloc[:0]})
    with pytest.raises(DataError, match=r"\['empty'\] have no rows"):
        load_federated(config_for(paths))


def test_columns_differ_across_sites(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0), "b": site_frame(1).drop(columns=["bp"]).assign(zip=1)})
    with pytest.raises(DataError, match=r"'bp' missing at b; 'zip' missing at a.*--drop COL"):
        load_federated(config_for(paths))


def test_missing_values_are_refused_with_the_columns_or_handled(tmp_path: Path) -> None:
    b = site_frame(1)
    b.loc[3, "age"] = np.nan
    b.loc[5, "smoker"] = np.nan
    paths = write_sites(tmp_path, {"a": site_frame(0), "b": b})
    with pytest.raises(DataError, match=r"site 'b': missing values in column\(s\) \['age', 'smoker'\].*--missing"):
        load_federated(config_for(paths))
    dropped = load_federated(config_for(paths, missing="drop"))
    imputed = load_federated(config_for(paths, missing="impute"))
    assert len(imputed.y_train) == len(dropped.y_train) + 2
    assert "smoker=missing" in imputed.feature_names and np.isfinite(imputed.x_train).all()


def test_target_missing_at_a_site(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0), "b": site_frame(1).rename(columns={"outcome": "label"})})
    with pytest.raises(DataError, match=r"target column 'outcome' is missing at site\(s\) \['b'\]"):
        load_federated(config_for(paths))


def test_single_class_site_and_constant_column_warn(tmp_path: Path) -> None:
    a = site_frame(0).assign(const=3.0)
    b = site_frame(1).assign(const=3.0, outcome="sick")
    paths = write_sites(tmp_path, {"a": a, "b": b})
    with pytest.warns(DataWarning) as record:
        load_federated(config_for(paths))
    text = " ".join(str(w.message) for w in record)
    assert "site 'b' has a single class ('sick')" in text
    assert "['const'] are constant across all sites" in text


def test_heavily_imbalanced_classes_warn(tmp_path: Path) -> None:
    frames = {}
    for k in range(2):
        f = site_frame(k, n=100)
        f["outcome"] = np.where(np.arange(100) < 4, "rare", "common")
        frames[f"s{k}"] = f
    with pytest.warns(DataWarning, match="heavily imbalanced.*'rare'"):
        load_federated(config_for(write_sites(tmp_path, frames)))


def test_id_like_columns_are_not_features_unless_kept(tmp_path: Path) -> None:
    frames = {n: site_frame(k).assign(ID=np.arange(60), **{"Unnamed: 0": np.arange(60)})
              for k, n in enumerate("ab")}
    paths = write_sites(tmp_path, frames)
    with pytest.warns(DataWarning, match="'ID' looks like a row id.*--drop ID"):
        data = load_federated(config_for(paths))
    assert "ID" not in data.feature_names and "Unnamed: 0" not in data.feature_names
    kept = load_federated(config_for(paths, keep_columns=("ID",), drop_columns=("Unnamed: 0",)))
    assert "ID" in kept.feature_names and "Unnamed: 0" not in kept.feature_names


def test_numeric_site_id_column_is_never_a_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.normal(50, 10, 300), "hospital": rng.integers(1, 4, 300),
                       "outcome": rng.choice(["sick", "well"], 300)})
    path = tmp_path / "all.csv"
    df.to_csv(path, index=False)
    data = load_federated(TrainConfig(dataset=f"csv:{path}", target="outcome", partition="by-column:hospital",
                                      clients=3))
    assert data.feature_names == ("age",)
    assert data.site_names == ("1", "2", "3")


def test_partition_with_sites_is_refused(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, {"a": site_frame(0), "b": site_frame(1)})
    with pytest.raises(DataError, match="leave --partition out"):
        load_federated(config_for(paths, partition="dirichlet:0.5"))


def test_bad_site_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--site", "nopath", "--target", "y", "--quiet"]) == 2
    assert "--site expects NAME=PATH" in capsys.readouterr().err


def test_resume_reuses_the_released_statistics(tmp_path: Path) -> None:
    """A resumed run neither sums (and spends budget on) the statistics again nor standardizes differently."""
    from fl.training.loop import saved_statistics, train

    paths = write_sites(tmp_path / "s", {"a": site_frame(0), "b": site_frame(1)})
    cfg = config_for(paths, categories=(("smoker", ("yes", "no")),),
                     privacy=PrivacyConfig(spec="dp-sgd", dpsgd_noise_multiplier=1.0))
    first = Federation(cfg)
    first.run_round(1)
    first.save(tmp_path / "ck")
    stats = saved_statistics(tmp_path / "ck")
    assert stats is not None
    again = Federation(cfg, stats=stats)
    np.testing.assert_array_equal(again.data.x_train, first.data.x_train)
    assert not np.array_equal(Federation(cfg).data.x_train, first.data.x_train)  # fresh DP noise otherwise
    report = train(replace(cfg, rounds=2), checkpoint_dir=tmp_path / "ck", resume=True, baseline=False)
    assert [e["round"] for e in report["ledger"]] == [0, 1, 2]  # one preprocessing entry, not two
