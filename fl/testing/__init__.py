"""privagg's pytest plugin: privacy assertions for your own test suite.

Installed with privagg (entry point ``pytest11``: ``privagg = fl.testing.plugin``), so in your tests::

    from fl.testing import assert_dp, assert_input_private, assert_ledger

    @pytest.mark.privacy_audit
    def test_my_noise_layer():
        assert_dp([Clip(l2=1.0), GaussianNoise(multiplier=z)], epsilon=1.0, delta=1e-5)

``--privacy-audit-effort=quick|thorough`` (quick in CI, thorough nightly) and ``--privacy-audit-seed=N``
(reproducible audits) configure every :func:`assert_dp`; ``@pytest.mark.privacy_audit(effort=...)`` sets
the effort of one test. ``assert_input_private(SecAgg(threshold=0.7))`` runs a secure sum with a
recording server and checks what it saw (:mod:`fl.testing.input_privacy`). :mod:`fl.testing.strategies`
has hypothesis strategies for protocol tests.
"""

from __future__ import annotations

from fl.testing.assertions import (
    EFFORTS,
    AuditEffort,
    DpRequirement,
    InputPrivacyRequirement,
    PrivacyAssertionError,
    assert_dp,
    assert_ledger,
    parse_requirement,
)
from fl.testing.input_privacy import CheckResult, InputPrivacyReport, assert_input_private

__all__ = [
    "EFFORTS",
    "AuditEffort",
    "CheckResult",
    "DpRequirement",
    "InputPrivacyReport",
    "InputPrivacyRequirement",
    "PrivacyAssertionError",
    "assert_dp",
    "assert_input_private",
    "assert_ledger",
    "parse_requirement",
]
