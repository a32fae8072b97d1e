"""The pytest plugin as a user meets it: a user-style test file run by pytester.

The file imports only the plugin's public API (``fl.testing``) and the privagg code it tests. Correct
layers pass; each planted bug (noise divided by 2, clipping switched off, a missing guarantee, a server that
asks for both kinds of share of one client) makes exactly its own assertion fail, with the check's report.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
import dataclasses

import pytest
from fl.testing import PrivacyAssertionError, assert_dp, assert_input_private, assert_ledger

from dp.accounting import calibrate_noise
from dp.sgd import dp_sgd
from fl.layers.noise import GaussianNoise
from fl.layers.clip import Clip
from fl.sums.secagg import SecAgg, SecAggPlus
from secagg.masking.messages import UnmaskRequest
from secagg.masking.server import SecAggServer

Z = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=1.0, steps=1)  # one round at epsilon = 1


def half_noise_sgd(model, x, y, *, noise_multiplier, max_grad_norm, **kw):  # PLANTED BUG
    return dp_sgd(model, x, y, noise_multiplier=noise_multiplier / 2, max_grad_norm=max_grad_norm, **kw)


def unclipped_sgd(model, x, y, *, noise_multiplier, max_grad_norm, **kw):  # PLANTED BUG: clip 1e6, noise for 1
    return dp_sgd(model, x, y, noise_multiplier=noise_multiplier * max_grad_norm / 1e6, max_grad_norm=1e6, **kw)


class NoClip(Clip):  # PLANTED BUG: declares the bound, never clips
    def encode(self, x, spec, rng):
        return x


@pytest.mark.privacy_audit
def test_dp_sgd():
    assert_dp(dp_sgd, epsilon=1.0, delta=1e-5)


@pytest.mark.privacy_audit
def test_dp_sgd_half_noise():
    assert_dp(half_noise_sgd, epsilon=1.0, delta=1e-5)


@pytest.mark.privacy_audit
def test_dp_sgd_no_clipping():
    assert_dp(unclipped_sgd, epsilon=1.0, delta=1e-5)


@pytest.mark.privacy_audit
def test_fedavg():
    assert_dp([Clip(l2=1.0), GaussianNoise(multiplier=Z)], epsilon=1.0, delta=1e-5)


@pytest.mark.privacy_audit
def test_fedavg_distributed():
    assert_dp([Clip(l2=1.0), GaussianNoise(multiplier=Z, placement="clients")], epsilon=1.0, delta=1e-5)


@pytest.mark.privacy_audit
def test_fedavg_half_noise():
    assert_dp([Clip(l2=1.0), GaussianNoise(multiplier=Z / 2)], epsilon=1.0, delta=1e-5)


@pytest.mark.privacy_audit
def test_fedavg_no_clipping():
    assert_dp([NoClip(l2=1.0), GaussianNoise(multiplier=Z)], epsilon=1.0, delta=1e-5)


SECAGG_DPSGD = {"guarantees": [
    {"layer": "secagg+", "property": "input privacy: the server learns only the sum of the included clients' updates",
     "against": "an honest-but-curious server colluding with < 4 clients", "assumptions": [], "params": {}},
    {"layer": "dp-sgd", "property": "(2.994, 1e-05)-DP at example level: each client's update, and so the model, ...",
     "against": "the server and anyone who sees a client's update or the released model", "assumptions": [],
     "params": {"epsilon": 2.994, "delta": 1e-05}},
]}
POLICY = ["input privacy against the server", "(eps <= 3, delta <= 1e-5) at example level for the released model"]


def test_ledger_meets_policy():
    assert_ledger(SECAGG_DPSGD, requires=POLICY)


def test_ledger_without_secure_sum():  # PLANTED BUG: the secure sum was dropped from the pipeline
    assert_ledger({"guarantees": SECAGG_DPSGD["guarantees"][1:]}, requires=POLICY)


class GreedyServer(SecAggServer):  # PLANTED BUG: also asks one survivor for another survivor's mask key
    def _unmask_requests(self, responders):
        out = super()._unmask_requests(responders)
        first = out[0]
        victim = max(v for v in first.alive if v != first.recipient)
        out[0] = self._requests[first.recipient] = dataclasses.replace(
            first, dropped=tuple(sorted({*first.dropped, victim})))
        return out


@dataclasses.dataclass(frozen=True)
class GreedySecAgg(SecAgg):
    def server(self, cids, *, spec, session, round):
        machine = SecAgg.server(self, cids, spec=spec, session=session, round=round)
        machine.__class__ = GreedyServer
        return machine


def test_secure_sums_are_input_private():
    assert_input_private(SecAggPlus())
    assert_input_private(SecAgg(threshold=0.7, authenticated=True))


def test_greedy_server_is_caught():
    assert_input_private(GreedySecAgg(threshold=0.7))
'''

BUGS = ("test_dp_sgd_half_noise", "test_dp_sgd_no_clipping", "test_fedavg_half_noise", "test_fedavg_no_clipping",
        "test_ledger_without_secure_sum", "test_greedy_server_is_caught")


def _plugin_args() -> list[str]:
    """Load the plugin by hand unless pytest already loads it through the installed entry point."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    return [] if "privagg" in names and autoload else ["-p", "fl.testing.plugin"]


@pytest.mark.slow
def test_user_suite_passes_correct_code_and_fails_exactly_the_planted_bugs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "--privacy-audit-seed=3", "-rf")
    result.assert_outcomes(passed=5, failed=len(BUGS))
    out = result.stdout.str()
    for name in BUGS:
        assert f"FAILED test_user.py::{name} - " in out
    for name in ("test_dp_sgd", "test_fedavg", "test_fedavg_distributed", "test_ledger_meets_policy",
                 "test_secure_sums_are_input_private"):
        assert f"FAILED test_user.py::{name} " not in out and f"FAILED test_user.py::{name} -" not in out
    marker = "PrivacyAssertionError: privacy audit FAILED"
    raised = [ln for ln in out.splitlines() if ln.startswith("E ") and marker in ln]
    assert len(raised) == 4  # one per planted audit bug (the -rf summary may repeat it, truncated or not)
    assert "clipping looks switched off" in out  # the report names the suspect
    assert "lacks 1 required guarantee(s):" in out and "input privacy against the server" in out
    assert "privagg privacy audits: effort=quick, seed=3" in out
    assert "[FAIL] 2 one kind of share per client" in out  # the greedy server fails exactly check 2 ...
    assert "[FAIL] 3" not in out and "[FAIL] 1" not in out  # ... honest clients refuse it; uploads look uniform


def test_effort_option_and_marker_reach_the_audit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_effort='''
import pytest
from fl.testing import EFFORTS
from fl.testing.plugin import PrivacyAudit

def test_default(privacy_audit):
    assert privacy_audit.effort == EFFORTS["thorough"] and privacy_audit.seed == 7

@pytest.mark.privacy_audit(effort="quick")
def test_marker(privacy_audit):
    assert privacy_audit.effort.name == "quick"
''')
    result = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "--privacy-audit-effort=thorough",
                                "--privacy-audit-seed=7")
    result.assert_outcomes(passed=2)
    bad = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "--privacy-audit-effort=huge")
    assert bad.ret != 0
    assert "invalid choice" in bad.stderr.str()
