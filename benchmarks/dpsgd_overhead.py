"""DP-SGD overhead: plain PyTorch vs Opacus (hooks, ghost clipping) vs ours, on the same work.

Each mode trains the same model on the same data for the same number of steps of (expected) batch size
256: the MLP 64-256-256-10, a logistic regression 64-10, the same MLP with LayerNorm after each hidden
layer, and the digits CNN of :func:`fl.training.models.build_cnn` (8x8 images fed as 64-value rows;
conv 1->16, conv 16->32, linear 128->64->10). ``ours`` is :func:`dp.sgd.dp_sgd` in its ``auto`` mode
(the direct closed-form per-example clipping; for the CNN, unfolded convolutions), including
its CSPRNG Poisson sampling and CSPRNG noise; the Opacus modes use ``PrivacyEngine.make_private`` on
fixed batches with Opacus's own noise. Prints samples/s and the ratio of time per sample vs plain.

    python benchmarks/dpsgd_overhead.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dp.rng import SecureRandom
from dp.sgd import dp_sgd
from fl.training.models import build_cnn, build_mlp_ln

BATCH = 256
MODES = ("plain", "opacus_hooks", "opacus_ghost", "ours")


def build(model: str) -> nn.Module:
    torch.manual_seed(0)
    if model == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if model == "mlp_ln":
        return build_mlp_ln(64, 10, hidden=256)
    if model == "cnn":
        return build_cnn(64, 10, hidden=64)
    return nn.Sequential(nn.Linear(64, 10))


MODELS = (
    ("mlp", "mlp 64-256-256-10"),
    ("logreg", "logreg 64-10"),
    ("mlp_ln", "mlp+layernorm 256"),
    ("cnn", "cnn digits 8x8"),
)


def timed(fn: Callable[[], int], repeats: int) -> float:
    """Best samples/s over ``repeats`` runs of ``fn`` (which returns the samples it processed)."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def run_plain(model_name: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], int]:
    model = build(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(steps)]

    def go() -> int:
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
        return steps * BATCH

    return go


def run_opacus(model_name: str, x: torch.Tensor, y: torch.Tensor, steps: int, mode: str) -> Callable[[], int]:
    from opacus import PrivacyEngine

    model = build(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    crit = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        if mode == "ghost":
            model, opt, crit, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                grad_sample_mode="ghost", criterion=crit, poisson_sampling=False,
            )
        else:
            model, opt, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                grad_sample_mode="hooks", poisson_sampling=False,
            )
    batches = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(steps)]

    def go() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for xb, yb in batches:
                opt.zero_grad(set_to_none=True)
                loss = crit(model(xb), yb)
                loss.backward()
                opt.step()
        return steps * BATCH

    return go


def run_ours(model_name: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], int]:
    model = build(model_name)
    rng = SecureRandom.for_testing("bench")

    def go() -> int:
        dp_sgd(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=BATCH, steps=steps, lr=0.05,
               mode="auto", rng=rng)
        return steps * BATCH  # expected samples (Poisson batches of expected size 256)

    return go


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, one repeat (smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    ap.add_argument("--steps", type=int, help="steps per timed run (default: 40; --quick: 5)")
    ap.add_argument("--repeats", type=int, help="timed runs per mode, best kept (default: 7; --quick: 1)")
    ap.add_argument("--models", default=",".join(m for m, _ in MODELS), help="subset (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, repeats = (5, 1) if args.quick else (40, 7)
    steps, repeats = args.steps or steps, args.repeats or repeats
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH, 64, generator=gen)
    y = torch.randint(0, 10, (steps * BATCH,), generator=gen)
    rows: list[dict[str, Any]] = []
    print(f"DP-SGD overhead, batch {BATCH}, {steps} steps, best of {repeats}, {args.threads} thread(s)")
    print(f"{'model':<22} {'mode':<14} {'samples/s':>12} {'x plain':>9}")
    chosen = args.models.split(",")
    for model_name, label in (m for m in MODELS if m[0] in chosen):
        fns: dict[str, Callable[[], int]] = {}
        for mode in MODES:
            if mode == "plain":
                fns[mode] = run_plain(model_name, x, y, steps)
            elif mode == "ours":
                fns[mode] = run_ours(model_name, x, y, steps)
            else:
                fns[mode] = run_opacus(model_name, x, y, steps, mode.removeprefix("opacus_"))
            fns[mode]()  # warm-up
        # round-robin repeats, so every mode sees the same background load; best of each
        best = dict.fromkeys(MODES, 0.0)
        for _ in range(repeats):
            for mode in MODES:
                best[mode] = max(best[mode], timed(fns[mode], 1))
        for mode in MODES:
            sps = best[mode]
            ratio = best["plain"] / sps
            rows.append(
                {"model": label, "mode": mode, "samples_per_s": round(sps, 1), "ratio_vs_plain": round(ratio, 3)}
            )
            print(f"{label:<22} {mode:<14} {sps:>12,.0f} {ratio:>8.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
