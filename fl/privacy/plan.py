"""Turn a privacy spec (``--privacy clip,noise,secagg+``) into a pipeline, a client trainer and accounting.

:data:`STAGES` is the one table of ``--privacy`` words: each maps to a factory that builds a layer, a
secure sum or a trainer from the run's settings (a :class:`PlanContext`). Objects decide the rest: the
order rules live in :meth:`fl.pipeline.Pipeline.bind` (the layers' and the sum's own ``bind``), and each
sum states its own guarantee, whether it hides the updates (``hides_updates``) and the fewest clients it
may be released with (``min_included``). A new secure sum is its own module plus one line here.

- ``clip``: ``Clip(l2=clip)``; ``quantize``: ``Quantize(bits)`` (implied before a secure sum).
- ``secagg`` / ``secagg+`` / ``paillier``: the secure sum (last stage).
- ``noise``: user-level DP-FedAvg with central noise -- the server adds ``N(0, (z * clip)^2)`` to the sum.
- ``dnoise``: distributed DP-FedAvg -- each planned client adds ``N(0, (z * clip)^2 / n_expected)`` before
  the secure sum; the ledger charges the survivors' noise ``z * sqrt(n_included / n_expected)``, for the
  released model (amplified by the secret sample) and for the server (which knows the sample: not
  amplified). Every sum then stops a round below ``--threshold`` of the planned clients.
- ``aclip``: adaptive clipping in place of ``clip`` (:class:`fl.layers.adaptive_clip.AdaptiveClip`, initial
  norm ``clip``); needs ``noise``/``dnoise``, whose one Gaussian also covers its noisy count.
- ``dp-sgd``: example-level DP-SGD in each client's local training (:class:`fl.training.dp_sgd.DpSgdTrainer`).

``noise``/``dnoise`` force unweighted averaging (``weighting="uniform"``), as the DP-FedAvg analysis
requires. When ``epsilon`` is set the noise multiplier is calibrated with dp-accounting's
``calibrate_dp_mechanism``: for DP-FedAvg, ``config.rounds`` of the layer's worst-case round (fewest
survivors, the sum's own ``min_included``) for each observer it protects, taking the largest; for
DP-SGD, per client, ``config.rounds * local_epochs * ceil(n_k / batch)`` Poisson steps at rate
``batch / n_k`` (assuming the client takes part in every round, so the budget holds whatever the
client sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

from dp.accounting import calibrate_noise
from fl.config import TrainConfig
from fl.errors import CompositionError
from fl.layers.adaptive_clip import AdaptiveClip
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise
from fl.pipeline import Pipeline
from fl.privacy.accounting import DpFedAvgAccounting, DpSgdAccounting
from fl.spec import ClientTrainer, Layer, PrivacyAccounting, RoundInfo, SecureSum, ValueSpec
from fl.sums.paillier import PaillierSum
from fl.sums.plain import PlainSum, threshold_count
from fl.sums.secagg import SecAgg, SecAggPlus
from fl.training.dp_sgd import DpSgdTrainer, default_batch_and_clip

__all__ = [
    "KNOWN_TOKENS", "STAGES", "Calibrator", "PlanContext", "PrivacyPlan", "Stage", "SumFloor", "build_plan",
    "is_sum_token", "known_tokens", "secure_sum_for",
]


@dataclass(frozen=True)
class PrivacyPlan:
    """What the training loop needs from a privacy spec."""

    pipeline: Pipeline
    trainer: ClientTrainer | None = None  # None: the loop's plain trainer
    accounting: PrivacyAccounting | None = None
    weighting: Literal["samples", "uniform"] | None = None  # forced by the layers (DP needs uniform)
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class PlanContext:
    """The run's settings a stage factory may read."""

    config: TrainConfig
    population: int
    min_clients: int = 1  # every sum stops a round below this (distributed noise: --threshold of the planned)

    @property
    def min_cohort(self) -> int | None:
        """The smallest cohort clients accept (a server cannot shrink t): the fixed cohort (``None``), or
        for Poisson sampling six standard deviations below the expected count (smaller rounds abort)."""
        q = self.config.sample_rate
        if q is None:
            return None
        mu = q * self.population
        return min(self.population, max(2, math.floor(mu - 6 * math.sqrt(mu * (1 - q)))))


Calibrator = Callable[..., float]
"""``calibrate_noise``'s signature (keyword arguments only): the smallest noise multiplier for a budget."""

StageKind = Literal["none", "layer", "noise", "sum", "trainer"]


@dataclass(frozen=True)
class Stage:
    """What one ``--privacy`` word builds: a layer, a secure sum, a noise layer (calibrated) or a trainer."""

    kind: StageKind
    build: Callable[[PlanContext], object] | None = None

    @classmethod
    def secure_sum(cls, factory: Callable[[PlanContext], SecureSum]) -> Stage:
        return cls("sum", factory)

    @classmethod
    def layer(cls, factory: Callable[[PlanContext], Layer]) -> Stage:
        return cls("layer", factory)


