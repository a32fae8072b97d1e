"""Each SuperNode on its own data (``privagg flower supernode --data CSV --name SITE``).

The node reports its site name and CSV header (never a row) at the start of a run; a run whose sites'
columns differ is refused before any round, naming the columns; a node with its own data never loads
the bundled set a train job names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fl.runners.flower import FlowerJob, LocalCluster, supernode_command
from fl.runners.flower.processes import group_alive
from fl.runners.flower.site import SiteMismatchError, check_sites, hello_fields, read_header


def _csv(path: Path, columns: list[str], rows: int = 5) -> Path:
    path.write_text(",".join(columns) + "\n" + "\n".join(",".join(str(i + j) for j in range(len(columns)))
                                                          for i in range(rows)) + "\n")
    return path


def test_sites_with_different_columns_are_refused_naming_the_columns() -> None:
    hellos = {1: {"site": "a", "columns": ["age", "bp", "label"]}, 2: {"site": "b", "columns": ["age", "bp", "label"]},
              3: {"site": "c", "columns": ["Age", "bp", "label", "zip"]}}
    with pytest.raises(SiteMismatchError, match=r"site 'c' lacks \['age'\] and has extra \['Age', 'zip'\]"):
        check_sites(hellos)
    assert check_sites({1: hellos[1], 2: hellos[2]}) == {1: "a", 2: "b"}
    assert check_sites({1: {"cid": 0}, 2: {"cid": 1}}) == {}  # no node has its own data
    with pytest.raises(SiteMismatchError, match="claim site name"):
        check_sites({1: hellos[1], 2: {**hellos[2], "site": "a"}})
    with pytest.raises(SiteMismatchError, match="no own data while others do"):
        check_sites({1: hellos[1], 2: {"cid": 1}})


def test_a_node_reads_only_its_header_and_refuses_a_bad_file(tmp_path: Path) -> None:
    path = _csv(tmp_path / "hospital-a.csv", ["age", "bp", "label"])
    assert read_header(path) == ("age", "bp", "label")
    assert hello_fields({"data-path": str(path)}) == {"site": "hospital-a", "columns": ["age", "bp", "label"]}
    assert hello_fields({"data-path": str(path), "site-name": "h-a"})["site"] == "h-a"
    assert hello_fields({}) == {}
    (tmp_path / "dup.csv").write_text("a,b,a\n1,2,3\n")
    with pytest.raises(ValueError, match=r"\['a'\] more than once"):
        read_header(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="cannot read"):
        read_header(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="no header row"):
        read_header(tmp_path / "empty.csv")


def test_supernode_command_and_cli_carry_the_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli import flower as flower_cli

    path = _csv(tmp_path / "site.csv", ["x", "label"])
    cmd = supernode_command(superlink="127.0.0.1:1", partition=(0, 2), state_key=tmp_path / "k", data=path,
                            site="hospital-a")
    assert f'data-path="{path}" site-name="hospital-a"' in cmd[cmd.index("--node-config") + 1]
    parser = argparse.ArgumentParser(prog="privagg flower")
    flower_cli.add_arguments(parser)
    bad = parser.parse_args(["--home", str(tmp_path / "h"), "supernode", "--partition", "0/2", "--insecure",
                             "--data", str(tmp_path / "nope.csv"), "--name", "hospital-a"])
    assert flower_cli.run(bad) == 2 and "cannot read the site's CSV" in capsys.readouterr().err
    no_data = parser.parse_args(["--home", str(tmp_path / "h"), "supernode", "--partition", "0/2", "--insecure",
                                 "--name", "hospital-a"])
    assert flower_cli.run(no_data) == 2 and "give --data too" in capsys.readouterr().err


@pytest.mark.flower
@pytest.mark.slow
def test_supernodes_on_their_own_data_over_flower(tmp_path: Path) -> None:
    """3 SuperNodes, each with its own CSV: mismatched columns refuse the run at its start (naming them); once
    the columns agree the run completes; a train job that does not name the label column of the nodes' CSVs is
    refused by them (they never load the bundled set the job names)."""
    cols = ["age", "bp", "label"]
    files = [_csv(tmp_path / f"h{i}.csv", cols) for i in range(3)]
    _csv(files[2], ["Age", "bp", "label"])
    sites = [(f"hospital-{'abc'[i]}", f) for i, f in enumerate(files)]
    c = LocalCluster(tmp_path / "cluster", 3, tls=True, fleet_poll=0.1, sites=sites)
    try:
        c.start(timeout=60)
        job = FlowerJob(task="sum", clients=3, size=64, rounds=1, out=str(tmp_path / "o1"), join_timeout=60)
        with pytest.raises(RuntimeError, match=r"site 'hospital-c' lacks \['age'\] and has extra \['Age'\]"):
            c.run(job, timeout=120)
        _csv(files[2], cols)  # the operator fixes the file: the node reads its header again at the next run
        ok = c.run(FlowerJob(task="sum", clients=3, size=64, rounds=1, out=str(tmp_path / "o2"), join_timeout=60),
                   timeout=120)
        assert ok["rounds"][0]["exact"] is True
        train = FlowerJob(task="train", out=str(tmp_path / "o3"), join_timeout=60,
                          config={"dataset": "breast_cancer", "clients": 3, "rounds": 1,
                                  "privacy": {"spec": "clip,secagg+", "clip": 1.0, "threshold": 0.7}})
        with pytest.raises(RuntimeError, match="own data is unusable for the job: name the label column with --target"):
            c.run(train, timeout=120)  # the node reads its own CSV only, never the bundled set the job names
        assert not (Path(train.out) / "result.json").exists()
    finally:
        c.stop()
        started = [p.pid for p in [c.superlink, *c.nodes.values()] if p is not None]
        assert started and not [pid for pid in started if group_alive(pid)]
