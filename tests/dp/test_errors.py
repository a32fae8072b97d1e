"""dp.errors: every refusal in dp is a DPError that is still the builtin it replaced, and names the fix.

Regression (issue 11, "one errors module per package"): before dp/errors.py, dp raised bare ValueError,
TypeError and AssertionError, so a caller could not tell dp's refusals from any other ValueError. Every
test below fails on that code (``pytest.raises(<dp class>)`` does not match a bare ValueError, and the
static test finds the 53 bare raises).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dp
import dp.errors
from dp.accounting import Accountant, GaussianStep, calibrate_noise, event_from_json
from dp.audit import Claim, assert_below, audit_dp_sgd, audit_gaussian_mechanism, canary_audit, gdp_mu_interval
from dp.errors import (
    AccountingError,
    AuditFailedError,
    AuditInputError,
    CalibrationError,
    DPError,
    InputError,
    PerSampleModeError,
    PrivacyParameterError,
    SignatureError,
)
from dp.mechanisms import GaussianMechanism, clip_l2
from dp.rng import SecureRandom
from dp.sgd import dp_sgd, resolve_mode

DP_DIR = Path(dp.__file__).parent
BUILTIN: dict[type[DPError], type[Exception]] = {
    PrivacyParameterError: ValueError,
    CalibrationError: ValueError,
    AccountingError: ValueError,
    PerSampleModeError: ValueError,
    InputError: ValueError,
    AuditInputError: ValueError,
    SignatureError: TypeError,
    AuditFailedError: AssertionError,
}


def _tiny_dp_sgd(**kw: Any) -> None:
    model = torch.nn.Linear(3, 2)
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    args: dict[str, Any] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "batch_size": 2, "steps": 1, **kw}
    dp_sgd(model, x, y, rng=SecureRandom.for_testing("errors"), **args)


def _lacks_keywords(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """A training function without DP-SGD's keywords: the audit must refuse it, not train blindly."""


# (the call with bad input, the class it must raise, a fragment of the fix its message must name)
BAD_CALLS: list[tuple[str, Callable[[], object], type[DPError], str]] = [
    ("negative noise", lambda: GaussianStep(-1.0, 0.1), PrivacyParameterError, "0 for no noise"),
    ("sample rate > 1", lambda: GaussianStep(1.0, 1.5), PrivacyParameterError, "fraction of"),
    ("epsilon 0", lambda: calibrate_noise(epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=10),
     PrivacyParameterError, "epsilon=1.0"),
    ("delta 1", lambda: Accountant().epsilon(1.0), PrivacyParameterError, "e.g. 1e-5"),
    ("clip 0", lambda: clip_l2(np.ones(3), 0.0), PrivacyParameterError, "bound=1.0"),
    ("sigma 0", lambda: GaussianMechanism(sensitivity=1.0, noise_multiplier=0.0), PrivacyParameterError,
     "calibrate_noise"),
    ("max_grad_norm inf", lambda: _tiny_dp_sgd(max_grad_norm=math.inf), PrivacyParameterError,
     "max_grad_norm=1.0"),
    ("claimed delta 0", lambda: Claim(epsilon=1.0, delta=0.0), PrivacyParameterError, "the code claims"),
    ("budget already spent", lambda: calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=1,
                                                     extra=[(GaussianStep(0.5, 1.0), 100)]),
     CalibrationError, "raise the budget"),
    ("claim without epsilon", lambda: Claim(epsilon=None, delta=1e-5).noise_multiplier(), CalibrationError,
     "Claim(epsilon=...)"),
    ("unknown accountant", lambda: Accountant(accountant="gdp"), AccountingError, "use 'pld'"),  # type: ignore[arg-type]
    ("event class outside the whitelist", lambda: event_from_json({"class_name": "os.system"}), AccountingError,
     "recompute it"),
    ("fixed cohort without population",
     lambda: calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=1, sampling="fixed"),
     AccountingError, "sampling='poisson'"),
    ("unknown per-sample mode", lambda: resolve_mode(torch.nn.Linear(2, 2), "fast"),  # type: ignore[arg-type]
     PerSampleModeError, "choose auto"),
    ("direct mode on an LSTM", lambda: resolve_mode(torch.nn.LSTM(2, 2), "direct"), PerSampleModeError,
     "mode='ghost'"),
    ("NaN vector", lambda: clip_l2(np.array([np.nan, 1.0]), 1.0), InputError, "reject it"),
    ("short key", lambda: SecureRandom(b"short"), InputError, "key=None"),
    ("labels mismatch", lambda: dp_sgd(torch.nn.Linear(3, 2), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long),
                                        noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2, steps=1),
     InputError, "one label per feature row"),
    ("one score a side", lambda: gdp_mu_interval([1.0], [2.0]), AuditInputError, "more runs or canaries"),
    ("scores of the wrong shape", lambda: canary_audit(lambda m: np.zeros(3), canaries=8, guesses=2, delta=1e-5),
     AuditInputError, "one score per canary"),
    ("confidence 0.3", lambda: gdp_mu_interval([0.0, 1.0], [1.0, 2.0], confidence=0.3), AuditInputError,
     "confidence=0.95"),
    ("train function lacking keywords", lambda: audit_dp_sgd(noise_multiplier=1.0, steps=1, canaries=8,
                                                             train=_lacks_keywords),
     SignatureError, "like dp.sgd.dp_sgd"),
]


