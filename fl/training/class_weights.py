"""Class weights for the training loss (``--class-weight``): one public weight vector per run.

Each example's loss is multiplied by the weight of its class. Three forms:

- ``"none"`` (default): every example weighs 1.
- explicit weights, ``"0=1,1=5"`` (class label = weight; unlisted classes weigh 1) or ``"1,5"`` (one weight
  per class, in the run's class order): public numbers the user states, so they cost no privacy.
- ``"balanced"``: ``w_c = N / (K * n_c)`` (scikit-learn's rule) from the class counts ``n_c``.

**Where the counts of "balanced" come from.** Weights computed from a site's own label counts are
data-dependent: under DP-SGD, changing one example would change every other example's weight, which
per-example clipping does not cover. So the counts are the ones *released* with the federated
preprocessing statistics (:func:`fl.data.stats.federated_statistics` with ``labels=``): one secure sum
over all sites, with DP noise and in the same ledger entry as the moments when the run uses DP. Weights
derived from that release are post-processing and cost nothing more. Every client side (in memory or a
Flower node, which gets the release inside the job) derives the same vector from the same release. With
no release (the Python API's in-memory arrays, or ``--standardize public``), "balanced" is computed from
the pooled labels without DP and refused under DP, naming explicit public weights as the fix.

Weights scale each example's loss *before* DP-SGD clips its gradient (:func:`dp.sgd.dp_sgd`'s
``class_weight``), so the clip norm still bounds each example's contribution and the accounting is
unchanged. The flip side: an example whose gradient already clips gains nothing from a larger weight, and
the epsilon rule's clip norm (:func:`fl.training.dp_sgd.default_batch_and_clip`) is chosen so that most
gradients clip. On a 95/5 table at epsilon 4, "balanced" moved balanced accuracy from 0.52 to 0.55 with
the rule's clip and from 0.55 to 0.78 with ``--dpsgd-clip 5`` (same epsilon): raise the clip when the
weights should act.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from fl.config import TrainConfig
    from fl.data.sites import Dataset
    from fl.data.stats import FederatedStats
    from fl.spec import ClientTrainer

__all__ = ["ClassWeights", "apply_class_weights", "balanced_weights", "normalize_class_weight",
           "resolve_class_weights"]

NONE, BALANCED = "none", "balanced"
FIX = "give public weights instead, e.g. --class-weight 0=1,1=5 (class_weight={'0': 1, '1': 5} in fl.train)"


def _weight(text: object, where: str) -> float:
    """One weight: a finite number > 0 (a zero weight would silently drop a class from training)."""
    try:
        w = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"class weight {where} is not a number ({text!r}); write e.g. --class-weight 0=1,1=5") \
            from None
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"class weight {where} must be a finite number > 0, got {text!r}; a class that should not "
                         f"count is better dropped from the data, e.g. --class-weight 0=1,1=5")
    return w


def _label(key: object) -> str:
    label = str(key).strip()
    if not label or "," in label or "=" in label:
        raise ValueError(f"class label {key!r} cannot be named in --class-weight LABEL=W,...; give one weight "
                         f"per class in class order instead (e.g. --class-weight 1,5)")
    return label


def _from_mapping(items: Sequence[tuple[object, object]]) -> str:
    if not items:
        raise ValueError("empty class-weight mapping; give at least one LABEL=WEIGHT (e.g. --class-weight 0=1,1=5)")
    seen: dict[str, float] = {}
    for key, value in items:
        label = _label(key)
        if label in seen:
            raise ValueError(f"class {label!r} is given two weights in --class-weight; give each class once")
        seen[label] = _weight(value, f"for class {label!r}")
    return ",".join(f"{k}={w!r}" for k, w in seen.items())


def normalize_class_weight(value: object) -> str:
    """The canonical text of a class-weight option (what a TrainConfig and a Flower job carry, as JSON).

    Accepts ``None``/``"none"``, ``"balanced"``, ``"LABEL=W,LABEL=W"``, ``"W,W"`` (per class, in order), a
    mapping ``{label: weight}`` or a sequence of weights. Bad input is a ``ValueError`` naming the fix.
    """
    if value is None:
        return NONE
    if isinstance(value, Mapping):
        return _from_mapping(list(value.items()))
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in (NONE, BALANCED):
            return text.lower()
        parts = [p.strip() for p in text.split(",")]
        if all("=" in p for p in parts):
            return _from_mapping([tuple(p.split("=", 1)) for p in parts])  # type: ignore[misc]
        if any("=" in p for p in parts):
            raise ValueError(f"--class-weight {value!r} mixes LABEL=W and bare weights; write all as LABEL=W "
                             f"(0=1,1=5) or all as weights in class order (1,5)")
        return ",".join(repr(_weight(p, f"#{i}")) for i, p in enumerate(parts))
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, bytes):
        if len(value) == 0:
            raise ValueError("empty class-weight sequence; give one weight per class (e.g. [1, 5])")
        return ",".join(repr(_weight(w, f"#{i}")) for i, w in enumerate(value))
    raise ValueError(f"class_weight must be 'none', 'balanced', a mapping {{label: weight}} or a sequence of "
                     f"weights, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class ClassWeights:
    """The run's weight per class (in ``classes`` order), the option it came from and where its counts came from."""

    spec: str
    classes: tuple[str, ...]
    weights: tuple[float, ...]
    source: str
    counts: tuple[float, ...] | None = None  # the class counts "balanced" used (released, or pooled without DP)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "weights": dict(zip(self.classes, self.weights, strict=True)),
                               "source": self.source}
        if self.counts is not None:
            out["counts"] = dict(zip(self.classes, self.counts, strict=True))
        return out


