"""Reports: the JSON file, a plot of accuracy per round, and a readable summary."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_rounds", "summary_lines", "write_json"]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/Inf to None/strings."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2) + "\n")


def _plot_title(report: Mapping[str, Any]) -> str:
    """Data set, clients and the privacy stages (wrapped so the figure never cuts it)."""
    import textwrap

    cfg = report.get("config", {})
    spec = cfg.get("privacy", {}).get("spec", "none")
    head = f"{cfg.get('dataset')} · {cfg.get('clients')} clients · privacy: {spec}"
    return "\n".join([*textwrap.wrap(head, width=90), *textwrap.wrap(str(report.get("pipeline")), width=90)])


def plot_rounds(report: Mapping[str, Any], path: Path, *, title: str | None = None) -> None:
    """Test accuracy per round, with the baselines; epsilon spent on a second axis if DP.

    The legend sits below the axes (never over the curves) and the title names the privacy stages.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r for r in report["rounds"] if "accuracy" in r]
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    ax.plot([r["round"] for r in rounds], [r["accuracy"] for r in rounds], marker="o", ms=3, label="federated")
    baseline = report.get("baseline", {})
    for key, label, style in (("federated_nonprivate_accuracy", "federated, no privacy", ("tab:green", "-.")),
                              ("centralized_accuracy", "centralized, no privacy", ("gray", "--")),
                              ("majority_class_rate", "majority class", ("tab:brown", ":"))):
        value = baseline.get(key)
        if value is not None:
            ax.axhline(value, color=style[0], ls=style[1], label=f"{label} ({value:.3f})")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    handles, labels = ax.get_legend_handles_labels()
    eps = [r.get("epsilon") for r in rounds]
    if any(e is not None for e in eps):
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in rounds], [e if e is not None else float("nan") for e in eps], color="tab:red",
                 ls=":", label="epsilon spent")
        ax2.set_ylabel("epsilon", color="tab:red")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small",
              frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title or _plot_title(report), fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


_LEVELS = {
    "example": "example-level: covers each record (row) of every client",
    "client": "client-level: covers each client's whole data set",
}


def _privacy_line(report: Mapping[str, Any]) -> str | None:
    """epsilon/delta, and whom they cover (unit) and against whom (observer)."""
    priv = report.get("privacy", {})
    final = report.get("final", {})
    if final.get("epsilon") is None:
        return None
    levels = [m.get("level") for m in priv.get("mechanisms", [])]
    who = "; ".join(_LEVELS.get(str(lv), str(lv)) for lv in levels) or "unit not reported"
    against = next((g["against"] for g in report.get("guarantees", []) if "epsilon" in g.get("params", {})), None)
    line = f"privacy: epsilon {final['epsilon']:.3f} at delta {final.get('delta'):g} ({who})"
    if "epsilon_preprocessing" in final:
        line += (f" = training {final['epsilon_training']:.3f} + preprocessing statistics "
                 f"{final['epsilon_preprocessing']:.3f} (basic composition)")
    if against:
        line += f"; against: {against}"
    return line


def _baseline_line(report: Mapping[str, Any], acc: float) -> str:
    b = report.get("baseline", {})
    parts = []
    fed = b.get("federated_nonprivate_accuracy")
    if fed is not None:
        parts.append(f"federated without privacy {fed:.4f} (privacy cost {100 * (fed - acc):+.1f} points)")
    central = f"centralized ({b['centralized_model']})" if b.get("centralized_model") else "centralized, no privacy"
    for key, label in (("centralized_accuracy", central), ("majority_class_rate", "majority class")):
        if b.get(key) is not None:
            parts.append(f"{label} {b[key]:.4f}")
    return "baselines: " + (" | ".join(parts) if parts else "not computed (--no-baselines)")


NEAR_MAJORITY = 0.25  # a model that removes less than this share of the majority rule's errors is flagged