def _secagg(ctx: PlanContext) -> SecureSum:
    return SecAgg(threshold=ctx.config.privacy.cohort_threshold, min_cohort=ctx.min_cohort,
                  authenticated=ctx.config.privacy.authenticated)


def _secagg_plus(ctx: PlanContext) -> SecureSum:
    pc = ctx.config.privacy
    return SecAggPlus(threshold=pc.threshold, neighbours=pc.neighbours, corrupt=pc.corrupt_fraction,
                      dropout=pc.dropout_fraction, min_cohort=ctx.min_cohort, authenticated=pc.authenticated)


def _paillier(ctx: PlanContext) -> SecureSum:
    return PaillierSum(min_clients=max(2, ctx.min_clients))


def _adaptive_clip(ctx: PlanContext) -> Layer:
    """The ``aclip`` word: refused where its count would be released without noise or clipped twice."""
    tokens = ctx.config.privacy.tokens()
    if not any(t in ("noise", "dnoise") for t in tokens):
        raise CompositionError(
            "'aclip' releases a count of unclipped clients that only a noise stage protects: add noise or dnoise "
            "after it (--privacy aclip,noise or aclip,dnoise,secagg+), or use clip"
        )
    if "clip" in tokens or tokens.count("aclip") > 1:
        raise CompositionError("use one clipping stage: either clip (fixed norm) or aclip (adaptive), once")
    pc = ctx.config.privacy
    try:
        return AdaptiveClip(target_quantile=pc.aclip_quantile, initial_clip=pc.clip, learning_rate=pc.aclip_lr,
                            count_noise=pc.aclip_count_noise)
    except ValueError as exc:
        fix = "set it with --aclip-quantile, --clip, --aclip-lr or --aclip-count-noise"
        raise CompositionError(f"{exc} ({fix})") from exc


STAGES: dict[str, Stage] = {
    "none": Stage("none"),
    "clip": Stage.layer(lambda ctx: Clip(l2=ctx.config.privacy.clip)),
    "aclip": Stage.layer(_adaptive_clip),
    "quantize": Stage.layer(lambda ctx: Quantize(bits=ctx.config.privacy.quant_bits)),
    "secagg": Stage.secure_sum(_secagg),
    "secagg+": Stage.secure_sum(_secagg_plus),
    "paillier": Stage.secure_sum(_paillier),
    "noise": Stage("noise"),
    "dnoise": Stage("noise"),
    "dp-sgd": Stage("trainer"),
}
"""The one table of ``--privacy`` words. Register a new secure sum with one line:
``STAGES["mysum"] = Stage.secure_sum(lambda ctx: MySum(...))``."""

KNOWN_TOKENS = tuple(STAGES)
"""The built-in words (see :func:`known_tokens` for the table as it is now)."""


def known_tokens() -> tuple[str, ...]:
    return tuple(STAGES)


def is_sum_token(token: str) -> bool:
    """Whether ``token`` names a secure sum in :data:`STAGES`."""
    stage = STAGES.get(token)
    return stage is not None and stage.kind == "sum"


def secure_sum_for(token: str, config: TrainConfig, population: int, *, min_clients: int = 1) -> SecureSum:
    """The secure sum a ``--privacy`` token names, configured from the run's own settings."""
    return _build_sum(token, PlanContext(config, population, min_clients))


def _build_sum(token: str, ctx: PlanContext) -> SecureSum:
    stage = STAGES.get(token)
    if stage is None or stage.kind != "sum" or stage.build is None:
        raise CompositionError(f"{token!r} is not a secure sum; choose from {', '.join(filter(is_sum_token, STAGES))}")
    return cast(SecureSum, stage.build(ctx))


@dataclass(frozen=True)
class SumFloor:
    """The fewest survivors a round planned with ``n`` clients can be released with: the sum's own rule.

    Asks the sum itself (:meth:`SecureSum.min_included`), so the accountant's worst case is exactly the
    round the sum would still release."""

    ssum: SecureSum
    size: int

    def __call__(self, n: int) -> int:
        if n <= 0:
            return 0
        return max(1, min(n, self.ssum.min_included(ValueSpec(size=self.size, cohort=n))))


def _client_sampling(config: TrainConfig, population: int) -> tuple[float, Literal["poisson", "fixed"], int]:
    """(sample rate, scheme, expected clients per round) of the loop's client sampling."""
    if config.sample_rate is not None:
        q = config.sample_rate
        return q, "poisson", max(1, round(q * population))
    k = config.cohort or population
    return k / population, "fixed", k


