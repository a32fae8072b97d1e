"""The pytest hooks of privagg's plugin (registered through the ``pytest11`` entry point ``privagg``).

Adds ``--privacy-audit-effort={quick,thorough}`` and ``--privacy-audit-seed=N``, the
``privacy_audit`` marker (``@pytest.mark.privacy_audit`` or ``@pytest.mark.privacy_audit(effort="thorough")``)
and the ``privacy_audit`` fixture. Importing this module is cheap: the audits load torch and SciPy
only when a test calls :func:`fl.testing.assert_dp`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fl.testing.assertions import _CONTEXT, EFFORTS, AuditEffort

__all__ = ["PrivacyAudit", "privacy_audit"]

_SAVED = pytest.StashKey[tuple[str, "int | None"]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("privagg", "privacy audits (privagg)")
    group.addoption("--privacy-audit-effort", choices=sorted(EFFORTS), default="quick",
                    help="effort of every assert_dp audit: quick (CI, default) or thorough (nightly)")
    group.addoption("--privacy-audit-seed", type=int, default=0,
                    help="seed of the audits' CSPRNG test seam, so a failure repeats exactly (default: 0)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "privacy_audit(effort=None): an empirical privacy audit (effort: quick or thorough; default: "
        "--privacy-audit-effort)")
    config.stash[_SAVED] = (_CONTEXT.effort, _CONTEXT.seed)
    _CONTEXT.effort = config.getoption("--privacy-audit-effort")
    _CONTEXT.seed = config.getoption("--privacy-audit-seed")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore the settings (a nested session, e.g. ``pytester``, must not leak into its parent)."""
    if _SAVED in config.stash:
        _CONTEXT.effort, _CONTEXT.seed = config.stash[_SAVED]


def pytest_report_header(config: pytest.Config) -> str:
    return (f"privagg privacy audits: effort={config.getoption('--privacy-audit-effort')}, "
            f"seed={config.getoption('--privacy-audit-seed')}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run the test with its own audit stream (seed, node id) and the marker's effort, if any."""
    marker = item.get_closest_marker("privacy_audit")
    default = item.config.getoption("--privacy-audit-effort")
    effort = marker.kwargs.get("effort", default) if marker is not None else default
    if effort not in EFFORTS:
        raise pytest.UsageError(f"{item.nodeid}: privacy_audit(effort={effort!r}); choose {', '.join(EFFORTS)}")
    saved = (_CONTEXT.effort, _CONTEXT.nodeid, _CONTEXT.calls, _CONTEXT.active)
    _CONTEXT.effort, _CONTEXT.nodeid, _CONTEXT.calls, _CONTEXT.active = effort, item.nodeid, 0, True
    try:
        return (yield)
    finally:
        _CONTEXT.effort, _CONTEXT.nodeid, _CONTEXT.calls, _CONTEXT.active = saved


class PrivacyAudit:
    """The ``privacy_audit`` fixture: the effort and seed in force, and the assertions bound to them."""

    @property
    def effort(self) -> AuditEffort:
        return EFFORTS[_CONTEXT.effort]

    @property
    def seed(self) -> int | None:
        return _CONTEXT.seed

    def assert_dp(self, target: Any, **kwargs: Any) -> Any:
        from fl.testing.assertions import assert_dp

        return assert_dp(target, **kwargs)

    def assert_ledger(self, report: Any, requires: Any) -> None:
        from fl.testing.assertions import assert_ledger

        assert_ledger(report, requires)


@pytest.fixture
def privacy_audit() -> PrivacyAudit:
    """The plugin's settings for this test and the assertions (``privacy_audit.assert_dp(...)``)."""
    return PrivacyAudit()
