"""The Flower versions privagg claims, pins, patches and tests must be one and the same set.

pyproject.toml allows a range (``flwr>=FLOOR,<CEIL``); ``constraints.txt`` pins the newest release for
the development environment and ``constraints-flwr-oldest.txt`` pins the floor for the second CI
environment (``make test-flower-oldest``). The fast SuperNode path patches Flower internals only on the
releases in :data:`fl.runners.flower.fast_node.PATCHED_FLOWER`. If someone bumps a pin or the range
without the others, these tests fail and say which file to fix.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fl.runners.flower import fast_node

ROOT = Path(__file__).resolve().parents[3]
NEWEST = ROOT / "constraints.txt"
OLDEST = ROOT / "constraints-flwr-oldest.txt"
# Packages whose pins may differ between the two files: Flower and what Flower's own metadata bounds
# differently between the two releases (flwr 1.41 needs uv<0.13; 1.42 needs uv>=0.13.5).
FLOWER_COUPLED = {"flwr", "uv"}


def _toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with path.open("rb") as fh:
        return dict(tomllib.load(fh))


def _pins(path: Path) -> dict[str, str]:
    """``name -> version`` of a pip constraints file (names normalised as pip does)."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin (NAME==VERSION)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _flwr_ranges() -> list[SpecifierSet]:
    """Every ``flwr`` requirement in pyproject's optional dependencies."""
    extras = _toml(ROOT / "pyproject.toml")["project"]["optional-dependencies"]
    found = [SpecifierSet(req[len("flwr"):]) for reqs in extras.values() for req in reqs
             if re.match(r"flwr\s*[<>=!~]", req)]
    assert found, "pyproject.toml names no flwr requirement in [project.optional-dependencies]"
    return found


def _floor(spec: SpecifierSet) -> Version:
    floors = [Version(s.version) for s in spec if s.operator == ">="]
    assert len(floors) == 1, f"the flwr range {spec} needs exactly one lower bound (>=)"
    return floors[0]


def test_pyproject_names_one_flower_range() -> None:
    ranges = _flwr_ranges()
    assert len(set(map(str, ranges))) == 1, f"the flwr extras disagree: {sorted(set(map(str, ranges)))}"


def test_installed_flower_is_within_pyprojects_range() -> None:
    import flwr

    spec = _flwr_ranges()[0]
    assert Version(flwr.__version__) in spec, f"installed flwr {flwr.__version__} is outside pyproject's {spec}"


@pytest.mark.parametrize("constraints", [NEWEST, OLDEST], ids=["newest", "oldest"])
def test_each_pinned_flower_is_allowed_and_patched(constraints: Path) -> None:
    pinned = Version(_pins(constraints)["flwr"])
    assert pinned in _flwr_ranges()[0], f"{constraints.name} pins flwr {pinned}, outside pyproject's range"
    assert fast_node.patch_supported(str(pinned)), (
        f"{constraints.name} pins flwr {pinned} but fast_node.PATCHED_FLOWER = {fast_node.PATCHED_FLOWER}: "
        "check the patched internals on that release, then add it to PATCHED_FLOWER"
    )


def test_oldest_environment_pins_the_floor() -> None:
    floor, pinned = _floor(_flwr_ranges()[0]), Version(_pins(OLDEST)["flwr"])
    assert pinned.release[:2] == floor.release[:2] and pinned >= floor, (
        f"{OLDEST.name} pins flwr {pinned}, but the oldest release pyproject allows is {floor}: pin that one"
    )
    assert Version(_pins(NEWEST)["flwr"]) > pinned, "constraints.txt must pin a newer Flower than the oldest pin"


def test_the_two_environments_differ_only_in_flower() -> None:
    newest, oldest = _pins(NEWEST), _pins(OLDEST)
    assert newest.keys() == oldest.keys(), f"packages pinned in only one file: {sorted(newest.keys() ^ oldest.keys())}"
    differ = {n for n in newest if newest[n] != oldest[n]}
    assert differ <= FLOWER_COUPLED, (
        f"{OLDEST.name} differs from constraints.txt in {sorted(differ - FLOWER_COUPLED)}: copy those pins over"
    )


def test_patched_releases_are_exactly_the_pinned_ones() -> None:
    """No untested release in the gate: every (major, minor) it lists is pinned by one CI environment."""
    pinned = {Version(_pins(p)["flwr"]).release[:2] for p in (NEWEST, OLDEST)}
    assert set(fast_node.PATCHED_FLOWER) <= pinned, (
        f"PATCHED_FLOWER {fast_node.PATCHED_FLOWER} lists releases no CI environment tests (pinned: {sorted(pinned)})"
    )


def test_ci_runs_the_oldest_flower_environment() -> None:
    makefile, ci = (ROOT / "Makefile").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "constraints-flwr-oldest.txt" in makefile and "test-flower-oldest:" in makefile
    assert re.search(r"^make test-flower-oldest\b", ci, re.M), ".ci/run must run `make test-flower-oldest`"


def test_installed_flower_has_every_internal_the_patch_and_pin_reach() -> None:
    """On a release in PATCHED_FLOWER, the internals fast_node and pin use are where they expect.

    Run in both CI environments, this is what makes a (major, minor) in the gate a tested claim: a
    release that moves one of them fails here instead of silently falling back to the stock loop.
    """
    import dataclasses
    import inspect
    import time

    import flwr
    import flwr.supercore.superexec.run_superexec as rs
    import flwr.supernode.start_client_internal as sci
    from flwr.common.config import get_fab_config, parse_config_args
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    assert fast_node.patch_supported(flwr.__version__)
    assert sci.__dict__.get("time") is time, "the SuperNode loop no longer reads time.sleep from its module"
    pull = inspect.signature(sci._pull_and_store_message).parameters
    assert {"receive", "get_fab", "state", "object_store"} <= pull.keys()
    assert callable(sci._insert_message) and callable(getattr(rs, "get_executor", None))
    assert all(callable(getattr(SubprocessExecutor, m, None))
               for m in ("get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"))
    spec_fields = {f.name for f in dataclasses.fields(ExecutionSpec)}
    assert {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path",
            "parent_pid"} <= spec_fields
    assert TaskType.CLIENT_APP and callable(LaunchResult.accepted)
    assert callable(flwr_clientapp) and callable(get_fab_config) and callable(parse_config_args)
