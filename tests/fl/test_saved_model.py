"""A user's own module out (FederatedResult.save) and back in without its class (fl.load_model), safely.

The adversary of the loading tests wrote the model directory: a planted pickle, a program whose graph
calls something other than an aten operator, guard code, a shape expression that sympify would eval.
Each must be refused before any of it runs (the marker file a payload would write never appears).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import fl
from fl.cli.main import main
from fl.data.stats import DataError
from fl.saved import PROGRAM, check_program

ROOT = Path(__file__).resolve().parents[2]

USER_CNN = '''
import torch
from torch import nn


class UserCNN(nn.Module):
    """A user's own conv net on 8x8 digits fed as flat rows of 64 pixels."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x.view(-1, 1, 8, 8)))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))
'''


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    """A UserCNN (from a module only this process can import) trained by fl.train and saved."""
    home = tmp_path_factory.mktemp("usercode")
    (home / "usercnn_for_save_test.py").write_text(USER_CNN)
    sys.path.insert(0, str(home))
    try:
        user = importlib.import_module("usercnn_for_save_test")
    finally:
        sys.path.remove(str(home))
    x, y = _digits()
    torch.manual_seed(0)
    result = fl.train(model=user.UserCNN(), sites={"north": (x[:700], y[:700]), "south": (x[700:1400], y[700:1400])},
                      rounds=2, evaluation=(x[1400:], y[1400:]), seed=0)
    directory = result.save(tmp_path_factory.mktemp("saved") / "model")
    return result, directory, x[1400:]


def _reference(result: Any, x: np.ndarray) -> np.ndarray:
    model = result.model.eval()
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(x)).numpy()
    return out


def test_a_user_cnn_predicts_identically_in_a_fresh_process_without_its_class(
    trained: tuple[Any, Path, np.ndarray], tmp_path: Path
) -> None:
    result, directory, x = trained
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, fl\n"
        "saved = fl.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], saved(np.load(sys.argv[2])).numpy())\n"
        "assert not any('usercnn' in m for m in sys.modules), 'the user class was imported'\n"
        "try:\n    import usercnn_for_save_test\nexcept ImportError:\n    print('class not importable')\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(directory), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npy")], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "class not importable" in done.stdout  # the fresh process could not have used the class
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _reference(result, x), atol=1e-6, rtol=0)
    meta = json.loads((directory / "model.json").read_text())
    assert meta["architecture"]["kind"] == "custom" and meta["architecture"]["program"] == PROGRAM
    assert meta["architecture"]["class"] == "usercnn_for_save_test.UserCNN"
    assert meta["privacy"]["pipeline"] == "plain-sum" and meta["privacy"]["guarantees"]


def test_the_loaded_program_takes_any_batch_size(trained: tuple[Any, Path, np.ndarray]) -> None:
    result, directory, x = trained
    saved = fl.load_model(directory)
    for n in (1, 3, len(x)):
        np.testing.assert_allclose(saved(x[:n]).numpy(), _reference(result, x[:n]), atol=1e-6, rtol=0)
    assert saved.predict(x[:2]) == [str(int(k)) for k in _reference(result, x[:2]).argmax(1)]


def test_privagg_predict_runs_the_saved_program(trained: tuple[Any, Path, np.ndarray], tmp_path: Path) -> None:
    result, directory, x = trained
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(64)]).assign(row_id=np.arange(len(x)))
    frame.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--model", str(directory), "--data", str(tmp_path / "new.csv"), "--ignore", "row_id",
                 "--out", str(tmp_path / "preds.csv")]) == 0
    preds = pd.read_csv(tmp_path / "preds.csv")
    expected = torch.softmax(torch.from_numpy(_reference(result, x)), dim=1).numpy()
    np.testing.assert_allclose(preds[[f"probability_{k}" for k in range(10)]].to_numpy(), expected, atol=1e-6)


def test_module_given_receives_the_weights(trained: tuple[Any, Path, np.ndarray]) -> None:
    result, directory, x = trained
    user = sys.modules["usercnn_for_save_test"]
    saved = fl.load_model(directory, module=user.UserCNN())
    np.testing.assert_allclose(saved(x).numpy(), _reference(result, x), atol=1e-6, rtol=0)
    with pytest.raises(DataError, match=r"does not fit the UserCNN you passed.*pass the module"):
        fl.load_model(directory, module=user.UserCNN(width=4))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot take it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_a_module_torch_export_cannot_take_is_saved_as_weights_and_asks_for_the_class(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    result = fl.train(model=Branchy(), sites=[(x[:60], y[:60]), (x[60:], y[60:])], rounds=1)
    with caplog.at_level("WARNING"):
        directory = result.save(tmp_path / "m", example_input=x[:4])
    assert "module=YourClass" in caplog.text
    assert not (directory / PROGRAM).exists() and (directory / "weights.pt").is_file()
    with pytest.raises(DataError, match=r"load with load_model\(DIR, module=YourClass"):
        fl.load_model(directory)
    saved = fl.load_model(directory, module=Branchy())
    with torch.no_grad():
        np.testing.assert_allclose(saved(x).numpy(), result.model.eval()(torch.from_numpy(x)).numpy(), atol=1e-6)


# ---- the adversary wrote the directory ---------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "ran"))


def _copy(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    out.mkdir()
    for f in directory.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _rewrite(program: Path, suffix: str, change: Callable[[bytes], bytes]) -> None:
    """Replace the archive entry ending in ``suffix`` by ``change(its bytes)``."""
    with zipfile.ZipFile(program) as archive:
        entries = [(i.filename, archive.read(i.filename)) for i in archive.infolist()]
    with zipfile.ZipFile(program, "w") as archive:
        for name, data in entries:
            archive.writestr(name, change(data) if name.endswith(suffix) else data)


def _graph_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        program = json.loads(data)
        edit(program)
        return json.dumps(program).encode()
    return change


def test_a_planted_pickle_as_the_program_is_refused(trained: tuple[Any, Path, np.ndarray], tmp_path: Path) -> None:
    copy = _copy(trained[1], tmp_path)
    marker = tmp_path / "pwned"
    (copy / PROGRAM).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataError, match=r"not a readable exported program.*save the model again"):
        fl.load_model(copy)
    assert not marker.exists()


def test_a_pickle_planted_in_the_sample_inputs_is_refused(trained: tuple[Any, Path, np.ndarray],
                                                          tmp_path: Path) -> None:
    """torch.export.load alone retries these with weights_only=False and would run the payload."""
    copy = _copy(trained[1], tmp_path)
    marker = tmp_path / "pwned"

    def plant(_: bytes) -> bytes:
        buffer = io.BytesIO()
        torch.save(_Payload(marker), buffer)
        return buffer.getvalue()

    _rewrite(copy / PROGRAM, "data/sample_inputs/model.pt", plant)
    with pytest.raises(DataError, match="sample inputs are not plain tensors"):
        fl.load_model(copy)
    assert not marker.exists()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.load"), "calls 'torch.load'"),
    (lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.ops.aten.from_file.default"),
     "from_file"),
    (lambda p: p.update(guards_code=["__import__('os').system('true')"]), "guard code"),
    (lambda p: p["range_constraints"].update({"__import__('os').system('true')": {"min_val": 1, "max_val": None}}),
     "shape expression"),
    (lambda p: p["graph_module"]["graph"]["custom_obj_values"].update(obj={"class_fqn": "x"}), "custom objects"),
], ids=["non-aten-call", "file-reading-op", "guard-code", "sympify-injection", "custom-object"])
def test_a_graph_that_could_run_code_is_refused(trained: tuple[Any, Path, np.ndarray], tmp_path: Path,
                                                edit: Callable[[dict[str, Any]], None], match: str) -> None:
    copy = _copy(trained[1], tmp_path)
    _rewrite(copy / PROGRAM, "models/model.json", _graph_edit(edit))
    with pytest.raises(DataError, match=match):
        check_program(copy / PROGRAM)
    with pytest.raises(DataError, match="save the model again"):
        fl.load_model(copy)


def test_unexpected_archive_entries_and_pickled_weights_are_refused(trained: tuple[Any, Path, np.ndarray],
                                                                    tmp_path: Path) -> None:
    copy = _copy(trained[1], tmp_path)
    with zipfile.ZipFile(copy / PROGRAM, "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/data/constants/custom_obj_0", b"x")
    with pytest.raises(DataError, match="unexpected entries"):
        fl.load_model(copy)
    copy2 = _copy(trained[1], tmp_path, "second")

    def pickled(data: bytes) -> bytes:
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    _rewrite(copy2 / PROGRAM, "model_weights_config.json", pickled)
    with pytest.raises(DataError, match="stored as a pickle"):
        fl.load_model(copy2)


@pytest.mark.parametrize("victim", [PROGRAM, "weights.pt", "model.json"])
def test_a_truncated_file_gives_an_error_naming_the_fix(trained: tuple[Any, Path, np.ndarray], tmp_path: Path,
                                                        victim: str) -> None:
    copy = _copy(trained[1], tmp_path)
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 2])
    module = sys.modules["usercnn_for_save_test"].UserCNN() if victim == "weights.pt" else None
    with pytest.raises(DataError, match="save the model again"):
        fl.load_model(copy, module=module)


def test_an_example_input_of_another_dtype_and_one_row_still_exports(trained: tuple[Any, Path, np.ndarray],
                                                                      tmp_path: Path) -> None:
    result, _, x = trained
    directory = result.save(tmp_path / "m", example_input=x[:1].astype(np.float64))
    assert (directory / PROGRAM).is_file()
    np.testing.assert_allclose(fl.load_model(directory)(x).numpy(), _reference(result, x), atol=1e-6, rtol=0)


def test_what_we_write_passes_the_checks(trained: tuple[Any, Path, np.ndarray]) -> None:
    check_program(trained[1] / PROGRAM)  # raises if the checks refused a program torch.export.save wrote
    with zipfile.ZipFile(trained[1] / PROGRAM) as archive:
        assert not any("custom_obj" in n or n.endswith(".so") for n in archive.namelist())


def test_csv_sites_keep_their_preprocessing_for_a_user_module(tmp_path: Path) -> None:
    """CSV sites: the federated standardization and vocabulary are saved; predict applies them to raw rows."""
    rng = np.random.default_rng(1)
    paths = []
    for k in range(2):
        colour = rng.choice(["red", "green", "blue"], size=90)
        x = rng.normal(size=90) * 3 + 10
        label = ((colour == "red") ^ (x > 10)).astype(int)
        paths.append(tmp_path / f"site{k}.csv")
        pd.DataFrame({"x": x, "colour": colour, "label": label}).to_csv(paths[-1], index=False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    result = fl.train(model=net, sites=[str(p) for p in paths], target="label", rounds=2, seed=0)
    directory = result.save(tmp_path / "m")
    assert (directory / PROGRAM).is_file()
    new = pd.DataFrame({"x": [8.0, 12.0, 9.5], "colour": ["red", "blue", "green"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--model", str(directory), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    saved = fl.load_model(directory)
    assert saved.stats is not None and saved.meta["preprocessing"]["vocabulary"]["colour"] == ["blue", "green", "red"]
    with torch.no_grad():
        expected = torch.softmax(result.model.eval()(torch.from_numpy(saved.stats.transform(new))), dim=1).numpy()
    got = pd.read_csv(tmp_path / "p.csv")[["probability_0", "probability_1"]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
