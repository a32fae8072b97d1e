"""``privagg audit``: check a DP claim empirically with canaries, and the DP-FedAvg audit helper.

The audit plays an attacker against the code under test and reports a lower bound on epsilon that holds
with the chosen confidence (see :mod:`dp.audit`). If it exceeds the claimed epsilon, the claim is false
and the command exits with status 1. ``--weaken F`` divides the noise by ``F`` (a planted bug) to show
the audit catching it.

Targets: ``dp-sgd`` (one DP-SGD run with gradient canaries), ``dp-fedavg`` (rounds of the real
``Clip -> GaussianNoise`` pipeline with one canary client per coordinate; ``--placement clients`` audits
distributed noise), ``gaussian`` (the Gaussian mechanism, many runs, Clopper-Pearson).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dp.accounting import calibrate_noise
from dp.audit import AuditResult, audit_dp_sgd, audit_mechanism, canary_audit
from dp.mechanisms import GaussianMechanism, NoiseSource
from dp.rng import SecureRandom
from fl.dp_layers import GaussianNoise
from fl.layers import Clip
from fl.pipeline import Pipeline
from fl.spec import RoundInfo, ValueSpec

__all__ = ["add_arguments", "audit_dp_fedavg", "run"]


def audit_dp_fedavg(
    *,
    noise_multiplier: float,
    rounds: int = 10,
    clip: float = 1.0,
    placement: Literal["server", "clients"] = "server",
    canaries: int = 1000,
    guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
    rng: NoiseSource | None = None,
) -> AuditResult:
    """One-run audit of DP-FedAvg through the real pipeline ``[Clip(clip), GaussianNoise(z)]``.

    Canary client ``k`` (included with probability 1/2) sends the update ``10 * clip * e_k`` every round;
    ``Clip`` scales it to norm ``clip``; the pipeline's noise lands on the sum; canary ``k``'s score is
    coordinate ``k`` of the decoded sums, added over rounds. Each canary faces ``rounds`` Gaussian
    releases with multiplier ``z``: a correct implementation stays below the accountant's epsilon.
    """
    rng = rng if rng is not None else SecureRandom()

    def run_rounds(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        included = [int(k) for k in np.flatnonzero(mask)]
        n = max(1, len(included))
        layer = GaussianNoise(multiplier=noise_multiplier, placement=placement, shares=n)
        bound = Pipeline([Clip(l2=clip), layer]).bind(ValueSpec(size=canaries, cohort=n))
        scores = np.zeros(canaries)
        for r in range(rounds):
            total = np.zeros(canaries)
            for k in included:
                update = np.zeros(canaries)
                update[k] = 10.0 * clip
                total += bound.encode(update, rng)
            if not included and placement == "clients":
                total += rng.normal(canaries, noise_multiplier * clip)  # the lone planned share
            info = RoundInfo(round=r, planned=tuple(included), included=tuple(included), population=canaries,
                             sample_rate=1.0)
            scores += bound.decode(total, info, rng)
        return scores

    res = canary_audit(run_rounds, canaries=canaries, guesses=guesses, delta=delta, confidence=confidence, rng=rng)
    method = f"one-run dp-fedavg ({placement})"
    return AuditResult(res.epsilon_lower_bound, res.epsilon_estimate, delta, confidence, method,
                       {**res.details, "rounds": rounds, "noise_multiplier": noise_multiplier})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``privagg audit``."""
    parser.add_argument("--target", choices=["dp-sgd", "dp-fedavg", "gaussian"], default="dp-sgd",
                        help="what to audit (default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="claimed epsilon (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default: %(default)s)")
    parser.add_argument("--noise-multiplier", type=float,
                        help="noise multiplier to audit (default: calibrated to --epsilon for --steps)")
    parser.add_argument("--steps", type=int, default=20,
                        help="DP-SGD steps / DP-FedAvg rounds in the audited run (default: %(default)s)")
    parser.add_argument("--placement", choices=["server", "clients"], default="server",
                        help="dp-fedavg noise placement (default: %(default)s)")
    parser.add_argument("--canaries", type=int, default=1000,
                        help="canaries in the one-run audit (default: %(default)s)")
    parser.add_argument("--guesses", type=int, default=100, help="guesses the attacker makes (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=4000, help="runs per side for --target gaussian")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default: %(default)s)")
    parser.add_argument("--weaken", type=float, default=1.0,
                        help="PLANTED BUG for demonstrations: divide the noise by this factor (default: 1, none)")
    parser.add_argument("--seed", type=int,
                        help="TEST SEAM: seeded CSPRNG so the audit repeats exactly (default: os.urandom)")
    parser.add_argument("--json", type=Path, help="write the audit result here")


def run(args: argparse.Namespace) -> int:
    """Run the audit; exit status 1 when the lower bound exceeds the claimed epsilon."""
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise ValueError("--epsilon must be a positive finite number (the claim to audit)")
    if args.weaken <= 0:
        raise ValueError("--weaken must be positive (1 = no planted bug)")
    steps = 1 if args.target == "gaussian" else args.steps
    z = args.noise_multiplier
    if z is None:
        z = calibrate_noise(epsilon=args.epsilon, delta=args.delta, sample_rate=1.0, steps=steps)
    z_run = z / args.weaken
    rng: NoiseSource = SecureRandom.for_testing(f"audit:{args.seed}") if args.seed is not None else SecureRandom()
    if args.target == "dp-sgd":
        res = audit_dp_sgd(noise_multiplier=z_run, steps=steps, canaries=args.canaries, guesses=args.guesses,
                           delta=args.delta, confidence=args.confidence, rng=rng)
    elif args.target == "dp-fedavg":
        res = audit_dp_fedavg(noise_multiplier=z_run, rounds=steps, placement=args.placement,
                              canaries=args.canaries, guesses=args.guesses, delta=args.delta,
                              confidence=args.confidence, rng=rng)
    else:
        mech = GaussianMechanism(sensitivity=1.0, noise_multiplier=z_run)
        res = audit_mechanism(lambda x, r: mech(x, rng=r), without=np.zeros(8), with_canary=np.eye(8)[0],
                              trials=args.trials, delta=args.delta, confidence=args.confidence, rng=rng)
    ok = res.epsilon_lower_bound <= args.epsilon
    bug = f" / {args.weaken:g} (planted bug)" if args.weaken != 1 else ""
    print(f"audit of {args.target}: noise multiplier {z:.4g}{bug}")
    print(f"  claimed          epsilon = {args.epsilon:g} at delta = {args.delta:g}")
    print(f"  lower bound      epsilon >= {res.epsilon_lower_bound:.4f} "
          f"({res.method}, {res.confidence:.0%} confidence)")
    print(f"  Gaussian-fit     epsilon ~= {res.epsilon_estimate:.4f} (estimate)")
    details = ", ".join(f"{k}={v}" for k, v in res.details.items())
    print(f"  {details}")
    print("  PASS: the lower bound is below the claim" if ok else "  FAIL: the claim is violated")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"target": args.target, "claimed_epsilon": args.epsilon, "noise_multiplier": z,
                   "weaken": args.weaken, "pass": ok, **res.as_dict()}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if ok else 1
