"""dp: differential-privacy mechanisms, DP-SGD, accounting and empirical audits (no federation).

Names are imported lazily (``dp.rng`` stays cheap to import; the accountants pull in ``dp-accounting``
and DP-SGD pulls in torch only when used). Every error dp raises on purpose is a :class:`dp.errors.DPError`
(and the builtin it refines); see :mod:`dp.errors`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from dp.rng import SecureRandom

_LAZY = {
    # accounting
    "Accountant": "dp.accounting",
    "GaussianStep": "dp.accounting",
    "calibrate_noise": "dp.accounting",
    "compute_epsilon": "dp.accounting",
    "gaussian_epsilon": "dp.accounting",
    "make_event": "dp.accounting",
    # mechanisms
    "GaussianMechanism": "dp.mechanisms",
    "clip_l2": "dp.mechanisms",
    "discrete_gaussian": "dp.mechanisms",
    "box_muller_max_abs": "dp.mechanisms",
    "gaussian_noise": "dp.mechanisms",
    "torch_gaussian": "dp.mechanisms",
    "truncation_delta": "dp.mechanisms",
    "sample_discrete_gaussian_exact": "dp.mechanisms",
    # DP-SGD
    "DpSgdStats": "dp.sgd",
    "clipped_grad_sum": "dp.sgd",
    "dp_sgd": "dp.sgd",
    # audits
    "AuditResult": "dp.audit",
    "Claim": "dp.audit",
    "audit_gaussian_mechanism": "dp.audit",
    "epsilon_for_mu": "dp.audit",
    "gdp_audit": "dp.audit",
    "gdp_mu_interval": "dp.audit",
    "assert_below": "dp.audit",
    "audit_dp_sgd": "dp.audit",
    "audit_mechanism": "dp.audit",
    "canary_audit": "dp.audit",
    "epsilon_lower_bound": "dp.audit",
    "gaussian_fit_epsilon": "dp.audit",
    "one_run_epsilon": "dp.audit",
    # errors (dp.errors: one module, each class also the builtin it replaced)
    "AccountingError": "dp.errors",
    "AuditFailedError": "dp.errors",
    "AuditInputError": "dp.errors",
    "CalibrationError": "dp.errors",
    "DPError": "dp.errors",
    "InputError": "dp.errors",
    "PerSampleModeError": "dp.errors",
    "PrivacyParameterError": "dp.errors",
    "SignatureError": "dp.errors",
}

__all__ = ["SecureRandom", *sorted(_LAZY)]


def _submodule(where: str) -> ModuleType:
    """The submodule ``where`` names, by static import statements (no module chosen by a string at run time)."""
    if where == "dp.accounting":
        from dp import accounting

        return accounting
    if where == "dp.mechanisms":
        from dp import mechanisms

        return mechanisms
    if where == "dp.sgd":
        from dp import sgd

        return sgd
    if where == "dp.errors":
        from dp import errors

        return errors
    from dp import audit

    return audit


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(_submodule(_LAZY[name]), name)
    raise AttributeError(f"module 'dp' has no attribute {name!r}")
