"""Model out and back in: --save-model writes weights + preprocessing; predict reproduces the in-process model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from fl.cli.main import main
from fl.cli.predict import load_model, predict_frame, save_model
from fl.config import TrainConfig
from fl.data.stats import DataError
from fl.training.loop import Federation, train


def _train_and_save(config: TrainConfig, directory: Path) -> Federation:
    seen: list[Federation] = []

    def keep(fed: Federation, report: dict[str, Any]) -> None:
        save_model(fed, directory, report=report)
        seen.append(fed)

    train(config, baseline=False, on_finish=keep)
    return seen[0]


def _in_process(fed: Federation, frame: pd.DataFrame) -> np.ndarray:
    assert fed.data.stats is not None
    with torch.no_grad():
        return torch.softmax(fed.model(torch.from_numpy(fed.data.stats.transform(frame))), dim=1).numpy()


def test_saved_model_round_trip_predicts_like_the_in_process_model(tmp_path: Path) -> None:
    fed = _train_and_save(TrainConfig(dataset="breast_cancer", model="mlp", hidden=8, clients=3, rounds=2, seed=0),
                          tmp_path / "model")
    frame = load_breast_cancer(as_frame=True).frame
    frame.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "preds.csv")]) == 0
    preds = pd.read_csv(tmp_path / "preds.csv")
    expected = _in_process(fed, frame)
    np.testing.assert_allclose(preds[["probability_0", "probability_1"]].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert (preds["prediction"].to_numpy() == expected.argmax(1)).all()
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["architecture"] == {"kind": "mlp", "hidden": 8, "num_features": 30, "num_classes": 2,
                                    "input_shape": [30], "input_dtype": "float32"}
    assert meta["features"] == list(frame.columns[:-1])
    assert len(meta["preprocessing"]["mean"]) == 30 and meta["classes"] == ["0", "1"]


@pytest.mark.parametrize("model", ["cnn", "mlp-ln"])
def test_every_cli_model_family_round_trips(tmp_path: Path, model: str) -> None:
    """cnn and mlp-ln are saved too (rebuilt from the JSON), and predict gives the in-process numbers."""
    fed = _train_and_save(TrainConfig(dataset="digits", model=model, hidden=16, clients=2, rounds=1, seed=0),
                          tmp_path / "m")
    frame = load_digits(as_frame=True).frame.iloc[:200]
    frame.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "preds.csv")]) == 0
    preds = pd.read_csv(tmp_path / "preds.csv")
    np.testing.assert_allclose(preds[[f"probability_{k}" for k in range(10)]].to_numpy(), _in_process(fed, frame),
                               rtol=1e-6, atol=1e-7)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["architecture"]["kind"] == model and not (tmp_path / "m" / "program.pt2").exists()
    assert [g["layer"] for g in meta["privacy"]["guarantees"]] == ["federated-statistics", "plain-sum"]


def test_a_version_1_directory_still_loads(tmp_path: Path) -> None:
    _train_and_save(TrainConfig(rounds=1, clients=2), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["version"] = 1
    for key in ("input_shape", "input_dtype"):
        del meta["architecture"][key]
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    frame = load_breast_cancer(as_frame=True).frame
    assert len(predict_frame(load_model(tmp_path / "m"), frame)) == len(frame)


def test_categorical_sites_round_trip_with_the_shared_vocabulary(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sites = []
    for k in range(2):
        n = 80
        colour = rng.choice(["red", "green", "blue"], size=n)
        x = rng.normal(size=n) * 3 + 10
        label = np.where((colour == "red") ^ (x > 10), "yes", "no")
        path = tmp_path / f"s{k}.csv"
        pd.DataFrame({"x": x, "colour": colour, "label": label}).to_csv(path, index=False)
        sites.append((f"s{k}", str(path)))
    fed = _train_and_save(TrainConfig(sites=tuple(sites), target="label", rounds=3, seed=0), tmp_path / "m")
    new = pd.DataFrame({"x": [8.0, 12.0, 9.0], "colour": ["red", "blue", "green"], "label": ["yes", "yes", "no"]})
    saved = load_model(tmp_path / "m")
    assert saved.meta["preprocessing"]["vocabulary"]["colour"] == ["blue", "green", "red"]
    got = predict_frame(saved, new)
    np.testing.assert_allclose(got[["probability_no", "probability_yes"]].to_numpy(), _in_process(fed, new),
                               rtol=1e-6, atol=1e-7)


def test_train_cli_writes_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "saved"
    assert main(["train", "--rounds", "1", "--no-baselines", "--quiet", "--save-model", str(out)]) == 0
    assert (out / "weights.pt").is_file() and (out / "model.json").is_file()
    assert "privagg predict --model" in capsys.readouterr().out


def test_predict_refuses_a_csv_whose_columns_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train_and_save(TrainConfig(rounds=1, clients=2), tmp_path / "m")
    frame = load_breast_cancer(as_frame=True).frame.drop(columns=["mean radius"]).assign(hospital=1)
    frame.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err
    assert "missing ['mean radius']" in err and "not in training ['hospital']" in err
    saved = load_model(tmp_path / "m")
    with pytest.raises(DataError, match="missing"):  # --ignore allows the id column, the feature stays missing
        predict_frame(saved, frame, allow=["hospital"])
    full = load_breast_cancer(as_frame=True).frame.assign(hospital=1)
    assert len(predict_frame(saved, full, allow=["hospital"])) == len(full)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "ran"))


def test_weights_are_loaded_as_tensors_only(tmp_path: Path) -> None:
    _train_and_save(TrainConfig(rounds=1, clients=2), tmp_path / "m")
    marker = tmp_path / "pwned"
    with open(tmp_path / "m" / "weights.pt", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with pytest.raises(DataError, match="not a plain tensor file"):
        load_model(tmp_path / "m")
    assert not marker.exists(), "loading the weights ran code from the file"
