"""``privagg sweep``: accuracy against privacy budget, epsilon values x seeds, with baselines.

Every (epsilon, seed) pair is one :func:`fl.training.loop.train` run of the same configuration with the noise
calibrated to that epsilon; ``inf`` runs the same pipeline without its DP stages (the non-private
federated baseline). The centralized (non-federated, non-private) baseline comes from the first run.
Prints a table of accuracy mean +- std (and median) per epsilon, writes a PNG plot (matplotlib, Agg) and
the JSON of every run.

    privagg sweep --dataset breast_cancer --clients 5 --privacy dp-sgd --epsilons 0.5,1,2,4,8,inf --seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fl.config import DP_TOKENS, TrainConfig
from fl.report import finish_epsilon_plot

__all__ = ["add_arguments", "parse_epsilons", "run", "sweep", "write_plot"]


def parse_epsilons(text: str) -> list[float]:
    """``"0.5,1,inf"`` -> ``[0.5, 1.0, inf]``; every value positive."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        value = math.inf if part in ("inf", "infinity", "none") else float(part)
        if not value > 0:
            raise ValueError(f"--epsilons values must be positive (or inf), got {part!r}")
        out.append(value)
    if not out:
        raise ValueError("--epsilons needs at least one value, e.g. 1,4,inf")
    return out


def _config_for(base: TrainConfig, epsilon: float, seed: int) -> TrainConfig:
    pc = base.privacy
    if math.isinf(epsilon):
        tokens = [t for t in pc.tokens() if t not in (*DP_TOKENS, "aclip")]  # aclip's count needs the noise
        pc = replace(pc, spec=",".join(tokens) or "none", epsilon=None, noise_multiplier=None,
                     dpsgd_noise_multiplier=None)
    else:
        if not any(t in DP_TOKENS for t in pc.tokens()):
            raise ValueError(
                f"--privacy {pc.spec!r} has no DP stage to calibrate; use e.g. --privacy dp-sgd or clip,noise"
            )
        pc = replace(pc, epsilon=epsilon, noise_multiplier=None, dpsgd_noise_multiplier=None)
    return replace(base, seed=seed, privacy=pc)


def sweep(base: TrainConfig, epsilons: list[float], seeds: list[int], *, progress: bool = True) -> dict[str, Any]:
    """Run every (epsilon, seed) and summarise; returns the JSON-ready result."""
    from fl.training.loop import train

    runs: list[dict[str, Any]] = []
    centralized: float | None = None
    bar = tqdm(total=len(epsilons) * len(seeds), desc="sweep", unit="run", disable=None if progress else True)
    for eps in epsilons:
        for seed in seeds:
            cfg = _config_for(base, eps, seed)
            report = train(cfg, baseline=centralized is None, federated_baseline=False)  # eps=inf is that run
            if centralized is None:
                centralized = report["baseline"]["centralized_accuracy"]
            final = report["final"]
            runs.append({
                "epsilon": eps,
                "seed": seed,
                "accuracy": final.get("accuracy"),
                "loss": final.get("loss"),
                "epsilon_spent": final.get("epsilon"),
                "rounds_completed": final.get("rounds_completed"),
                "stopped": report.get("stopped"),
            })
            bar.set_postfix(eps=eps, acc=f"{final.get('accuracy', float('nan')):.3f}")
            bar.update(1)
    bar.close()
    summary = []
    for eps in epsilons:
        accs = [r["accuracy"] for r in runs if r["epsilon"] == eps and r["accuracy"] is not None]
        spent = [r["epsilon_spent"] for r in runs if r["epsilon"] == eps and r["epsilon_spent"] is not None]
        summary.append({
            "epsilon": eps,
            "mean": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "median": statistics.median(accs) if accs else None,
            "epsilon_spent_max": max(spent) if spent else None,
            "runs": len(accs),
        })
    nonprivate = next((s["mean"] for s in summary if math.isinf(float(s["epsilon"] or 0.0))), None)
    return {
        "config": base.as_dict(),
        "epsilons": epsilons,
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "baselines": {"centralized_accuracy": centralized, "federated_nonprivate_accuracy": nonprivate},
    }


def table_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{'epsilon':>8} {'accuracy mean +- std':>22} {'median':>8} {'eps spent':>10} {'runs':>5}"]
    for s in result["summary"]:
        eps = "inf" if math.isinf(s["epsilon"]) else f"{s['epsilon']:g}"
        mean = "-" if s["mean"] is None else f"{s['mean']:.4f} +- {s['std']:.4f}"
        med = "-" if s["median"] is None else f"{s['median']:.4f}"
        spent = "-" if s["epsilon_spent_max"] is None else f"{s['epsilon_spent_max']:.3f}"
        lines.append(f"{eps:>8} {mean:>22} {med:>8} {spent:>10} {s['runs']:>5}")
    b = result["baselines"]
    if b["centralized_accuracy"] is not None:
        lines.append(f"centralized non-private baseline: {b['centralized_accuracy']:.4f}")
    if b["federated_nonprivate_accuracy"] is not None:
        lines.append(f"federated non-private (eps=inf):  {b['federated_nonprivate_accuracy']:.4f}")
    return lines


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy mean +- std against epsilon (log axis), with the two non-private baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    finite = [s for s in result["summary"] if not math.isinf(s["epsilon"]) and s["mean"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if finite:
        ax.errorbar([s["epsilon"] for s in finite], [s["mean"] for s in finite], yerr=[s["std"] for s in finite],
                    marker="o", capsize=4, label="federated, DP")
        ax.set_xscale("log")
        ticks = [s["epsilon"] for s in finite]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cfg = result["config"]
    finish_epsilon_plot(
        fig, ax, path, baselines=result["baselines"], xlabel=f"epsilon (delta = {cfg['privacy']['delta']:g})",
        title=f"{cfg['dataset']}, {cfg['clients']} clients, --privacy {cfg['privacy']['spec']}",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags, plus the sweep's own."""
    from fl.cli.main import add_train_arguments

    add_train_arguments(parser)
    parser.set_defaults(privacy="dp-sgd")
    g = parser.add_argument_group("sweep")
    g.add_argument("--epsilons", default="0.5,1,2,4,8,inf", help="comma-separated epsilons, inf = no DP")
    g.add_argument("--seeds", type=int, default=5, help="seeds per epsilon: 0..N-1 (default: %(default)s)")
    g.add_argument("--out", type=Path, default=Path("out") / "sweep", help="directory for sweep.json and sweep.png")
    g.add_argument("--json", type=Path, help="JSON path (default: OUT/sweep.json)")
    g.add_argument("--plot", type=Path, help="PNG path (default: OUT/sweep.png)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fl.cli.main import config_from_args
    from fl.report import write_json

    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    base = config_from_args(args)
    epsilons = parse_epsilons(args.epsilons)
    result = sweep(base, epsilons, list(range(args.seeds)), progress=not args.quiet)
    for line in table_lines(result):
        print(line)
    json_path = args.json or args.out / "sweep.json"
    plot_path = args.plot or args.out / "sweep.png"
    write_json(result, json_path)
    write_plot(result, plot_path)
    print(f"json: {json_path}")
    print(f"plot: {plot_path}")
    return 0

