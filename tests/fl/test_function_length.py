"""Short functions (the guide's <= 60 lines) in the modules that hold the run's structure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("fl/training", "fl/privacy", "fl/pipeline.py", "fl/spec.py", "fl/errors.py", "fl/__init__.py")
LIMIT = 60


def _files() -> list[Path]:
    out: list[Path] = []
    for rel in CHECKED:
        path = ROOT / rel
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_function_is_longer_than_60_lines(path: Path) -> None:
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > LIMIT
    ]
    assert not long, f"{path.relative_to(ROOT)}: split {', '.join(long)}"