def balanced_weights(counts: ArrayLike) -> tuple[float, ...]:
    """``N / (K * n_c)`` with each count floored at 1 (a noisy DP count can be <= 0; post-processing)."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return tuple(float(v) for v in c.sum() / (len(c) * c))


def _explicit(spec: str, classes: tuple[str, ...]) -> tuple[float, ...]:
    parts = spec.split(",")
    if "=" not in spec:
        if len(parts) != len(classes):
            raise ValueError(f"--class-weight {spec} gives {len(parts)} weight(s) but the run has {len(classes)} "
                             f"classes ({', '.join(classes)}); give one per class, or name them: "
                             + ",".join(f"{c}=W" for c in classes))
        return tuple(float(p) for p in parts)
    given = dict(p.split("=", 1) for p in parts)
    unknown = [k for k in given if k not in classes]
    if unknown:
        raise ValueError(f"--class-weight names class(es) {unknown} that the data does not have; its classes are "
                         f"{', '.join(classes)} (e.g. --class-weight " + ",".join(f"{c}=1" for c in classes) + ")")
    return tuple(float(given.get(c, 1.0)) for c in classes)


def _is_dp(config: TrainConfig) -> bool:
    from fl.config import DP_TOKENS

    return any(t in DP_TOKENS for t in config.privacy.tokens())


def _missing_counts(stats: FederatedStats | None, dp: bool) -> str | None:
    """Why the run has no (DP, under DP) class counts to balance with; ``None`` when it has them."""
    if stats is None:
        return None if not dp else "these sites come with no federated statistics release"
    if stats.guarantee.layer == "public-standardization":
        return "--standardize public releases no class counts"
    if stats.label_counts is None:
        return ("the preprocessing release (a checkpoint's or a Flower job's) was made without class counts; "
                "release the statistics again with --class-weight balanced")
    if dp and stats.event is None:
        return "the preprocessing release carries no DP guarantee"
    return None


def _balanced(config: TrainConfig, data: Dataset) -> ClassWeights:
    """"balanced" from the released class counts; without a release, pooled labels (no DP) or a refusal."""
    stats, dp = data.stats, _is_dp(config)
    why = _missing_counts(stats, dp)
    if why is not None:
        need = "class counts released with DP" if dp else "the class counts of the federated statistics"
        risk = (" (local label counts would make every example's weight depend on the others' labels, which "
                "DP-SGD's clipping does not cover)" if dp else "")
        raise ValueError(f"--class-weight balanced needs {need}, but {why}{risk}. Use --standardize federated, "
                         f"or {FIX}")
    if stats is None:  # no DP, in-memory sites without a release: the pooled labels (one process, one vector)
        counts = tuple(float(v) for v in np.bincount(data.y_train, minlength=len(data.classes)))
        return ClassWeights(BALANCED, data.classes, balanced_weights(counts), "pooled labels of all sites (no DP)",
                            counts)
    assert stats.label_counts is not None
    if tuple(stats.label_classes) != tuple(data.classes):
        raise ValueError(f"the preprocessing release counted classes {list(stats.label_classes)} but the run "
                         f"has {list(data.classes)}; release the statistics again on this data")
    counts = tuple(float(v) for v in stats.label_counts)
    source = "class counts released with the federated statistics" + (" (DP)" if stats.event is not None else "")
    return ClassWeights(BALANCED, data.classes, balanced_weights(counts), source, counts)


def resolve_class_weights(config: TrainConfig, data: Dataset) -> ClassWeights | None:
    """The run's one weight vector (the same on every client side), or ``None`` for ``"none"``."""
    spec = config.class_weight
    if spec == NONE:
        return None
    classes = tuple(data.classes)
    if len(classes) < 2:
        raise ValueError(f"--class-weight {spec} weighs the classes of a classifier, but the run has "
                         f"{len(classes)} class(es); drop --class-weight")
    if spec == BALANCED:
        return _balanced(config, data)
    return ClassWeights(spec, classes, _explicit(spec, classes), "explicit (public, no privacy cost)")


def apply_class_weights(trainer: ClientTrainer, weights: ClassWeights | None) -> ClientTrainer:
    """The trainer with the run's class weights (a plain or DP-SGD trainer), unchanged without weights."""
    from fl.training.dp_sgd import DpSgdTrainer
    from fl.training.trainers import PlainTrainer

    if weights is None:
        return trainer
    if isinstance(trainer, PlainTrainer | DpSgdTrainer):
        return dataclasses.replace(trainer, class_weight=weights.weights)
    raise ValueError(f"trainer {type(trainer).__name__} takes no class weights; drop --class-weight")