def _majority_warning(acc: float, majority: float | None, final: Mapping[str, Any]) -> str | None:
    """A warning when the accuracy is at, below or barely above always answering the most frequent class.

    On imbalanced classes a high accuracy can look fine while the model hardly beats the majority rule
    (3% defaults: 96.7% for always answering "no"), so beyond "at or below" the run is also flagged when
    it removes less than ``NEAR_MAJORITY`` of the majority rule's errors: ``(acc - maj) / (1 - maj)``.
    """
    if majority is None or math.isnan(acc):
        return None
    if acc <= majority + 1e-12:
        return (f"WARNING: final accuracy {acc:.4f} is at or below the majority-class rate {majority:.4f}: the model "
                "does no better than always predicting the most frequent class (try more --rounds, another --lr, "
                "less noise)")
    if majority < 1 and (acc - majority) / (1 - majority) < NEAR_MAJORITY:
        extra = "".join(f", {label} {final[key]:.4f}" for key, label in (("balanced_accuracy", "balanced accuracy"),
                                                                         ("auc", "AUC")) if final.get(key) is not None)
        return (f"WARNING: final accuracy {acc:.4f} is only {100 * (acc - majority):.1f} points above the "
                f"majority-class rate {majority:.4f} (always predicting the most frequent class): it removes "
                f"{(acc - majority) / (1 - majority):.0%} of that rule's errors. Judge this run by AUC and balanced "
                f"accuracy{extra}, not by accuracy")
    return None


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The closing lines printed after a run: final numbers beside the baselines, privacy, per client.

    Warns when the final accuracy is at, below or barely above the majority-class rate (the model learned
    little that always answering the most frequent class would not give): :func:`_majority_warning`.
    """
    final = report["final"]
    acc = float(final.get("accuracy", float("nan")))
    line = f"final test accuracy {acc:.4f} after {final.get('rounds_completed')} rounds"
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("auc", "AUC")):
        if final.get(key) is not None:
            line += f"  {label} {final[key]:.4f}"
    if report.get("class_weight"):  # a weighted loss: say so beside the numbers it changes
        cw = report["class_weight"]
        ws = ", ".join(f"{c}: {w:.3g}" for c, w in cw.get("weights", {}).items())
        line += f"  (class weights {cw.get('spec')}: {ws}; {cw.get('source')})"
    lines = [line, _baseline_line(report, acc)]
    warning = _majority_warning(acc, report.get("baseline", {}).get("majority_class_rate"), final)
    if warning:
        lines.append(warning)
    privacy = _privacy_line(report)
    if privacy:
        lines.append(privacy)
    per_client = report.get("per_client") or {}
    if per_client:
        lines.append("per client (accuracy on its own training rows; simulation diagnostic): " + ", ".join(
            f"{cid}: {v['accuracy']:.3f} (n={v['samples']})" for cid, v in per_client.items()))
    if report.get("privacy", {}).get("accountant") and (per_client or report.get("baseline", {}).get(
            "centralized_accuracy") is not None):
        lines.append("note: the baselines and per-client numbers are computed from the raw data without privacy; "
                     "they are outside the guarantee above -- do not publish them with the model")
    if report.get("stopped"):
        lines.append(str(report["stopped"]))
    lines.append(f"pipeline: {report.get('pipeline')}")
    for g in report.get("guarantees", []):
        lines.append(f"  - [{g['layer']}] {g['property']} -- against: {g['against']}")
    return lines


def finish_epsilon_plot(
    fig: Any, ax: Any, path: Path, *, baselines: Mapping[str, Any], xlabel: str, title: str,
    federated_color: str = "tab:green", legend_size: float | None = None,
) -> None:
    """The shared end of the accuracy-against-epsilon plots (``sweep``, ``compare``): the non-private
    federated and centralized baselines as horizontal lines, labels, grid and legend, then write ``path``."""
    import matplotlib.pyplot as plt

    if baselines.get("federated_nonprivate_accuracy") is not None:
        ax.axhline(baselines["federated_nonprivate_accuracy"], color=federated_color, ls="--",
                   label="federated, non-private")
    if baselines.get("centralized_accuracy") is not None:
        ax.axhline(baselines["centralized_accuracy"], color="tab:gray", ls=":", label="centralized, non-private")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(_wrapped(title), fontsize="medium")
    ax.grid(alpha=0.3)
    # below the axes, never over a curve; bbox_inches="tight" keeps it and a long title in the file
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=legend_size or "small",
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _wrapped(title: str, width: int = 80) -> str:
    """A title broken into lines of at most ``width`` characters (long CSV paths, long privacy specs)."""
    import textwrap

    return "\n".join(line for part in title.splitlines() for line in textwrap.wrap(part, width=width) or [""])