def _calibrate(
    config: TrainConfig, layer: GaussianNoise, spec: ValueSpec, worst: RoundInfo, *, hides: bool,
    calibrate: Calibrator = calibrate_noise,
) -> tuple[float, str]:
    """The smallest multiplier meeting the budget for every observer of the layer, in the worst round.

    Each observer's per-round multiplier is linear in the layer's ``multiplier`` (one computation:
    :meth:`GaussianNoise.steps`), so calibrate each observer's step and scale back.
    """
    pc = config.privacy
    assert pc.epsilon is not None
    best, which = 0.0, ""
    for observer, unit in layer.steps(spec, worst, sum_hides_updates=hides).items():
        z = calibrate(
            epsilon=pc.epsilon, delta=pc.delta, sample_rate=unit.sample_rate, steps=config.rounds,
            accountant=pc.accountant, sampling=unit.sampling, population=unit.population or None,
        ) / unit.noise_multiplier
        if z > best:
            best, which = z, observer
    return best, which


def _dp_fedavg(
    config: TrainConfig, token: str, population: int, size: int, ssum: SecureSum, notes: list[str],
    calibrate: Calibrator = calibrate_noise, adaptive: AdaptiveClip | None = None,
) -> tuple[GaussianNoise, DpFedAvgAccounting]:
    pc = config.privacy
    # adaptive clipping: the noise covers its output (update / C_t plus the count coordinate)
    clip, size = (adaptive.sensitivity, size + 1) if adaptive is not None else (pc.clip, size)
    q, sampling, expected = _client_sampling(config, population)
    if pc.epsilon is not None and pc.noise_multiplier is not None:
        raise CompositionError("give either --epsilon (to calibrate the noise) or --noise-multiplier, not both")
    if pc.epsilon is None and pc.noise_multiplier is None:
        raise CompositionError(f"{token!r} needs a noise level: pass --noise-multiplier Z or --epsilon E --delta D")
    placement: Literal["server", "clients"] = "clients" if token == "dnoise" else "server"
    hides = ssum.hides_updates
    floor = SumFloor(ssum, size)
    z = pc.noise_multiplier if pc.noise_multiplier is not None else 1.0
    layer = GaussianNoise(multiplier=z, placement=placement, shares=expected)
    if pc.epsilon is not None:
        n_worst = floor(expected) if placement == "clients" else expected
        worst = RoundInfo(round=0, planned=tuple(range(expected)), included=tuple(range(n_worst)),
                          population=population, sample_rate=q, sampling=sampling)
        spec = ValueSpec(size=size, cohort=expected, l2_bound=clip)
        z, observer = _calibrate(config, layer, spec, worst, hides=hides, calibrate=calibrate)
        layer = GaussianNoise(multiplier=z, placement=placement, shares=expected)
        notes.append(
            f"DP-FedAvg noise multiplier {z:.4f} calibrated for ({pc.epsilon:g}, {pc.delta:g})-DP at client level "
            f"over {config.rounds} rounds against the {observer} (the tightest observer), {sampling} client "
            f"sampling at rate {q:.4g} ({pc.accountant})"
            + (f", with as few as {n_worst} of {expected} clients surviving a round" if n_worst < expected else "")
        )
    notes += _dp_fedavg_notes(config, placement, hides=hides, sampling=sampling, q=q)
    if adaptive is not None:
        notes.append(_adaptive_note(adaptive, layer.multiplier))
    accounting = DpFedAvgAccounting(
        noise=layer, clip=clip, size=size, delta=pc.delta, accountant=pc.accountant, epsilon=pc.epsilon,
        floor=floor, sum_hides_updates=hides, adaptive=adaptive,
    )
    return layer, accounting


def _adaptive_note(adaptive: AdaptiveClip, z: float) -> str:
    update, count = adaptive.sensitivity * z, adaptive.count_noise * z
    return (
        f"adaptive clipping toward the {adaptive.target_quantile:g} quantile of update norms: its noisy count of "
        f"unclipped clients rides in one extra coordinate under the same Gaussian, so the update's noise "
        f"multiplier is {update:.4g} (z x {adaptive.sensitivity:.4g}) and the count's noise std {count:.4g} "
        "clients; the ledger charges the joint multiplier z"
    )


def _dp_fedavg_notes(
    config: TrainConfig, placement: str, *, hides: bool, sampling: str, q: float
) -> list[str]:
    """What the report says about a DP-FedAvg run's threat model and accounting choices."""
    notes: list[str] = []
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
    return notes


