"""Audit power and false alarms of ``assert_dp`` at the default (quick) effort, on this CPU.

Issue 10's bar: catch noise divided by 2 in DP-FedAvg and DP-SGD in under 60 s per audit, and stay
below the claimed epsilon on correct code with a false-alarm rate of at most 5% (shown over 20 seeds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from dp.accounting import calibrate_noise
from dp.rng import SecureRandom
from dp.sgd import dp_sgd
from fl.cli.audit import audit_dp_fedavg
from fl.layers.clip import Clip
from fl.layers.noise import GaussianNoise
from fl.testing import PrivacyAssertionError, assert_dp

EPS, DELTA = 1.0, 1e-5
Z = calibrate_noise(epsilon=EPS, delta=DELTA, sample_rate=1.0, steps=1)


def _half_noise_sgd(model: Any, x: Any, y: Any, *, noise_multiplier: float, max_grad_norm: float,
                    **kw: Any) -> Any:
    return dp_sgd(model, x, y, noise_multiplier=noise_multiplier / 2, max_grad_norm=max_grad_norm, **kw)


TARGETS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "dp-sgd": (lambda: dp_sgd, lambda: _half_noise_sgd),
    "dp-fedavg": (lambda: [Clip(l2=1.0), GaussianNoise(multiplier=Z)],
                  lambda: [Clip(l2=1.0), GaussianNoise(multiplier=Z / 2)]),
}


def _fails(target: Any, seed: int) -> tuple[bool, float]:
    t = time.perf_counter()
    try:
        assert_dp(target, epsilon=EPS, delta=DELTA, seed=seed, effort="quick")
        failed = False
    except PrivacyAssertionError:
        failed = True
    return failed, time.perf_counter() - t


@pytest.mark.parametrize("placement", ["server", "clients"])
def test_fedavg_audit_catches_noise_divided_by_two(placement: str) -> None:
    z = calibrate_noise(epsilon=EPS, delta=DELTA, sample_rate=1.0, steps=10)
    ok = audit_dp_fedavg(noise_multiplier=z, rounds=10, placement=placement, confidence=0.99,
                         rng=SecureRandom.for_testing(f"fedavg-{placement}"))
    bug = audit_dp_fedavg(noise_multiplier=z / 2, rounds=10, placement=placement, confidence=0.99, runs=2,
                          rng=SecureRandom.for_testing(f"fedavg-{placement}-bug"))
    assert ok.epsilon_lower_bound <= EPS < bug.epsilon_lower_bound


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_false_alarms_at_most_5_percent_and_half_noise_always_caught(name: str) -> None:
    good, bad = TARGETS[name]
    seeds = range(20)
    runs = [_fails(good(), s) for s in seeds]
    bug_runs = [_fails(bad(), 1000 + s) for s in seeds]
    false_alarms = sum(f for f, _ in runs)
    caught = sum(f for f, _ in bug_runs)
    slowest = max(t for _, t in runs + bug_runs)
    print(f"\n{name}: false alarms {false_alarms}/20, noise/2 caught {caught}/20, slowest audit {slowest:.1f} s")
    assert false_alarms <= 1  # <= 5%
    assert caught == 20
    assert slowest < 60
