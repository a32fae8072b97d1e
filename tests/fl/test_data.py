"""Bundled loaders, user CSVs with their errors, and the partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl.data.sites import DataError, load_dataset, partition


@pytest.mark.parametrize(("name", "rows", "classes"), [("breast_cancer", 569, 2), ("digits", 1797, 10),
                                                       ("credit_default", 10000, 2)])
def test_bundled_loaders(name: str, rows: int, classes: int) -> None:
    d = load_dataset(name, seed=0)
    assert len(d.y_train) + len(d.y_test) == rows
    assert d.num_classes == classes
    # standardized on the training split only
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0, atol=1e-4)
    assert abs(float(d.x_test.mean())) > 1e-6


def write_csv(tmp_path: Path, df: pd.DataFrame) -> str:
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    return f"csv:{path}"


def test_user_csv_with_site_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.normal(50, 10, 300), "bp": rng.normal(120, 15, 300),
                       "hospital": rng.choice(["north", "south", "east"], 300),
                       "outcome": rng.choice(["sick", "well"], 300)})
    d = load_dataset(write_csv(tmp_path, df), target="outcome", keep_columns=("hospital",))
    assert d.feature_names == ("age", "bp")
    parts = partition(d, "by-column:hospital", 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(d.y_train)))
    assert {d.groups["hospital"][p[0]] for p in parts} == {"north", "south", "east"}
    with pytest.raises(DataError, match="--clients 3"):
        partition(d, "by-column:hospital", 5)


def test_csv_errors_name_the_fix(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "city": ["x", "y", "x", "y"], "y": [0, 1, 0, 1]})
    name = write_csv(tmp_path, df)
    with pytest.raises(DataError, match="--target"):
        load_dataset(name)
    with pytest.raises(DataError, match="columns are"):
        load_dataset(name, target="label")
    with pytest.raises(DataError, match="test share"):
        load_dataset(name, target="y")  # 4 rows cannot hold out a stratified share
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")


def test_dirichlet_is_label_skewed_and_unequal() -> None:
    d = load_dataset("digits", seed=0)
    parts = partition(d, "dirichlet:0.3", 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(d.y_train)))
    sizes = [len(p) for p in parts]
    assert max(sizes) > 1.5 * min(sizes)
    hists = np.array([np.bincount(d.y_train[p], minlength=10) / len(p) for p in parts])
    assert hists.max(axis=1).mean() > 0.3  # iid would be ~0.1 per class


def test_bad_partitions() -> None:
    d = load_dataset("breast_cancer", seed=0)
    with pytest.raises(DataError, match="choose iid"):
        partition(d, "round-robin", 3)
    with pytest.raises(DataError, match=r"dirichlet:0\.5"):
        partition(d, "dirichlet:abc", 3)
    with pytest.raises(DataError, match="fewer clients"):
        partition(d, "dirichlet:0.01", 200, min_size=2)
    assert [len(p) for p in partition(d, "iid", 4)] == [114, 114, 114, 113]
