"""Every name a module lists in ``__all__`` resolves (no stale exports)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

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


# ---- fl's curated public API --------------------------------------------------------------------
FL_PUBLIC = {
    "train", "Federation", "ClientSide", "ServerSide", "TrainConfig", "PrivacyConfig",
    "Pipeline", "BoundPipeline", "Clip", "Quantize", "GaussianNoise",
    "PlainSum", "SecAgg", "SecAggPlus", "PaillierSum",
    "Layer", "SecureSum", "ValueSpec", "RoundInfo", "Guarantee", "TrainResult",
    "STAGES", "Stage", "PrivacyPlan", "build_plan", "Ledger", "DpSgdTrainer", "PlainTrainer",
    "CompositionError", "DataError", "NonFiniteUpdateError", "BudgetExhaustedError", "CheckpointError",
    "TrainingInterrupted",
    "FederatedResult", "DPSGD", "DpRelease", "secure_sum", "private_sum",  # fl.api: plain objects in
    "load_model",  # fl.saved: a saved model back, without the user's class
}


def test_fl_train_takes_a_config_or_plain_objects() -> None:
    import inspect

    import fl
    import fl.api
    import fl.training.loop

    assert next(iter(inspect.signature(fl.train).parameters)) == "config"  # train(config): the CLI's path
    assert fl.secure_sum is fl.api.secure_sum and fl.FederatedResult is fl.api.FederatedResult


def test_fl_exports_the_curated_api_and_every_name_resolves() -> None:
    import fl

    assert set(fl.__all__) == FL_PUBLIC and len(fl.__all__) == len(FL_PUBLIC)
    for name in fl.__all__:
        assert getattr(fl, name) is not None


def test_fl_errors_are_one_module_re_exported_where_they_were() -> None:
    import fl.data.stats
    import fl.errors
    import fl.spec
    import fl.training.loop

    assert fl.spec.CompositionError is fl.errors.CompositionError
    assert fl.data.stats.DataError is fl.errors.DataError
    for name in ("BudgetExhaustedError", "CheckpointError", "NonFiniteUpdateError", "TrainingInterrupted"):
        assert getattr(fl.training.loop, name) is getattr(fl.errors, name)
    errors = [getattr(fl.errors, n) for n in fl.errors.__all__]
    assert all(isinstance(e, type) and issubclass(e, BaseException) for e in errors)


def _fl_init_tree() -> ast.Module:
    return ast.parse((Path(__file__).resolve().parents[1] / "fl" / "__init__.py").read_text())


def _type_checking_imports(tree: ast.Module) -> set[tuple[str, str]]:
    """``(home module, name)`` for every import in ``fl/__init__``'s ``if TYPE_CHECKING:`` block."""
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    assert all(isinstance(n, ast.ImportFrom) for n in block.body) and not block.orelse
    return {(n.module or "", a.name) for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}


def _static_chain(tree: ast.Module) -> dict[str, str]:
    """``_home_module``'s branches: the home it compares with -> the module its static import loads."""
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_home_module"]
    chain: dict[str, str] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            (imp,) = node.body
            assert isinstance(imp, ast.ImportFrom) and imp.level == 0, ast.dump(imp)[:80]
            (alias,) = imp.names
            chain[ast.literal_eval(node.test.comparators[0])] = f"{imp.module}.{alias.name}"
    return chain


def test_fl_init_is_lazy_with_static_imports_only() -> None:
    """``fl/__init__`` (PEP 562): the lazy table, the ``TYPE_CHECKING`` imports and the static import chain
    name exactly the same (home, name) pairs; only static ``from fl... import`` statements, no importlib."""
    import fl

    tree = _fl_init_tree()
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.Name) and node.id in {"importlib", "__import__", "import_module"})
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert all(m.split(".")[0] in {"fl", "typing", "types", "__future__"} for m in modules), ast.dump(node)
            assert not isinstance(node, ast.ImportFrom) or node.level == 0
    lazy = {(home, name) for home, names in fl._HOMES.items() for name in names}
    assert _type_checking_imports(tree) == lazy
    assert {name for _, name in lazy} == set(fl.__all__) - {"train"} and len(lazy) == len(fl.__all__) - 1
    assert _static_chain(tree) == {home: home for home in fl._HOMES}


def test_every_fl_name_is_the_object_of_its_home_module() -> None:
    import importlib

    import fl

    for home, names in fl._HOMES.items():
        module = importlib.import_module(home)
        for name in names:
            assert getattr(fl, name) is getattr(module, name), f"fl.{name} is not {home}.{name}"
            assert fl.__dict__[name] is getattr(module, name)  # cached: the next access is a plain lookup
    assert set(fl.__all__) <= set(dir(fl))


def test_fl_unknown_names_fail_and_monkeypatching_fl_names_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    import fl
    import fl.layers.clip

    with pytest.raises(AttributeError, match="no attribute 'Cilp'"):
        fl.Cilp  # noqa: B018  # a typo is an AttributeError, not a lazy import by that name
    with pytest.raises(AttributeError):
        fl.api_train  # noqa: B018
    sentinel = object()
    with monkeypatch.context() as m:
        m.setattr(fl, "Clip", sentinel)
        assert fl.Clip is sentinel
    assert fl.Clip is fl.layers.clip.Clip


def test_import_fl_does_not_import_flower() -> None:
    import subprocess
    import sys

    code = "import sys, fl; print('flwr' in sys.modules or any(m.startswith('flwr.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
