"""Protocol tests need no ``fl``: no module under tests/secagg imports it (driving is secagg's own)."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_secagg_test_imports_fl() -> None:
    offenders = {
        p.name: sorted(m for m in _imports(p) if m == "fl" or m.startswith("fl."))
        for p in sorted(HERE.glob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, f"move fl glue tests to tests/fl/sums/: {offenders}"
    assert len(list(HERE.glob("test_*.py"))) >= 10  # the check saw the suite
