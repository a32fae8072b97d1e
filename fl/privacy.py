"""Turn a privacy spec (``--privacy clip,noise,secagg+``) into a pipeline, a client trainer and accounting.

This is the one place that knows every token; each token maps to a layer, a sum, or a trainer:

- ``clip``: ``Clip(l2=clip)``; ``quantize``: ``Quantize(bits)`` (implied before a secure sum).
- ``secagg`` / ``secagg+`` / ``paillier``: the secure sum (last stage).
- ``noise``: user-level DP-FedAvg with central noise -- the server adds ``N(0, (z * clip)^2)`` to the sum.
- ``dnoise``: distributed DP-FedAvg -- each planned client adds ``N(0, (z * clip)^2 / n_planned)`` before
  the secure sum; the ledger charges the survivors' noise ``z * sqrt(n_included / n_planned)``.
- ``dp-sgd``: example-level DP-SGD in each client's local training (:class:`fl.dp_training.DpSgdTrainer`).

``noise``/``dnoise`` need ``clip`` before them and force unweighted averaging (``weighting="uniform"``), as
the DP-FedAvg analysis requires. When ``epsilon`` is set the noise multiplier is calibrated by bisection
over the accountant: for DP-FedAvg, ``config.rounds`` events at the client sampling rate; for DP-SGD, per
client, ``config.rounds * local_epochs * ceil(n_k / batch)`` Poisson steps at rate ``batch / n_k``
(assuming the client takes part in every round, so the budget holds whatever the client sampling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from dp.accounting import calibrate_noise
from fl.config import TrainConfig
from fl.dp_accounting import DpFedAvgAccounting, DpSgdAccounting
from fl.dp_layers import GaussianNoise
from fl.dp_training import DpSgdTrainer
from fl.layers import Clip, Quantize
from fl.pipeline import Pipeline
from fl.spec import ClientTrainer, CompositionError, Layer, PrivacyAccounting, SecureSum
from fl.sums import PlainSum, threshold_count

__all__ = ["KNOWN_TOKENS", "PrivacyPlan", "build_plan"]

KNOWN_TOKENS = ("none", "clip", "quantize", "secagg", "secagg+", "paillier", "noise", "dnoise", "dp-sgd")


@dataclass(frozen=True)
class PrivacyPlan:
    """What the training loop needs from a privacy spec."""

    pipeline: Pipeline
    trainer: ClientTrainer | None = None  # None: the loop's plain trainer
    accounting: PrivacyAccounting | None = None
    weighting: Literal["samples", "uniform"] | None = None  # forced by the layers (DP needs uniform)
    notes: tuple[str, ...] = field(default_factory=tuple)


def _secure_sum(token: str, config: TrainConfig) -> SecureSum:
    threshold = config.privacy.threshold
    if token == "secagg":
        from fl.sums_secagg import SecAgg

        return SecAgg(threshold=threshold)
    if token == "secagg+":
        from fl.sums_secagg import SecAggPlus

        return SecAggPlus(threshold=threshold)
    from fl.sums_paillier import PaillierSum

    return PaillierSum()


def _client_sampling(config: TrainConfig, population: int) -> tuple[float, Literal["poisson", "fixed"], int]:
    """(sample rate, scheme, expected clients per round) of the loop's client sampling."""
    if config.sample_rate is not None:
        q = config.sample_rate
        return q, "poisson", max(1, round(q * population))
    k = config.cohort or population
    return k / population, "fixed", k


