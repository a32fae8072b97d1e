"""Overhead of privagg's training loop against a hand-written PyTorch FedAvg loop doing the same work.

Both train the same model from the same initial weights on the same client partitions of ``digits``,
with the same minibatch order, FedAvg weights n_k/n and a test evaluation every round; data loading is
outside the timed region for both. Times are this process's CPU seconds (torch runs single-threaded
here, so on an idle machine they equal wall time; under load they are far less noisy), best of N.
Ours runs with ``--privacy none`` (PlainSum through the in-memory
runner), so the ratio is the price of the pipeline/runner/ledger machinery itself.

    python benchmarks/loop_overhead.py [--clients 100 --rounds 20 --model mlp] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fl.config import TrainConfig
from fl.training.loop import Federation, _seed


def hand_written_fedavg(fed: Federation, config: TrainConfig) -> np.ndarray:
    """The peer: a plain torch FedAvg loop over the Federation's own data, model init and batch seeds."""
    global_model = copy.deepcopy(fed.model)
    local = copy.deepcopy(fed.model)
    loss_fn = nn.CrossEntropyLoss()
    sizes = {c: len(p) for c, p in enumerate(fed.parts)}
    for r in range(1, config.rounds + 1):
        total = sum(sizes.values())
        acc = [torch.zeros_like(p) for p in global_model.parameters()]
        for cid, idx_np in enumerate(fed.parts):
            local.load_state_dict(global_model.state_dict())
            x, y = fed.x_train[idx_np], fed.y_train[idx_np]
            gen = torch.Generator().manual_seed(_seed(config.seed, "train", r, cid))
            opt = torch.optim.SGD(local.parameters(), lr=config.client_lr)
            n = len(idx_np)
            bs = min(config.batch_size, n)
            for _ in range(config.local_epochs):
                order = torch.randperm(n, generator=gen)
                for s in range(0, n, bs):
                    b = order[s : s + bs]
                    opt.zero_grad(set_to_none=True)
                    loss_fn(local(x[b]), y[b]).backward()
                    opt.step()
            with torch.no_grad():
                for a, lp, gp in zip(acc, local.parameters(), global_model.parameters(), strict=True):
                    a += (n / total) * (lp - gp)
        with torch.no_grad():
            for gp, a in zip(global_model.parameters(), acc, strict=True):
                gp += a
            global_model.eval()
            logits = global_model(fed.x_test)
            _ = float(nn.functional.cross_entropy(logits, fed.y_test))
            _ = float((logits.argmax(1) == fed.y_test).float().mean())
    return torch.cat([p.detach().reshape(-1) for p in global_model.parameters()]).double().numpy()


def run(clients: int, rounds: int, model: str, repeats: int) -> dict[str, float | int]:
    config = TrainConfig(dataset="digits", clients=clients, partition="iid", model=model, rounds=rounds, seed=0)
    ours_t, peer_t = [], []
    # warm-up: torch imports kernels and optimizer machinery lazily on first use; neither side pays it
    warm = Federation(replace(config, rounds=1))
    hand_written_fedavg(warm, replace(config, rounds=1))
    warm.run_round(1)
    for _ in range(repeats):
        fed = Federation(config)
        t0 = time.process_time()
        peer_params = hand_written_fedavg(fed, config)
        peer_t.append(time.process_time() - t0)
        fed = Federation(config)
        t0 = time.process_time()
        for r in range(1, rounds + 1):
            fed.run_round(r)
        ours_t.append(time.process_time() - t0)
        diff = float(np.max(np.abs(fed.params - peer_params)))
        if diff > 1e-4:
            raise SystemExit(f"the two loops disagree (max |diff| {diff:.2e}): not the same work")
    ours, peer = min(ours_t), min(peer_t)
    return {"clients": clients, "rounds": rounds, "model": model, "ours_s": round(ours, 3),
            "peer_s": round(peer, 3), "ratio": round(ours / peer, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--model", default="mlp", choices=["logreg", "mlp"])
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs for each side")
    ap.add_argument("--quick", action="store_true", help="10 clients x 3 rounds, one repeat")
    ap.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.clients, args.rounds, args.repeats = 10, 3, 1
    rows = [run(args.clients, args.rounds, m, args.repeats) for m in (["logreg", "mlp"] if not args.quick else
                                                                        [args.model])]
    print(f"{'model':<8}{'clients':>8}{'rounds':>8}{'ours_s':>10}{'peer_s':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<8}{r['clients']:>8}{r['rounds']:>8}{r['ours_s']:>10.3f}{r['peer_s']:>10.3f}"
              f"{r['ratio']:>8.3f}")
    print("peer: hand-written torch FedAvg loop (same data, init, batches, weights, per-round evaluation); "
          "CPU seconds, best of", args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
