"""Turn a privacy spec (``--privacy clip,noise,secagg+``) into a pipeline, a client trainer and accounting.

This is the one place that knows every token; each token maps to a layer, a sum, or a trainer:

- ``clip``: ``Clip(l2=clip)``; ``quantize``: ``Quantize(bits)`` (implied before a secure sum).
- ``secagg`` / ``secagg+`` / ``paillier``: the secure sum (last stage).
- ``noise``: user-level DP-FedAvg with central noise -- the server adds ``N(0, (z * clip)^2)`` to the sum.
- ``dnoise``: distributed DP-FedAvg -- each planned client adds ``N(0, (z * clip)^2 / n_expected)`` before
  the secure sum; the ledger charges the survivors' noise ``z * sqrt(n_included / n_expected)``, for the
  released model (amplified by the secret sample) and for the server (which knows the sample: not
  amplified). Every sum then stops a round below ``--threshold`` of the planned clients.
- ``dp-sgd``: example-level DP-SGD in each client's local training (:class:`fl.training.dp_sgd.DpSgdTrainer`).

``noise``/``dnoise`` need ``clip`` before them and force unweighted averaging (``weighting="uniform"``), as
the DP-FedAvg analysis requires. When ``epsilon`` is set the noise multiplier is calibrated with
dp-accounting's ``calibrate_dp_mechanism``: for DP-FedAvg, ``config.rounds`` of the layer's worst-case
round (fewest survivors) for each observer it protects, taking the largest; for DP-SGD, per
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
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.pipeline import Pipeline
from fl.privacy.accounting import DpFedAvgAccounting, DpSgdAccounting, SurvivorFloor
from fl.spec import ClientTrainer, CompositionError, Layer, PrivacyAccounting, RoundInfo, SecureSum, ValueSpec
from fl.sums.plain import PlainSum, threshold_count
from fl.training.dp_sgd import DpSgdTrainer, default_batch_and_clip

__all__ = ["KNOWN_TOKENS", "PrivacyPlan", "build_plan", "secure_sum_for"]

KNOWN_TOKENS = ("none", "clip", "quantize", "secagg", "secagg+", "paillier", "noise", "dnoise", "dp-sgd")


@dataclass(frozen=True)
class PrivacyPlan:
    """What the training loop needs from a privacy spec."""

    pipeline: Pipeline
    trainer: ClientTrainer | None = None  # None: the loop's plain trainer
    accounting: PrivacyAccounting | None = None
    weighting: Literal["samples", "uniform"] | None = None  # forced by the layers (DP needs uniform)
    notes: tuple[str, ...] = field(default_factory=tuple)


def secure_sum_for(token: str, config: TrainConfig, population: int, *, min_clients: int = 1) -> SecureSum:
    """The secure sum a ``--privacy`` token names, configured from the run's own settings."""
    pc = config.privacy
    # clients pin the smallest cohort they accept (a server cannot shrink t): the fixed cohort, or for
    # Poisson sampling six standard deviations below the expected count (smaller rounds abort)
    min_cohort = None
    if config.sample_rate is not None:
        mu = config.sample_rate * population
        min_cohort = min(population, max(2, math.floor(mu - 6 * math.sqrt(mu * (1 - config.sample_rate)))))
    if token == "secagg":
        from fl.sums.secagg import SecAgg

        return SecAgg(threshold=pc.cohort_threshold, min_cohort=min_cohort)
    if token == "secagg+":
        from fl.sums.secagg import SecAggPlus

        return SecAggPlus(
            threshold=pc.threshold, neighbours=pc.neighbours, corrupt=pc.corrupt_fraction,
            dropout=pc.dropout_fraction, min_cohort=min_cohort,
        )
    from fl.sums.paillier import PaillierSum

    return PaillierSum(min_clients=max(2, min_clients))


def _floor(ssum: SecureSum) -> SurvivorFloor:
    """The secure sum's own rule for the fewest survivors a round can be released with."""
    from fl.sums.paillier import PaillierSum
    from fl.sums.secagg import SecAgg, SecAggPlus

    if isinstance(ssum, SecAgg | SecAggPlus):
        return SurvivorFloor(threshold=ssum.threshold, graph=ssum._graph())
    if isinstance(ssum, PaillierSum | PlainSum):
        return SurvivorFloor(min_clients=ssum.min_clients)
    return SurvivorFloor()


def _client_sampling(config: TrainConfig, population: int) -> tuple[float, Literal["poisson", "fixed"], int]:
    """(sample rate, scheme, expected clients per round) of the loop's client sampling."""
    if config.sample_rate is not None:
        q = config.sample_rate
        return q, "poisson", max(1, round(q * population))
    k = config.cohort or population
    return k / population, "fixed", k


def _calibrate(
    config: TrainConfig, layer: GaussianNoise, spec: ValueSpec, worst: RoundInfo, *, hides: bool
) -> tuple[float, str]:
    """The smallest multiplier meeting the budget for every observer of the layer, in the worst round.

    Each observer's per-round multiplier is linear in the layer's ``multiplier`` (one computation:
    :meth:`GaussianNoise.steps`), so calibrate each observer's step and scale back.
    """
    pc = config.privacy
    assert pc.epsilon is not None
    best, which = 0.0, ""
    for observer, unit in layer.steps(spec, worst, sum_hides_updates=hides).items():
        z = calibrate_noise(
            epsilon=pc.epsilon, delta=pc.delta, sample_rate=unit.sample_rate, steps=config.rounds,
            accountant=pc.accountant, sampling=unit.sampling, population=unit.population or None,
        ) / unit.noise_multiplier
        if z > best:
            best, which = z, observer
    return best, which