@pytest.mark.parametrize(("what", "call", "cls", "fix"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_the_dp_class_that_is_still_the_builtin(
    what: str, call: Callable[[], object], cls: type[DPError], fix: str
) -> None:
    with pytest.raises(cls) as info:
        call()
    assert type(info.value) is cls, f"{what}: raised {type(info.value).__name__}, expected {cls.__name__}"
    assert isinstance(info.value, DPError) and isinstance(info.value, BUILTIN[cls])
    assert fix in str(info.value), f"{what}: the message does not name the fix: {info.value}"


def test_every_class_is_raised_by_a_real_call() -> None:
    raised = {c[2] for c in BAD_CALLS} | {AuditFailedError}  # the audit failure: its own test below
    assert raised == set(BUILTIN)
    assert {getattr(dp.errors, n) for n in dp.errors.__all__} == {DPError, *BUILTIN}


def test_an_audit_that_proves_the_claim_false_raises_audit_failed() -> None:
    """The adversary: a mechanism with a tenth of the calibrated noise; the audit must fail the claim."""
    z = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=1.0, steps=1)
    weak = GaussianMechanism(sensitivity=1.0, noise_multiplier=z / 10)
    res = audit_gaussian_mechanism(weak, sensitivity=1.0, canaries=200, runs=2, claim=Claim(epsilon=2.0, delta=1e-5),
                                   rng=SecureRandom.for_testing("errors-audit"))
    with pytest.raises(AuditFailedError, match="weaker than the accounting") as info:
        assert_below(res, 2.0)
    assert isinstance(info.value, AssertionError)  # pytest.raises(AssertionError) in users' suites still works
    honest = audit_gaussian_mechanism(GaussianMechanism(sensitivity=1.0, noise_multiplier=z), sensitivity=1.0,
                                      canaries=200, runs=2, claim=Claim(epsilon=2.0, delta=1e-5),
                                      rng=SecureRandom.for_testing("errors-audit"))
    assert_below(honest, 2.0)


def test_callers_catching_the_builtin_still_catch_dp_errors() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        GaussianStep(1.0, -0.5)
    with pytest.raises(TypeError, match="DP-SGD training function"):
        audit_dp_sgd(noise_multiplier=1.0, steps=1, canaries=8, train=_lacks_keywords)


def test_errors_are_exported_from_dp() -> None:
    for name in dp.errors.__all__:
        assert name in dp.__all__
        assert getattr(dp, name) is getattr(dp.errors, name)


def _raised_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, class name) of each ``raise X`` / ``raise X(...)`` in ``tree`` (bare re-raises skipped)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                out.append((node.lineno, exc.id))
            elif isinstance(exc, ast.Attribute):
                out.append((node.lineno, exc.attr))
    return sorted(out)


def test_dp_raises_only_its_own_error_classes() -> None:
    """Static: no bare ValueError/TypeError/AssertionError raise is left in dp/; every raise is a dp.errors class."""
    allowed = set(dp.errors.__all__) | {"AttributeError"}  # module __getattr__ must raise AttributeError
    found = {}
    for path in sorted(DP_DIR.glob("*.py")):
        for line, name in _raised_names(ast.parse(path.read_text(), filename=str(path))):
            if name not in allowed:
                found[f"{path.name}:{line}"] = name
    assert not found, f"dp raises classes outside dp.errors: {found}"


def test_the_static_check_sees_a_bare_raise() -> None:
    tree = ast.parse("def f(x):\n    if x:\n        raise ValueError('bad')\n    raise TypeError\n")
    assert [n for _, n in _raised_names(tree)] == ["ValueError", "TypeError"]


def test_errors_module_imports_nothing() -> None:
    """dp.errors is imported by every dp module, so it imports nothing of its own (no cycles, no torch)."""
    tree = ast.parse((DP_DIR / "errors.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports)
