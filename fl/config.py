"""Configuration of a federated training run (what the CLI flags map to)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["PrivacyConfig", "TrainConfig"]


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """The privacy layers of a run.

    ``spec``: comma-separated stages, e.g. ``"none"``, ``"secagg+"``, ``"clip,noise,secagg+"``,
    ``"dp-sgd"``, ``"dp-sgd,secagg"``, ``"clip,noise,paillier"``. Tokens: ``clip`` (``Clip(l2=clip)``),
    ``noise`` (central Gaussian on the sum, ``noise_multiplier`` x ``clip``), ``dnoise`` (distributed:
    each client adds its share), ``quantize`` (implied before secagg/secagg+/paillier), ``secagg``,
    ``secagg+``, ``paillier``, ``dp-sgd`` (example-level DP-SGD in client training).
    ``epsilon``/``delta``: target budget; when ``epsilon`` is set the noise multiplier is calibrated for
    the planned rounds, and training stops before the budget would be exceeded.
    ``threshold``: the secure sum's threshold as a fraction of the cohort (secagg; 0.7 when ``None``) or
    of each share group (secagg+; ``None`` takes the t found with the graph). ``neighbours``: SecAgg+'s k
    (``None``: the smallest k meeting 40-bit security and 30-bit correctness when at most
    ``corrupt_fraction`` of the clients are corrupt and ``dropout_fraction`` drop).
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
    dpsgd_clip: float = 1.0
    dpsgd_noise_multiplier: float | None = None
    dpsgd_batch_size: int = 32

    @property
    def cohort_threshold(self) -> float:
        """The threshold as a fraction of the cohort (SecAgg, dropout floors): 0.7 unless set."""
        return 0.7 if self.threshold is None else self.threshold

    def tokens(self) -> tuple[str, ...]:
        toks = tuple(t.strip().lower() for t in self.spec.split(",") if t.strip())
        return () if toks in ((), ("none",)) else toks


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
    lr: float = 0.1
    batch_size: int = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    cohort: int | None = None  # fixed cohort size (None = all clients)
    sample_rate: float | None = None  # Poisson client sampling rate q (overrides cohort)
    weighting: Literal["samples", "uniform"] = "samples"
    server_opt: Literal["fedavg", "fedadam"] = "fedavg"
    server_lr: float = 1.0
    dropout: float = 0.0  # probability a sampled client drops during a round (simulation)
    test_fraction: float = 0.2
    # per-site data and federated preprocessing (fl.data / fl.preprocess)
    sites: tuple[tuple[str, str], ...] = ()  # (NAME, CSV PATH) per site; then --partition/--clients do not apply
    sites_dir: str | None = None  # a folder of CSVs, one per site (file stem = site name)
    test_site: str | None = None  # the server's evaluation CSV (else each site holds out test_fraction)
    missing: Literal["refuse", "drop", "impute"] = "refuse"
    drop_columns: tuple[str, ...] = ()  # never features (ids)
    keep_columns: tuple[str, ...] = ()  # id-like names used as features anyway
    categories: tuple[tuple[str, tuple[str, ...]], ...] = ()  # declared vocabularies (required under DP)
    feature_bounds: tuple[tuple[str, float, float], ...] = ()  # public ranges (COL, LO, HI)
    stats_epsilon: float | None = None  # DP budget of the standardization statistics (default 0.5 with DP)
    seed: int = 0
    # Named test seam: derive DP noise, rounding bits and session ids from ``seed`` so runs repeat
    # exactly (tests, resume checks). Never in production: whoever knows the seed can remove the noise.
    insecure_seeded_randomness: bool = False
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