def _dp_fedavg(
    config: TrainConfig, token: str, population: int, size: int, ssum: SecureSum, notes: list[str]
) -> tuple[GaussianNoise, DpFedAvgAccounting]:
    pc = config.privacy
    q, sampling, expected = _client_sampling(config, population)
    if pc.epsilon is not None and pc.noise_multiplier is not None:
        raise CompositionError("give either --epsilon (to calibrate the noise) or --noise-multiplier, not both")
    if pc.epsilon is None and pc.noise_multiplier is None:
        raise CompositionError(f"{token!r} needs a noise level: pass --noise-multiplier Z or --epsilon E --delta D")
    placement: Literal["server", "clients"] = "clients" if token == "dnoise" else "server"
    hides = not isinstance(ssum, PlainSum)
    floor = _floor(ssum)
    spec = ValueSpec(size=size, cohort=expected, l2_bound=pc.clip)
    z = pc.noise_multiplier if pc.noise_multiplier is not None else 1.0
    layer = GaussianNoise(multiplier=z, placement=placement, shares=expected)
    if pc.epsilon is not None:
        n_worst = floor(expected) if placement == "clients" else expected
        worst = RoundInfo(round=0, planned=tuple(range(expected)), included=tuple(range(n_worst)),
                          population=population, sample_rate=q, sampling=sampling)
        z, observer = _calibrate(config, layer, spec, worst, hides=hides)
        layer = GaussianNoise(multiplier=z, placement=placement, shares=expected)
        notes.append(
            f"DP-FedAvg noise multiplier {z:.4f} calibrated for ({pc.epsilon:g}, {pc.delta:g})-DP at client level "
            f"over {config.rounds} rounds against the {observer} (the tightest observer), {sampling} client "
            f"sampling at rate {q:.4g} ({pc.accountant})"
            + (f", with as few as {n_worst} of {expected} clients surviving a round" if n_worst < expected else "")
        )
    if placement == "clients":
        notes.append(
            "distributed noise protects against the server, which knows which clients it sampled: its epsilon "
            "has no amplification by sampling and charges every round (a client could be in each)"
        )
        if not hides:
            notes.append(
                "dnoise without a secure sum: the server sees each client's update with only its share of the "
                "noise, and is charged that; add secagg or secagg+ so it only sees the noisy sum"
            )
    accounting = DpFedAvgAccounting(
        noise=layer, clip=pc.clip, size=size, delta=pc.delta, accountant=pc.accountant, epsilon=pc.epsilon,
        floor=floor, sum_hides_updates=hides,
    )
    if sampling == "fixed" and q < 1:
        notes.append(
            "fixed cohorts smaller than the population are accounted as sampling without replacement under "
            "replace-one neighbours (one client's data replaced; sensitivity 2 x clip) with the RDP accountant; "
            "Poisson sampling (--sample-rate) is accounted under add/remove-one with tighter PLD accounting"
        )
    notes.append(
        "the client sample is drawn from a CSPRNG and never released: reports and ledgers carry participant "
        "counts only, which are public, as are each client's sample count n_k and the population size"
    )
    if config.weighting == "samples":
        notes.append("DP-FedAvg forces uniform (unweighted) averaging, so one client's influence is bounded")
    return layer, accounting


def _dp_sgd(
    config: TrainConfig, client_sizes: Mapping[int, int], notes: list[str]
) -> tuple[DpSgdTrainer, DpSgdAccounting]:
    pc = config.privacy
    rule_batch, rule_clip = default_batch_and_clip(pc.epsilon, min(client_sizes.values(), default=1))
    batch = pc.dpsgd_batch_size if pc.dpsgd_batch_size is not None else rule_batch
    clip = pc.dpsgd_clip if pc.dpsgd_clip is not None else rule_clip
    if batch < 1:
        raise CompositionError(f"--dpsgd-batch-size must be >= 1, got {batch}")
    if pc.dpsgd_batch_size is None or pc.dpsgd_clip is None:
        notes.append(f"DP-SGD batch size {batch} and clip norm {clip:g} chosen from epsilon by the documented rule "
                     f"(fl.training.dp_sgd.default_batch_and_clip); set --dpsgd-batch-size / --dpsgd-clip to override")
    probe = DpSgdTrainer(noise_multiplier=1.0, max_grad_norm=clip, batch_size=batch, epochs=config.local_epochs)
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
        noise_multiplier=noise, max_grad_norm=clip, batch_size=batch, epochs=config.local_epochs,
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
    sums = [t for t in tokens if t in ("secagg", "secagg+", "paillier")]
    if len(sums) > 1:
        raise CompositionError(f"pick one secure sum, got {sums}")
    noises = [t for t in tokens if t in ("noise", "dnoise")]
    if len(noises) > 1:
        raise CompositionError(f"pick one noise stage (noise = central, dnoise = distributed), got {noises}")
    # distributed noise: every sum stops a round below the --threshold of the planned clients
    min_clients = 1
    if "dnoise" in noises:
        min_clients = threshold_count(config.privacy.cohort_threshold, _client_sampling(config, population)[2])
    ssum: SecureSum = (
        secure_sum_for(sums[0], config, population, min_clients=min_clients) if sums else PlainSum(min_clients)
    )
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
    for t in tokens:
        if t == "clip":
            layers.append(Clip(l2=config.privacy.clip))
        elif t == "quantize":
            layers.append(Quantize(bits=config.privacy.quant_bits))
        elif t in ("noise", "dnoise"):
            layer, fedavg = _dp_fedavg(config, t, population, size, ssum, notes)
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
    return PrivacyPlan(
        Pipeline(layers, sum=ssum), trainer=trainer, accounting=accounting, weighting=weighting, notes=tuple(notes)
    )