def _dp_sgd(
    config: TrainConfig, client_sizes: Mapping[int, int], notes: list[str], calibrate: Calibrator = calibrate_noise,
    smallest: int = 1,
) -> tuple[DpSgdTrainer, DpSgdAccounting]:
    pc = config.privacy
    rule_batch, rule_clip = default_batch_and_clip(pc.epsilon, smallest)  # the same for every client side
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
                cache[key] = calibrate(
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


def _parse(tokens: tuple[str, ...]) -> tuple[list[str], list[str], bool]:
    """Check the words against :data:`STAGES`; the sum words, the noise words and whether DP-SGD is on.

    Only what no object can check is checked here: every word is known, one secure sum (a pipeline has
    one, and it ends it), one noise stage and one DP ledger. Everything about order is ``bind``'s."""
    unknown = [t for t in tokens if t not in STAGES]
    if unknown:
        raise CompositionError(
            f"unknown privacy stage(s) {unknown}; choose from {', '.join(STAGES)} (comma-separated)"
        )
    sums = [t for t in tokens if STAGES[t].kind == "sum"]
    if len(sums) > 1:
        raise CompositionError(f"pick one secure sum, got {sums}")
    if sums and tokens[-1] != sums[0]:
        raise CompositionError(f"the secure sum {sums[0]!r} must be the last stage of --privacy")
    noises = [t for t in tokens if STAGES[t].kind == "noise"]
    if len(noises) > 1:
        raise CompositionError(f"pick one noise stage (noise = central, dnoise = distributed), got {noises}")
    trainers = [t for t in tokens if STAGES[t].kind == "trainer"]
    if len(trainers) > 1:
        raise CompositionError("'dp-sgd' appears twice in --privacy")
    if noises and trainers:
        raise CompositionError(
            "combine either example-level dp-sgd or client-level clip,noise/dnoise in one run, not both "
            "(their ledgers would need joint accounting)"
        )
    return sums, noises, bool(trainers)


def _bind_check(pipeline: Pipeline, config: TrainConfig, *, size: int, population: int) -> None:
    """Bind the pipeline for the run's largest cohort; the layers' and sum's own rules, in the CLI's words."""
    cohort = config.cohort if (config.cohort and config.sample_rate is None) else population
    try:
        pipeline.bind(ValueSpec(size=size, cohort=cohort))
    except CompositionError as exc:
        raise CompositionError(f"--privacy {config.privacy.spec}: {exc}") from exc


def build_plan(
    config: TrainConfig, *, size: int, population: int, client_sizes: Mapping[int, int],
    calibrate: Calibrator = calibrate_noise, smallest_client: int | None = None,
) -> PrivacyPlan:
    """Build the plan for ``config.privacy``; raises ``CompositionError`` for an unknown or bad spec.

    ``calibrate``: :func:`dp.accounting.calibrate_noise` or a memo of it with the same keyword
    arguments and result (a Flower node keeps one across ClientApp processes). ``smallest_client``: the
    fewest rows any client of the run has (public n_k; default: the smallest in ``client_sizes``), which
    caps DP-SGD's batch when the rule chooses it, the same for every client side of the run."""
    tokens = config.privacy.tokens()
    sums, noises, dp_sgd = _parse(tokens)
    min_clients = 1  # distributed noise: every sum stops a round below the --threshold of the planned clients
    if noises == ["dnoise"]:
        min_clients = threshold_count(config.privacy.cohort_threshold, _client_sampling(config, population)[2])
    ctx = PlanContext(config, population, min_clients)
    ssum = _build_sum(sums[0], ctx) if sums else PlainSum(min_clients)
    notes: list[str] = []
    accounting: PrivacyAccounting | None = None
    layers: list[Layer] = []
    for t in tokens:
        stage = STAGES[t]
        if stage.kind == "layer" and stage.build is not None:
            layers.append(cast(Layer, stage.build(ctx)))
        elif stage.kind == "noise":
            adaptive = next((x for x in layers if isinstance(x, AdaptiveClip)), None)
            layer, accounting = _dp_fedavg(config, t, population, size, ssum, notes, calibrate, adaptive)
            layers.append(layer)
    trainer: ClientTrainer | None = None
    if dp_sgd:
        smallest = smallest_client if smallest_client is not None else min(client_sizes.values(), default=1)
        trainer, accounting = _dp_sgd(config, client_sizes, notes, calibrate, smallest)
    if sums and not any(isinstance(layer, Quantize) for layer in layers):  # a secure sum sums a ring
        if not any(isinstance(layer, Clip | AdaptiveClip) for layer in layers):
            layers.append(Clip(l2=config.privacy.clip))
        layers.append(Quantize(bits=config.privacy.quant_bits))
    pipeline = Pipeline(layers, sum=ssum)
    _bind_check(pipeline, config, size=size, population=population)
    return PrivacyPlan(pipeline, trainer=trainer, accounting=accounting, weighting="uniform" if noises else None,
                       notes=tuple(notes))
