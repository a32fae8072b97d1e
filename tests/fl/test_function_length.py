"""Short functions (the guide's <= 60 lines, issue #11): every function in the packages secagg/, dp/ and fl/.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (docstring and nested functions included;
decorators not), as :mod:`ast` reports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("secagg", "dp", "fl")
LIMIT = 60


def _files() -> list[Path]:
    """Every Python file of the three packages (sub-packages included)."""
    return [path for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))]


def _too_long(source: str, *, limit: int = LIMIT) -> list[str]:
    """``name (N lines)`` for each function or method in ``source`` longer than ``limit`` lines."""
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > limit
    ]


def test_every_package_is_checked() -> None:
    """The scan finds each package's files, so a moved or renamed package cannot pass by being skipped."""
    files = _files()
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py") in files, f"{pkg}/ is not scanned"
    assert len(files) > 50


def test_the_check_catches_a_long_function_and_method() -> None:
    """The counter flags a 61-line function and a 61-line method, and passes 60-line ones."""
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    method = "".join(f"        y{i} = {i}\n" for i in range(59))
    ok = f"def ok():\n{body}\n"  # def + 59 lines = 60
    long = f"def too_long():\n{body}    z = 0\n"
    cls = f"class C:\n    def m(self):\n{method}        z = 0\n"
    assert _too_long(ok) == []
    assert _too_long(long) == ["too_long (61 lines)"]
    assert _too_long(cls) == ["m (61 lines)"]
    assert _too_long(f"async def a():\n{body}    z = 0\n") == ["a (61 lines)"]


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_function_is_longer_than_60_lines(path: Path) -> None:
    """No function or method in this file exceeds the guide's 60 lines."""
    long = _too_long(path.read_text())
    assert not long, f"{path.relative_to(ROOT)}: split {', '.join(long)}"