def _dp_fedavg(
    config: TrainConfig, token: str, population: int, notes: list[str], *, sums_enforce_threshold: bool
) -> tuple[GaussianNoise, DpFedAvgAccounting]:
    pc = config.privacy
    q, sampling, expected = _client_sampling(config, population)
    if pc.epsilon is not None and pc.noise_multiplier is not None:
        raise CompositionError("give either --epsilon (to calibrate the noise) or --noise-multiplier, not both")
    if pc.epsilon is not None:
        z = calibrate_noise(
            epsilon=pc.epsilon, delta=pc.delta, sample_rate=q, steps=config.rounds, accountant=pc.accountant,
            sampling=sampling, population=population,
        )
        notes.append(
            f"DP-FedAvg noise multiplier {z:.4f} calibrated for ({pc.epsilon:g}, {pc.delta:g})-DP at client level "
            f"over {config.rounds} rounds, {sampling} client sampling at rate {q:.4g} ({pc.accountant})"
        )
    elif pc.noise_multiplier is not None:
        z = pc.noise_multiplier
    else:
        raise CompositionError(f"{token!r} needs a noise level: pass --noise-multiplier Z or --epsilon E --delta D")
    placement: Literal["server", "clients"] = "clients" if token == "dnoise" else "server"
    floor = expected
    if placement == "clients":
        # dropout tolerance: a round is released with at least the secure sum's threshold of the planned
        # clients (SecAgg(+) aborts below it); the noise must suffice even then
        floor = min(expected, threshold_count(pc.threshold, expected))
        if pc.epsilon is not None and floor < expected:
            z *= math.sqrt(expected / floor)
            notes.append(
                f"distributed noise raised to z = {z:.4f} so the budget holds with as few as {floor} of "
                f"{expected} clients surviving a round (--threshold {pc.threshold:g})"
            )
        if not sums_enforce_threshold:
            notes.append(
                f"without secagg/secagg+ nothing stops a round with fewer than {floor} survivors; such a "
                "round is charged honestly and may overspend the budget"
            )
    accounting = DpFedAvgAccounting(
        noise_multiplier=z, delta=pc.delta, clip=pc.clip, accountant=pc.accountant, placement=placement,
        shares=expected, epsilon=pc.epsilon, min_included=floor,
    )
    layer = GaussianNoise(multiplier=z, placement=placement, shares=expected, budget=accounting)
    if sampling == "fixed" and q < 1:
        notes.append(
            "fixed cohorts smaller than the population are accounted as sampling without replacement under "
            "replace-one neighbours (sensitivity 2 x clip) with the RDP accountant; Poisson sampling "
            "(--sample-rate) gives tighter PLD accounting"
        )
    if sampling == "poisson":
        notes.append(
            "the server divides the noisy sum by the number of included clients; the DP analysis assumes the "
            "expected count, so the realised count (public to the server) is outside the guarantee"
        )
    if config.weighting == "samples":
        notes.append("DP-FedAvg forces uniform (unweighted) averaging, so one client's influence is bounded")
    return layer, accounting


def _dp_sgd(
    config: TrainConfig, client_sizes: Mapping[int, int], notes: list[str]
) -> tuple[DpSgdTrainer, DpSgdAccounting]:
    pc = config.privacy
    batch = pc.dpsgd_batch_size
    if batch < 1:
        raise CompositionError(f"--dpsgd-batch-size must be >= 1, got {batch}")
    probe = DpSgdTrainer(
        noise_multiplier=1.0, max_grad_norm=pc.dpsgd_clip, batch_size=batch, epochs=config.local_epochs
    )
    if pc.epsilon is not None and pc.dpsgd_noise_multiplier is not None:
        raise CompositionError("give either --epsilon (to calibrate DP-SGD) or --dpsgd-noise-multiplier, not both")
    planned: dict[int, tuple[float, float, int]] = {}
    noise: dict[int, float] = {}
    cache: dict[tuple[float, int], float] = {}
    for cid, n in sorted(client_sizes.items()):
        if n < 1:
            raise CompositionError(f"client {cid} has no training data; DP-SGD needs at least one example")
        q, per_round = probe.sample_rate(n), probe.steps_per_round(n)
        if pc.epsilon is not None:
            key = (q, per_round * config.rounds)
            if key not in cache:
                cache[key] = calibrate_noise(
                    epsilon=pc.epsilon, delta=pc.delta, sample_rate=q, steps=key[1], accountant=pc.accountant
                )
            z = cache[key]
        elif pc.dpsgd_noise_multiplier is not None:
            z = pc.dpsgd_noise_multiplier
        else:
            raise CompositionError("'dp-sgd' needs a noise level: pass --dpsgd-noise-multiplier Z or --epsilon E")
        noise[cid] = z
        planned[cid] = (z, q, per_round)
    if pc.epsilon is not None:
        zs = sorted(set(noise.values()))
        notes.append(
            f"DP-SGD noise multipliers {zs[0]:.4f}..{zs[-1]:.4f} calibrated per client for ({pc.epsilon:g}, "
            f"{pc.delta:g})-DP at example level over {config.rounds} rounds x {config.local_epochs} epochs "
            f"(Poisson batches of expected size {batch}, {pc.accountant})"
        )
    trainer = DpSgdTrainer(
        noise_multiplier=noise, max_grad_norm=pc.dpsgd_clip, batch_size=batch, epochs=config.local_epochs,
        lr=config.client_lr, optimizer=config.optimizer, seeded_noise_for_testing=config.insecure_seeded_randomness,
    )
    accounting = DpSgdAccounting(delta=pc.delta, planned=planned, accountant=pc.accountant, epsilon=pc.epsilon)
    return trainer, accounting


