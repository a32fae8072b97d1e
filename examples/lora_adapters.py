"""Federated fine-tuning of LoRA adapters: only the adapters are trained, and only they are summed.

A small transformer is built in code (token embedding, two pre-norm attention blocks, a classifier; no
downloads) and "pre-trained" centrally on a public task (is token 1 in the sequence?). Each of four
sites then adapts it to its own private task (is token 2 in the sequence?): the base weights stay
frozen, and each attention projection gets a low-rank adapter ``W x + B A x`` (Hu et al. 2021; A is
r x d, B is d x r and starts at zero, so the adapted model starts as the base). Every round each site
trains its adapters (and the classifier head) locally, clips the change, and the changes are summed
with SecAgg+ (``Clip -> Quantize -> SecAggPlus``): the server sees only the sum of the adapter
updates, and the base model never moves. The update is a flat vector of ``num_adapter_params`` values
here; the same round carries d = 1e8 (see ``benchmarks/large_update.py``; frames of at most 2^24 values
on the wire, :func:`secagg.wire.dumps_stream`).

    python examples/lora_adapters.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from dp.rng import SecureRandom
from fl.layers.clip import Clip, Quantize
from fl.pipeline import Pipeline
from fl.runners.local import run_secure_sum
from fl.spec import RoundInfo, ValueSpec
from fl.sums.secagg import SecAggPlus

VOCAB, SEQ, DIM, HEADS = 16, 12, 32, 4


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with ``base`` frozen; only ``A`` and ``B`` train."""

    def __init__(self, base: nn.Linear, *, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


class Block(nn.Module):
    """Pre-norm self-attention and MLP, with residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, HEADS, DIM // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, DIM))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


def add_adapters(model: TinyTransformer, *, rank: int = 4) -> list[nn.Parameter]:
    """Freeze everything, wrap every attention projection with LoRA; the trainable parameters (adapters
    and the classifier head), in a fixed order -- the vector that is summed."""
    model.requires_grad_(False)
    for blk in model.blocks:
        assert isinstance(blk, Block)
        for name in ("q", "k", "v", "o"):
            setattr(blk, name, LoRALinear(getattr(blk, name), rank=rank))
    model.head.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def task(n: int, marker: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of random tokens; label 1 iff ``marker`` occurs (about half the sequences)."""
    x = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
    y = (torch.rand(n, generator=gen) < 0.5).long()
    pos = torch.randint(0, SEQ, (n,), generator=gen)
    x[y == 1, pos[y == 1]] = marker
    return x, y


def fit(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, *, epochs: int,
        lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), 32):
            idx = order[s : s + 32]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def flat(params: list[nn.Parameter]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()


def load_flat(params: list[nn.Parameter], vec: np.ndarray) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(vec).float(), params)


def run(*, rounds: int = 8, sites: int = 4, seed: int = 0, seeded_for_testing: bool = False) -> dict[str, float]:
    """Pre-train, add adapters, federate them; returns accuracies and what moved."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyTransformer()
    fit(model, list(model.parameters()), *task(2000, 1, gen), epochs=4, lr=3e-3, gen=gen)  # public pre-training
    adapters = add_adapters(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "base" in k}
    local = [task(300, 2, gen) for _ in range(sites)]  # each site's private data for the new task
    x_test, y_test = task(1000, 2, gen)
    before = accuracy(model, x_test, y_test)
    size = sum(p.numel() for p in adapters)
    ssum = SecAggPlus()
    pipe = Pipeline([Clip(l2=2.0), Quantize(bits=20)], sum=ssum).bind(ValueSpec(size=size, cohort=sites))

    def rng(label: str) -> SecureRandom:
        return SecureRandom.for_testing(label) if seeded_for_testing else SecureRandom()

    for r in range(rounds):
        start = flat(adapters)
        enc = {}
        for c, (x, y) in enumerate(local):
            load_flat(adapters, start)
            fit(model, adapters, x, y, epochs=1, lr=3e-3, gen=gen)
            enc[c] = pipe.encode(flat(adapters) - start, rng(f"lora:{seed}:{r}:{c}"))
        session = f"lora:{seed}:{r}".encode() if seeded_for_testing else os.urandom(16)
        out = run_secure_sum(ssum, enc, spec=pipe.sum_spec, session=session, round=r)
        info = RoundInfo(round=r, planned=tuple(range(sites)), included=out.included, population=sites,
                         sample_rate=1.0)
        load_flat(adapters, start + pipe.decode(out.total, info, rng(f"lora:{seed}:{r}:server")) / len(out.included))
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    return {"before": before, "after": accuracy(model, x_test, y_test), "num_adapter_params": float(size),
            "num_params": float(sum(p.numel() for p in model.parameters())), "base_unchanged": float(unchanged)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    out = run(rounds=args.rounds)
    print(f"adapters: {out['num_adapter_params']:.0f} of {out['num_params']:.0f} parameters trained and summed")
    print(f"new task accuracy: {out['before']:.3f} before, {out['after']:.3f} after {args.rounds} SecAgg+ rounds; "
          f"base weights unchanged: {bool(out['base_unchanged'])}")
