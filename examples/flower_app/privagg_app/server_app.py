"""The ServerApp: Flower's own FedAvg; ``SecureAggregation.wrap`` runs each train round as privagg's SecAgg+."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl.runners.flower.mod import flatten
from fl.runners.flower.workflow import SecureAggregation
from privagg_app.task import make_model

app = ServerApp()


def secure_aggregation(cfg: dict) -> SecureAggregation:
    """The server half, from the run config (each node checks these terms against its own policy)."""
    clip, z = float(cfg["clip"]), float(cfg["noise-multiplier"])
    return SecureAggregation(protocol=str(cfg["protocol"]), threshold=float(cfg["threshold"]),
                             clip=clip if clip > 0 else None, noise_multiplier=z if clip > 0 and z > 0 else None)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    sa = secure_aggregation(cfg)
    initial = ArrayRecord(make_model().state_dict())
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2)
    result = strategy.start(grid=sa.wrap(grid), initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]))
    out = str(cfg.get("out-dir", ""))
    if out:
        write_result(Path(out), sa, initial, result.arrays)


def write_result(out: Path, sa: SecureAggregation, initial: ArrayRecord, final: ArrayRecord) -> None:
    """result.json: per round who was summed, the total weight and the mean update; the final model flat."""
    out.mkdir(parents=True, exist_ok=True)
    rounds = [{"round": i + 1, "included": list(h.included), "planned": list(h.planned), "weight": h.weight,
               "mean_update": h.mean_update.tolist(), "privacy": dict(h.privacy)} for i, h in enumerate(sa.history)]
    data = {"initial": flatten(initial).tolist(), "final": flatten(final).tolist(), "rounds": rounds,
            "report": sa.report()}
    tmp = out / "result.tmp"
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(out / "result.json")
    np.save(out / "final.npy", flatten(final))
