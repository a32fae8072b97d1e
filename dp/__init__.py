"""dp: differential-privacy mechanisms, DP-SGD, accounting and empirical audits (no federation).

Names are imported lazily (``dp.rng`` stays cheap to import; the accountants pull in ``dp-accounting``
and DP-SGD pulls in torch only when used).
"""

from __future__ import annotations

import importlib
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
}

__all__ = ["SecureRandom", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dp' has no attribute {name!r}")
