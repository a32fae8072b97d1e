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


def test_fl_init_uses_static_imports_only() -> None:
    """No lazy ``__getattr__``, no function-level or conditional imports: what ``fl`` exports is plain."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / "fl" / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, ast.ImportFrom | ast.Assign | ast.Expr | ast.FunctionDef), ast.dump(node)[:80]
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and ((node.module or "").startswith("fl") or node.module == "typing")
        if isinstance(node, ast.FunctionDef):  # fl.train's dispatch: plain code, no import, no lazy lookup
            assert node.name != "__getattr__"
            assert not any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(node))


def test_import_fl_does_not_import_flower() -> None:
    import subprocess
    import sys

    code = "import sys, fl; print('flwr' in sys.modules or any(m.startswith('flwr.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