def build_plan(
    config: TrainConfig, *, size: int, population: int, client_sizes: Mapping[int, int]
) -> PrivacyPlan:
    """Build the plan for ``config.privacy``; raises ``CompositionError`` for an unknown or bad spec."""
    tokens = config.privacy.tokens()
    unknown = [t for t in tokens if t not in KNOWN_TOKENS]
    if unknown:
        raise CompositionError(
            f"unknown privacy stage(s) {unknown}; choose from {', '.join(KNOWN_TOKENS)} (comma-separated)"
        )
    layers: list[Layer] = []
    ssum: SecureSum = PlainSum()
    sums = [t for t in tokens if t in ("secagg", "secagg+", "paillier")]
    if len(sums) > 1:
        raise CompositionError(f"pick one secure sum, got {sums}")
    noises = [t for t in tokens if t in ("noise", "dnoise")]
    if len(noises) > 1:
        raise CompositionError(f"pick one noise stage (noise = central, dnoise = distributed), got {noises}")
    if tokens.count("dp-sgd") > 1:
        raise CompositionError("'dp-sgd' appears twice in --privacy")
    notes: list[str] = []
    accounting: PrivacyAccounting | None = None
    trainer: ClientTrainer | None = None
    weighting: Literal["samples", "uniform"] | None = None
    if noises:
        tok = noises[0]
        if "clip" not in tokens or tokens.index("clip") > tokens.index(tok):
            fix = ",".join(["clip", tok, *sums])
            raise CompositionError(
                f"{tok!r} needs a clip norm to calibrate the noise to: put clip before it (--privacy {fix})"
            )
        if "quantize" in tokens and tokens.index("quantize") < tokens.index(tok):
            raise CompositionError(f"{tok!r} works on real values: put it before quantize")
        if "dp-sgd" in tokens:
            raise CompositionError(
                "combine either example-level dp-sgd or client-level clip,noise/dnoise in one run, not both "
                "(their ledgers would need joint accounting)"
            )
        if tok == "dnoise" and not sums:
            notes.append(
                "dnoise without a secure sum: the server sees each client's update with only its share of the "
                "noise; add secagg or secagg+ so it only sees the noisy sum"
            )
    for t in tokens:
        if t == "clip":
            layers.append(Clip(l2=config.privacy.clip))
        elif t == "quantize":
            layers.append(Quantize(bits=config.privacy.quant_bits))
        elif t in ("noise", "dnoise"):
            enforced = bool(sums) and sums[0] in ("secagg", "secagg+")
            layer, fedavg = _dp_fedavg(config, t, population, notes, sums_enforce_threshold=enforced)
            layers.append(layer)
            accounting, weighting = fedavg, "uniform"
    if "dp-sgd" in tokens:
        trainer, accounting = _dp_sgd(config, client_sizes, notes)
    if sums:
        if tokens[-1] != sums[0]:
            raise CompositionError(f"the secure sum {sums[0]!r} must be the last stage of --privacy")
        if not any(isinstance(layer, Quantize) for layer in layers):
            if not any(isinstance(layer, Clip) for layer in layers):
                layers.append(Clip(l2=config.privacy.clip))
            layers.append(Quantize(bits=config.privacy.quant_bits))
        ssum = _secure_sum(sums[0], config)
    return PrivacyPlan(
        Pipeline(layers, sum=ssum), trainer=trainer, accounting=accounting, weighting=weighting, notes=tuple(notes)
    )
