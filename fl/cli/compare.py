"""``privagg compare``: accuracy against privacy budget across several privacy configurations.

Every (configuration, epsilon, seed) cell is one :func:`fl.training.loop.train` run (no baselines inside the
cell); configurations without a DP stage (``none``, ``secagg+``, ``paillier``) run once per seed and
show as flat lines. The non-private federated baseline is the ``none`` configuration on the same
seeds, the centralized baseline a non-private central fit of the same model family (scikit-learn for
logreg and mlp, the same torch architecture for cnn and mlp-ln; first seed, in the main process, outside
the timed runs). Runs are
spread over worker processes (``--jobs``), each capped at one torch thread.

Rows are comparable only when epsilon means the same thing, so every row states its privacy unit
(``example`` or ``client``) and the observers its epsilon holds against, read from the run's report
(``report["privacy"]["observers"]``). Beside its accuracy, each configuration reports its cost:
seconds per round (wall time of the run, setup included, over the rounds completed) and an estimate
of the bytes each client sends per round for its encoded update (see :data:`BYTES_METHOD`).

    privagg compare --configs "none;dp-sgd;clip,dnoise,secagg+" --epsilons 1,4,8 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from fl.config import DP_TOKENS, PrivacyConfig, TrainConfig
from fl.report import finish_epsilon_plot
from secagg.ring import ring_bits

if TYPE_CHECKING:
    from fl.training.loop import Federation

__all__ = ["BYTES_METHOD", "Cell", "add_arguments", "compare", "estimate_bytes", "parse_configs", "parse_seeds",
           "run", "table_lines", "write_plot"]

DEFAULT_CONFIGS = "none;dp-sgd;clip,dnoise,secagg+"
BASELINE = "none"

BYTES_METHOD = (
    "estimate of one client's encoded update per round, protocol overhead (keys, shares, signatures) "
    "excluded: plain sum = parameters x 4 bytes (float32); secagg/secagg+ = sum-spec size x ring width "
    "(log2 modulus) / 8; paillier = ceil(size / slots per ciphertext) x 2 x key_bits / 8"
)


def parse_configs(texts: Sequence[str]) -> list[str]:
    """``["none;dp-sgd", "clip,noise"]`` -> ``["none", "dp-sgd", "clip,noise"]`` (``;`` separates specs)."""
    out: list[str] = []
    for text in texts:
        for part in text.split(";"):
            spec = ",".join(t.strip().lower() for t in part.split(",") if t.strip())
            if spec and spec not in out:
                out.append(spec)
    if not out:
        raise ValueError('--configs needs at least one privacy spec, e.g. --configs "none;dp-sgd;clip,noise"')
    for spec in out:
        PrivacyConfig(spec=spec)  # type and threshold checks; unknown stages fail when the run is planned
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``"3"`` is the one seed 3, not three seeds); duplicates dropped."""
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2 (got {text!r})") from exc
    if not seeds:
        raise ValueError("--seeds needs at least one seed, e.g. 0,1,2")
    return list(dict.fromkeys(seeds))


def has_dp(spec: str) -> bool:
    return any(t in DP_TOKENS for t in PrivacyConfig(spec=spec).tokens())


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``epsilon`` is ``None`` for a configuration without DP."""

    spec: str
    epsilon: float | None
    seed: int


def cell_config(base: TrainConfig, cell: Cell) -> TrainConfig:
    """``base`` with the cell's privacy spec, budget and seed (noise recalibrated for that epsilon)."""
    pc = replace(base.privacy, spec=cell.spec, epsilon=cell.epsilon, noise_multiplier=None,
                 dpsgd_noise_multiplier=None)
    return replace(base, seed=cell.seed, privacy=pc)


