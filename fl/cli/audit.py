"""``privagg audit``: check a DP claim empirically with canaries, and the DP-FedAvg audit helper.

The audit plays an attacker against the code under test and reports a lower bound on epsilon that holds
with the chosen confidence (see :mod:`dp.audit`). If it exceeds the claimed epsilon, the claim is false
and the command exits with status 1. ``--weaken F`` divides the noise by ``F`` (a planted bug) to show
the audit catching it (``--weaken 2`` is caught).

Targets: ``dp-sgd`` (DP-SGD runs with Dirac gradient canaries), ``dp-fedavg`` (rounds of the real
``Clip -> GaussianNoise`` pipeline with one canary client per coordinate; ``--placement clients`` audits
distributed noise), ``gaussian`` (the Gaussian mechanism). ``--method gdp`` (default) fits Gaussian DP to
the canary scores with an exact confidence bound (Nasr et al. 2023; Andrew et al. 2024); ``--runs``
is the effort. ``--method one-run`` is the weaker Steinke-Nasr-Jagielski bound.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from dp.accounting import calibrate_noise
from dp.audit import AuditResult, Claim, audit_dp_sgd, audit_gaussian_mechanism, canary_audit, gdp_audit
from dp.mechanisms import GaussianMechanism, NoiseSource
from dp.rng import SecureRandom
from fl.layers.clip import Clip
from fl.layers.noise import GaussianNoise
from fl.pipeline import Pipeline
from fl.spec import RoundInfo, ValueSpec

__all__ = ["add_arguments", "audit_dp_fedavg", "fedavg_canary_run", "run"]


LayerFactory = Callable[[float], Sequence[Any] | Pipeline]


def fedavg_canary_run(
    layers: Sequence[Any] | Pipeline, *, canaries: int, rounds: int, clip: float, rng: NoiseSource,
) -> Callable[[NDArray[np.bool_]], NDArray[np.float64]]:
    """``run(mask)`` for DP-FedAvg: ``rounds`` rounds of the real pipeline over the included canary clients.

    Canary client ``k`` sends ``10 * clip * e_k`` every round (a correct ``Clip`` scales it to
    ``clip * e_k``, so clipping matters); the pipeline's own encode (client) and decode (server) run,
    with distributed noise split over the round's clients; canary ``k``'s score is coordinate ``k`` of
    the decoded sums, added over rounds, over ``clip``: ``rounds`` plus ``N(0, rounds z^2)`` when included.
    """
    pipeline = layers if isinstance(layers, Pipeline) else Pipeline(list(layers))

    def run(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        included = tuple(int(k) for k in np.flatnonzero(mask))
        bound = pipeline.bind(ValueSpec(size=canaries, cohort=len(included)))
        info = RoundInfo(round=0, planned=included, included=included, population=canaries, sample_rate=1.0)
        scores = np.zeros(canaries)
        for r in range(rounds):
            total: NDArray[Any] | None = None
            for k in included:
                update = np.zeros(canaries)
                update[k] = 10.0 * clip
                enc = bound.encode(update, rng)
                total = enc if total is None else total + enc  # ring values wrap mod 2^64, as the ring needs
            assert total is not None
            scores += bound.decode(total, replace(info, round=r), rng)
        return scores / clip

    return run


def audit_dp_fedavg(
    *,
    noise_multiplier: float | None = None,
    rounds: int = 10,
    clip: float = 1.0,
    placement: Literal["server", "clients"] = "server",
    canaries: int = 1000,
    runs: int = 1,
    guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
    rng: NoiseSource | None = None,
    layers: Sequence[Any] | Pipeline | None = None,
    claim: Claim | None = None,
    method: Literal["gdp", "one-run"] = "gdp",
) -> AuditResult:
    """Audit of DP-FedAvg through the real pipeline (default ``[Clip(clip), GaussianNoise(z, placement)]``).

    ``layers``: the pipeline under test instead of the default (its clip norm must be ``clip``).
    ``method="gdp"`` (default): ``runs`` runs of ``rounds`` rounds with ``canaries`` canary clients
    each (:func:`fedavg_canary_run`), the Gaussian-DP fit with a ``confidence`` bound, composed as
    ``claim`` says (default: the audited rounds at ``delta``). ``method="one-run"``: the older
    Steinke-Nasr-Jagielski bound from ``guesses`` guesses.
    """
    rng = rng if rng is not None else SecureRandom()
    if layers is None:
        if noise_multiplier is None:
            raise ValueError("audit_dp_fedavg needs noise_multiplier= (or layers= with the pipeline to audit)")
        layers = [Clip(l2=clip), GaussianNoise(multiplier=noise_multiplier, placement=placement)]
    run = fedavg_canary_run(layers, canaries=canaries, rounds=rounds, clip=clip, rng=rng)
    extra = {"rounds": rounds, "noise_multiplier": noise_multiplier}
    if method == "one-run":
        res = canary_audit(run, canaries=canaries, guesses=guesses, delta=delta, confidence=confidence, rng=rng)
        return AuditResult(res.epsilon_lower_bound, res.epsilon_estimate, delta, confidence,
                           f"one-run dp-fedavg ({placement})", {**res.details, **extra})
    claim = claim if claim is not None else Claim(epsilon=None, delta=delta, releases=rounds)
    res = gdp_audit(run, canaries=canaries, releases=rounds, claim=claim, runs=runs, confidence=confidence, rng=rng,
                    method=f"gdp-fit dp-fedavg ({placement} noise, canary clients)",
                    noise_multiplier_claimed=noise_multiplier)
    return AuditResult(res.epsilon_lower_bound, res.epsilon_estimate, res.delta, confidence, res.method,
                       {**res.details, **extra})


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
                        help="canaries per audited run (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=1,
                        help="audited runs (the effort; --target gaussian: releases, default 20)")
    parser.add_argument("--method", choices=["gdp", "one-run"], default="gdp",
                        help="gdp: Gaussian-DP fit of the canary scores with a confidence bound (default); "
                             "one-run: the Steinke-Nasr-Jagielski bound from --guesses guesses")
    parser.add_argument("--guesses", type=int, default=100,
                        help="guesses the attacker makes with --method one-run (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.99,
                        help="confidence of the bound; on correct code the audit fails at most 1 - this often "
                             "(default: %(default)s)")
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
        res = audit_dp_sgd(noise_multiplier=z_run, steps=steps, canaries=args.canaries, runs=args.runs,
                           guesses=args.guesses, delta=args.delta, confidence=args.confidence, rng=rng,
                           method=args.method)
    elif args.target == "dp-fedavg":
        res = audit_dp_fedavg(noise_multiplier=z_run, rounds=steps, placement=args.placement,
                              canaries=args.canaries, runs=args.runs, guesses=args.guesses, delta=args.delta,
                              confidence=args.confidence, rng=rng, method=args.method)
    else:
        mech = GaussianMechanism(sensitivity=1.0, noise_multiplier=z_run)
        res = audit_gaussian_mechanism(mech, sensitivity=1.0, canaries=args.canaries, runs=max(20, args.runs),
                                       delta=args.delta, confidence=args.confidence, rng=rng)
    ok = res.epsilon_lower_bound <= args.epsilon
    bug = f" / {args.weaken:g} (planted bug)" if args.weaken != 1 else ""
    print(f"audit of {args.target}: noise multiplier {z:.4g}{bug}")
    print(f"  claimed          epsilon = {args.epsilon:g} at delta = {args.delta:g}")
    print(f"  lower bound      epsilon >= {res.epsilon_lower_bound:.4f} "
          f"({res.method}, {res.confidence * 100:.4g}% confidence)")
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
