"""Every name a module lists in ``__all__`` resolves (no stale exports)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ("secagg", "dp", "fl")


def all_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            if "._hazmat" in info.name or info.name.endswith("__main__"):
                continue
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", all_modules())
def test_all_names_resolve(name: str) -> None:
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:  # only the optional Flower extra may be absent
        if (exc.name or "").split(".")[0] != "flwr":
            raise
        pytest.skip(f"{name}: optional dependency flwr missing")
    for attr in getattr(mod, "__all__", ()):
        assert hasattr(mod, attr), f"{name}.__all__ lists {attr!r} but it does not exist"
