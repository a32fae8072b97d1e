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


def plot_rounds(report: Mapping[str, Any], path: Path, *, title: str | None = None) -> None:
    """Test accuracy per round, with the centralized baseline; epsilon spent on a second axis if DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r for r in report["rounds"] if "accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["round"] for r in rounds], [r["accuracy"] for r in rounds], marker="o", ms=3, label="federated")
    base = report.get("baseline", {}).get("centralized_accuracy")
    if base is not None:
        ax.axhline(base, color="gray", ls="--", label=f"centralized, no privacy ({base:.3f})")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    eps = [r.get("epsilon") for r in rounds]
    if any(e is not None for e in eps):
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in rounds], [e if e is not None else float("nan") for e in eps], color="tab:red",
                 ls=":", label="epsilon spent")
        ax2.set_ylabel("epsilon", color="tab:red")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    cfg = report.get("config", {})
    ax.set_title(title or f"{cfg.get('dataset')} · {cfg.get('clients')} clients · {report.get('pipeline')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The closing lines printed after a run: final numbers, baseline, and the privacy guarantees."""
    final = report["final"]
    base = report.get("baseline", {}).get("centralized_accuracy")
    line = f"final test accuracy {final.get('accuracy', float('nan')):.4f}"
    if base is not None:
        line += f"  (centralized, no privacy: {base:.4f})"
    if final.get("epsilon") is not None:
        line += f"  epsilon {final['epsilon']:.3f} at delta {final.get('delta')}"
    lines = [line]
    if report.get("stopped"):
        lines.append(str(report["stopped"]))
    lines.append(f"pipeline: {report.get('pipeline')}")
    for g in report.get("guarantees", []):
        lines.append(f"  - [{g['layer']}] {g['property']} -- against: {g['against']}")
    return lines