def grid(specs: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    """Every cell to run, the baseline (``none``) included on every seed even when not asked for."""
    cells: list[Cell] = []
    for spec in [BASELINE, *[s for s in specs if s != BASELINE]]:
        for seed in seeds:
            if has_dp(spec):
                cells += [Cell(spec, eps, seed) for eps in epsilons]
            else:
                cells.append(Cell(spec, None, seed))
    return cells


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_cell(base: TrainConfig, cell: Cell) -> dict[str, Any]:
    """Train one cell and keep what the comparison needs (accuracy, cost, unit and observers)."""
    from fl.training.loop import train

    _init_worker()
    start = time.perf_counter()
    report = train(cell_config(base, cell), baseline=False, federated_baseline=False)
    seconds = time.perf_counter() - start
    final, privacy = report["final"], report.get("privacy", {})
    rounds = int(final.get("rounds_completed") or 0)
    observers = [{"observer": o["observer"], "unit": o["unit"], "epsilon": o["epsilon"]}
                 for o in privacy.get("observers", [])]
    return {
        "config": cell.spec, "epsilon": cell.epsilon, "seed": cell.seed, "pipeline": report["pipeline"],
        "accuracy": final.get("accuracy"), "epsilon_spent": final.get("epsilon"), "delta": final.get("delta"),
        "rounds_completed": rounds, "seconds": seconds, "seconds_per_round": seconds / rounds if rounds else None,
        "unit": privacy.get("unit"), "observers": observers, "stopped": report.get("stopped"),
    }


def estimate_bytes(config: TrainConfig) -> dict[str, Any]:
    """Bytes one client sends per round for its encoded update (:data:`BYTES_METHOD`), from the bound pipeline."""
    return _probe(config)[0]


def _probe(config: TrainConfig) -> tuple[dict[str, Any], Federation]:
    """Bind the configuration's pipeline (no training) and estimate its bytes; also returns the federation."""
    from fl.sums.paillier import PaillierSum
    from fl.sums.plain import PlainSum
    from fl.training.loop import Federation

    fed = Federation(config)
    spec, summer = fed.bound.sum_spec, fed.plan.pipeline.sum
    if isinstance(summer, PaillierSum):
        ciphertexts = math.ceil(spec.size / summer.plan(spec).slots)
        n, how = ciphertexts * 2 * summer.key_bits // 8, f"{ciphertexts} ciphertexts x {2 * summer.key_bits} bits"
    elif isinstance(summer, PlainSum) or spec.domain != "ring" or spec.modulus is None:
        n, how = spec.size * 4, f"{spec.size} values x 4 bytes"
    else:
        ring = ring_bits(spec.modulus)
        n, how = math.ceil(spec.size * ring / 8), f"{spec.size} values x {ring}-bit ring"
    return {"bytes_per_client_per_round": n, "how": how, "parameters": int(fed.params.size)}, fed


def _costs_and_centralized(base: TrainConfig, cells: list[Cell]) -> tuple[dict[str, dict[str, Any]], float]:
    """Bytes per configuration, and the centralized baseline fitted on the baseline configuration's data."""
    from fl.training.loop import centralized_baseline

    costs: dict[str, dict[str, Any]] = {}
    centralized = math.nan
    for spec in dict.fromkeys(c.spec for c in cells):
        config = cell_config(base, next(c for c in cells if c.spec == spec))
        costs[spec], fed = _probe(config)
        if spec == BASELINE:
            centralized = centralized_baseline(fed.data, config)
    return costs, centralized


def _execute(base: TrainConfig, cells: list[Cell], *, jobs: int, progress: bool) -> list[dict[str, Any]]:
    """Run the cells (in ``jobs`` processes when > 1) behind one progress bar; results in cell order."""
    bar = tqdm(total=len(cells), desc="compare", unit="run", disable=None if progress else True)
    results: list[dict[str, Any]] = []
    if jobs <= 1:
        for cell in cells:
            results.append(run_cell(base, cell))
            bar.update(1)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
            futures: list[Future[dict[str, Any]]] = [pool.submit(run_cell, base, c) for c in cells]
            for fut in futures:
                fut.add_done_callback(lambda _f: bar.update(1))
            results = [f.result() for f in futures]
    bar.close()
    return results


def _stats(values: list[float]) -> tuple[float | None, float]:
    if not values:
        return None, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _row(spec: str, epsilon: float | None, runs: list[dict[str, Any]], cost: dict[str, Any]) -> dict[str, Any]:
    mean, std = _stats([r["accuracy"] for r in runs if r["accuracy"] is not None])
    spr, _ = _stats([r["seconds_per_round"] for r in runs if r["seconds_per_round"] is not None])
    observers = sorted({o["observer"] for r in runs for o in r["observers"]})
    by_observer = {name: max(o["epsilon"] for r in runs for o in r["observers"] if o["observer"] == name)
                   for name in observers}
    spent = [r["epsilon_spent"] for r in runs if r["epsilon_spent"] is not None]
    return {
        "config": spec, "pipeline": runs[0]["pipeline"], "epsilon": epsilon, "dp": epsilon is not None,
        "unit": runs[0]["unit"], "observers": observers,
        # rows whose epsilon means the same thing share this key
        "comparable_group": f"{runs[0]['unit']}-level vs {', '.join(observers)}" if runs[0]["unit"] else "no DP",
        "epsilon_by_observer_max": by_observer, "mean": mean, "std": std, "runs": len(runs),
        "epsilon_spent_max": max(spent) if spent else None, "seconds_per_round": spr,
        "bytes_per_client_per_round": cost["bytes_per_client_per_round"], "bytes_how": cost["how"],
        "stopped": sum(1 for r in runs if r["stopped"]),
    }


def compare(base: TrainConfig, specs: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int], *,
            jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run the grid and summarise: one row per (configuration, epsilon); returns the JSON-ready result."""
    if any(math.isinf(e) or not e > 0 for e in epsilons):
        raise ValueError("--epsilons must be finite and positive here: configurations without DP are the "
                         "non-private lines (e.g. --configs \"none;dp-sgd\")")
    cells = grid(specs, epsilons, seeds)
    costs, centralized = _costs_and_centralized(base, cells)
    runs = _execute(base, cells, jobs=jobs, progress=progress)
    rows = []
    for spec in costs:
        for eps in (epsilons if has_dp(spec) else [None]):
            mine = [r for r in runs if r["config"] == spec and r["epsilon"] == eps]
            rows.append(_row(spec, eps, mine, costs[spec]))
    plain = next(r for r in rows if r["config"] == BASELINE)
    return {
        "config": base.as_dict(), "configs": list(specs), "epsilons": list(epsilons), "seeds": list(seeds),
        "jobs": jobs, "rows": [r for r in rows if r["config"] in specs], "runs": runs,
        "baselines": {
            "centralized_accuracy": centralized,
            "federated_nonprivate_accuracy": plain["mean"], "federated_nonprivate_std": plain["std"],
        },
        "costs": {"seconds_per_round": "wall time of the run (setup included) / rounds completed, mean over runs",
                  "bytes_per_client_per_round": BYTES_METHOD},
        "comparability": "epsilon is comparable only between rows with the same unit and observers",
    }


def table_lines(result: dict[str, Any]) -> list[str]:
    """The printed table: accuracy mean +- std per configuration x epsilon, with unit, observers and cost."""
    head = (f"{'config':<22} {'eps':>5} {'unit':<8} {'observers':<24} {'accuracy':>17} {'eps spent':>9} "
            f"{'s/round':>8} {'B/client/round':>14}")
    lines = [head]
    for r in result["rows"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
        acc = "-" if r["mean"] is None else f"{r['mean']:.4f} +- {r['std']:.4f}"
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}"
        spr = "-" if r["seconds_per_round"] is None else f"{r['seconds_per_round']:.3f}"
        obs = ", ".join(r["observers"]) or "-"
        lines.append(f"{r['config']:<22} {eps:>5} {r['unit'] or '-':<8} {obs:<24} {acc:>17} {spent:>9} "
                     f"{spr:>8} {r['bytes_per_client_per_round']:>14,}")
    b = result["baselines"]
    lines.append(f"federated non-private baseline: {b['federated_nonprivate_accuracy']:.4f} "
                 f"+- {b['federated_nonprivate_std']:.4f}")
    if b["centralized_accuracy"] is not None:
        lines.append(f"centralized non-private baseline: {b['centralized_accuracy']:.4f}")
    lines.append("epsilon is comparable only between rows with the same unit and observers")
    return lines


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _label(row: dict[str, Any]) -> str:
    unit = f", {row['unit']}-level vs {'/'.join(row['observers'])}" if row["unit"] else ", no DP"
    spr = row["seconds_per_round"] or 0.0
    return f"{row['config']}{unit} ({spr:.2f} s/round, {_size(row['bytes_per_client_per_round'])}/client/round)"


def _band(means: list[float], stds: list[float]) -> tuple[list[float], list[float]]:
    """mean -+ std, kept inside [0, 1] (accuracy cannot leave it)."""
    return ([max(0.0, m - s) for m, s in zip(means, stds, strict=True)],
            [min(1.0, m + s) for m, s in zip(means, stds, strict=True)])


def write_plot(result: dict[str, Any], path: Path) -> None:
    """A curve (mean +- std band) per DP configuration over epsilon, flat lines for the others and baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    eps = sorted(result["epsilons"])
    for i, spec in enumerate(result["configs"]):
        rows = [r for r in result["rows"] if r["config"] == spec and r["mean"] is not None]
        if not rows:
            continue
        color = f"C{i}"
        if rows[0]["dp"]:
            rows.sort(key=lambda r: r["epsilon"])
            x, m, s = [r["epsilon"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows]
            ax.plot(x, m, marker="o", color=color, label=_label(rows[0]))
            ax.fill_between(x, *_band(m, s), color=color, alpha=0.2)
        else:
            r = rows[0]
            ax.plot([eps[0], eps[-1]], [r["mean"]] * 2, color=color, ls="-.", label=_label(r))
            ax.fill_between([eps[0], eps[-1]], *_band([r["mean"]] * 2, [r["std"]] * 2), color=color, alpha=0.1)
    if len(eps) > 1:
        ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    cfg = result["config"]
    finish_epsilon_plot(
        fig, ax, path, baselines=result["baselines"], federated_color="black", legend_size=7,
        xlabel=f"epsilon (delta = {cfg['privacy']['delta']:g}); compare rows of the same unit and observers",
        title=f"{cfg['dataset']}, {cfg['clients']} clients, {cfg['rounds']} rounds, "
              f"seeds {','.join(map(str, result['seeds']))}",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags (data, model, privacy parameters), plus the comparison's own."""
    from fl.cli.main import add_train_arguments

    add_train_arguments(parser)
    g = parser.add_argument_group("compare")
    g.add_argument("--configs", default=None,
                   help=f"privacy specs separated by ';' (commas stay inside a spec), e.g. \"{DEFAULT_CONFIGS}\" "
                        f"(default: that list)")
    g.add_argument("--config", action="append", default=[], metavar="SPEC",
                   help="one privacy spec; repeat the flag for several (adds to --configs)")
    g.add_argument("--epsilons", default="1,4,8", help="comma-separated epsilons for the DP configurations")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    g.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    g.add_argument("--json", type=Path, default=Path("out") / "compare" / "compare.json", help="JSON path")
    g.add_argument("--plot", type=Path, default=Path("out") / "compare" / "compare.png", help="PNG path")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fl.cli.main import config_from_args
    from fl.cli.sweep import parse_epsilons
    from fl.report import write_json

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.epsilon is not None:
        raise ValueError("--epsilon does not apply to compare; give the budgets with --epsilons 1,4,8")
    texts = ([args.configs] if args.configs else []) + list(args.config)
    specs = parse_configs(texts or [DEFAULT_CONFIGS])
    base = config_from_args(argparse.Namespace(**{**vars(args), "privacy": "none"}))
    result = compare(base, specs, parse_epsilons(args.epsilons), parse_seeds(args.seeds), jobs=args.jobs,
                     progress=not args.quiet)
    for line in table_lines(result):
        print(line)
    write_json(result, args.json)
    write_plot(result, args.plot)
    print(f"json: {args.json}")
    print(f"plot: {args.plot}")
    return 0
