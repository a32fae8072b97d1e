"""Configuration of a federated training run (what the CLI flags map to)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["DEFAULT_LR", "DP_TOKENS", "EarlyStopConfig", "PrivacyConfig", "TrainConfig"]

# Stages that add DP noise (what --epsilon calibrates).
DP_TOKENS = ("noise", "dnoise", "dp-sgd")

# Client learning rate per model family when ``TrainConfig.lr`` is None: plain SGD on standardized
# tabular data. Measured on IID splits of public tables (MASS Pima, biopsy, ISLR OJ, Caravan, sklearn
# wine): logreg at 1.0 for 20 rounds lands within 1.5 points of centralized logistic regression, at 0.1
# it can stay several points short. The MLP is less stable at 1.0.
DEFAULT_LR = {"logreg": 1.0, "mlp": 0.1}
"""Client learning rate per model family when --lr is not given (other families: 0.1)."""


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """The privacy layers of a run.

    ``spec``: comma-separated stages, e.g. ``"none"``, ``"secagg+"``, ``"clip,noise,secagg+"``,
    ``"dp-sgd"``, ``"dp-sgd,secagg"``, ``"clip,noise,paillier"``. Tokens: ``clip`` (``Clip(l2=clip)``),
    ``noise`` (central Gaussian on the sum, ``noise_multiplier`` x ``clip``), ``dnoise`` (distributed:
    each client adds its share), ``quantize`` (implied before secagg/secagg+/paillier), ``secagg``,
    ``secagg+``, ``paillier``, ``dp-sgd`` (example-level DP-SGD in client training), ``aclip`` (adaptive
    clipping in place of ``clip``: ``clip`` is the initial norm, it tracks the ``aclip_quantile`` of the update
    norms at rate ``aclip_lr``; needs ``noise`` or ``dnoise``).
    ``spec`` may also be a list of stage names (``["clip", "noise", "secagg+"]``).
    ``epsilon``/``delta``: target budget; when ``epsilon`` is set the noise multiplier is calibrated for
    the planned rounds, and training stops before the budget would be exceeded. ``epsilon`` without a
    DP stage (noise, dnoise, dp-sgd) is an error, not silently ignored.
    ``threshold``: the secure sum's threshold t, a fraction in (0, 1] (``0.7``) of the cohort (secagg; 0.7
    when ``None``) or of each share group (secagg+; ``None`` takes the t found with the graph), or a whole
    count of clients > 1 (``3`` or ``3.0``); ``1.5`` is neither and is refused. ``neighbours``: SecAgg+'s k
    (``None``: the smallest k meeting 40-bit security and 30-bit correctness when at most
    ``corrupt_fraction`` of the clients are corrupt and ``dropout_fraction`` drop). ``authenticated``:
    SecAgg(+) with Ed25519 identity keys and the consistency round (security against an active server).
    """

    spec: str = "none"
    clip: float = 1.0
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    accountant: Literal["pld", "rdp"] = "pld"
    quant_bits: int = 20
    threshold: float | None = None
    neighbours: int | None = None
    corrupt_fraction: float = 0.1
    dropout_fraction: float = 0.1
    authenticated: bool = False  # SecAgg(+) against an active server: signed messages, consistency round
    dpsgd_clip: float | None = None  # None: chosen from epsilon (fl.training.dp_sgd.default_batch_and_clip)
    dpsgd_noise_multiplier: float | None = None
    dpsgd_batch_size: int | None = None  # None: chosen from epsilon, like dpsgd_clip
    # ``aclip`` (fl.layers.adaptive_clip.AdaptiveClip): ``clip`` is the initial norm
    aclip_quantile: float = 0.5
    aclip_lr: float = 0.2
    aclip_count_noise: float = 2.0

    @property
    def cohort_threshold(self) -> float:
        """The threshold as a fraction of the cohort (SecAgg, dropout floors): 0.7 unless set."""
        return 0.7 if self.threshold is None else self.threshold

    def __post_init__(self) -> None:
        spec: object = self.spec
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            if not all(isinstance(t, str) for t in spec):
                raise TypeError(f"PrivacyConfig(spec=...) takes stage names (str), got {spec!r}")
            object.__setattr__(self, "spec", ",".join(spec) or "none")
        elif not isinstance(spec, str):
            raise TypeError(
                f"PrivacyConfig(spec=...) takes a string like 'clip,noise,secagg+' or a list of stage names, "
                f"got {type(spec).__name__}"
            )
        self._check_threshold()
        self._check_unused_noise()

    def _check_threshold(self) -> None:
        if self.threshold is None:
            return
        t = float(self.threshold)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"--threshold must be a fraction in (0, 1] or a client count >= 1, got {self.threshold}")
        if t > 1 and not t.is_integer():
            raise ValueError(
                f"--threshold {self.threshold:g} is neither a fraction of the cohort in (0, 1] nor a whole number "
                f"of clients; write e.g. --threshold 0.7 (70% of the cohort) or --threshold 3 (three clients)"
            )

    def _check_unused_noise(self) -> None:
        toks = self.tokens()
        if self.epsilon is not None and not any(t in DP_TOKENS for t in toks):
            raise ValueError(
                f"--epsilon {self.epsilon:g} would be ignored: --privacy {self.spec!r} has no DP stage. Add one "
                f"(e.g. --privacy dp-sgd,secagg+ or clip,noise,secagg+) or drop --epsilon"
            )
        if self.noise_multiplier is not None and not any(t in ("noise", "dnoise") for t in toks):
            raise ValueError(
                f"--noise-multiplier would be ignored: --privacy {self.spec!r} has no noise or dnoise stage; "
                f"add one (e.g. --privacy clip,noise) or drop --noise-multiplier"
            )
        if self.authenticated and not any(t in ("secagg", "secagg+") for t in toks):
            raise ValueError(f"--authenticated would be ignored: --privacy {self.spec!r} has no secagg or secagg+ "
                             "stage; add one or drop --authenticated")
        if self.dpsgd_noise_multiplier is not None and "dp-sgd" not in toks:
            raise ValueError(
                f"--dpsgd-noise-multiplier would be ignored: --privacy {self.spec!r} has no dp-sgd stage; add "
                f"dp-sgd or drop the flag"
            )

    def tokens(self) -> tuple[str, ...]:
        toks = tuple(t.strip().lower() for t in self.spec.split(",") if t.strip())
        return () if toks in ((), ("none",)) else toks


@dataclass(frozen=True, slots=True)
class EarlyStopConfig:
    """Early stopping on a validation split held by the server (:mod:`fl.training.early_stop`).

    ``validation_fraction`` of the server's held-out rows become the validation split; the rest stay the
    test set of the final number (never used to stop). After each round the server evaluates the model on
    the validation split; training stops once the validation loss has not fallen by more than
    ``min_delta`` for ``patience`` rounds in a row, and the model of the best round is restored.
    """

    patience: int = 5
    min_delta: float = 0.0
    validation_fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"--patience must be a whole number of rounds >= 1, got {self.patience!r}")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"--min-delta must be a finite number >= 0 (a loss decrease), got {self.min_delta!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"--validation-fraction must be in (0, 1) (the share of the server's held-out rows used to decide "
                f"when to stop; the rest measure the final number), got {self.validation_fraction!r}"
            )


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that determines a run; with the same seed, two runs give the same model."""

    dataset: str = "breast_cancer"
    target: str | None = None  # CSV target column
    clients: int = 5
    partition: str = "iid"  # iid | dirichlet:ALPHA | by-column:NAME
    model: str = "logreg"  # logreg | mlp
    hidden: int = 64
    rounds: int = 20
    local_epochs: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the model family, resolved at construction
    batch_size: int = 64  # with lr 1.0 (logreg), batches of 32 left OJ 2.8 points short of centralized
    optimizer: Literal["sgd", "adam"] = "sgd"
    # "none" | "balanced" | "LABEL=W,..." | "W,..." (per class); a mapping or sequence is turned into that text
    # (fl.training.class_weights: "balanced" uses the class counts released with the federated statistics)
    class_weight: str = "none"
    cohort: int | None = None  # fixed cohort size (None = all clients)
    sample_rate: float | None = None  # Poisson client sampling rate q (overrides cohort)
    weighting: Literal["samples", "uniform"] = "samples"
    server_opt: Literal["fedavg", "fedadam"] = "fedavg"
    server_lr: float = 1.0
    dropout: float = 0.0  # probability a sampled client drops during a round (simulation)
    test_fraction: float = 0.2
    # per-site data and federated preprocessing (fl.data.sites / fl.data.stats)
    sites: tuple[tuple[str, str], ...] = ()  # (NAME, CSV PATH) per site; then --partition/--clients do not apply
    sites_dir: str | None = None  # a folder of CSVs, one per site (file stem = site name)
    test_site: str | None = None  # the server's evaluation CSV (else each site holds out test_fraction)
    missing: Literal["refuse", "drop", "impute"] = "refuse"
    drop_columns: tuple[str, ...] = ()  # never features (ids)
    keep_columns: tuple[str, ...] = ()  # id-like names used as features anyway
    categories: tuple[tuple[str, tuple[str, ...]], ...] = ()  # declared vocabularies (required under DP)
    feature_bounds: tuple[tuple[str, float, float], ...] = ()  # public ranges (COL, LO, HI)
    standardize: Literal["federated", "public"] = "federated"  # public: scale by public ranges, no ε
    stats_epsilon: float | None = None  # DP budget of the standardization statistics (default 0.5 with DP)
    seed: int = 0
    # Named test seam: derive DP noise, rounding bits and session ids from ``seed`` so runs repeat
    # exactly (tests, resume checks). Never in production: whoever knows the seed can remove the noise.
    insecure_seeded_randomness: bool = False
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    early_stopping: EarlyStopConfig | None = None  # None: run all ``rounds`` (see EarlyStopConfig)

    def __post_init__(self) -> None:
        if isinstance(self.early_stopping, Mapping):  # from as_dict() (checkpoints, Flower jobs)
            object.__setattr__(self, "early_stopping", EarlyStopConfig(**self.early_stopping))
        from fl.training.class_weights import normalize_class_weight

        object.__setattr__(self, "class_weight", normalize_class_weight(self.class_weight))
        if self.lr is None:
            # resolved here so every consumer sees a float; dataclasses.replace(cfg, model=...) keeps the
            # resolved value -- pass lr=None with it to pick the new family's default
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.model, 0.1))
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")

    @property
    def client_lr(self) -> float:
        """The client learning rate (``lr``, resolved from the model family when it was None)."""
        return float(self.lr or DEFAULT_LR.get(self.model, 0.1))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
