"""DP-SGD: the direct mode matches Opacus (hooks and ghost clipping); noise, sampling and steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dp.rng import SecureRandom
from dp.sgd import clipped_grad_sum, dp_sgd, resolve_mode, supports_direct


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class TwoLayer(nn.Module):
    """A non-Sequential Linear-only model (exercises the hook path of the direct mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(20, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("make", [mlp, lambda: nn.Sequential(nn.Linear(20, 3)), TwoLayer])
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
def test_direct_matches_opacus_hooks_and_ghost(make, clip: float) -> None:  # type: ignore[no-untyped-def]
    model = make()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, first.in_features, generator=gen)
    y = torch.randint(0, 3, (128,), generator=gen)
    ref, ref_norms = clipped_grad_sum(model, x, y, max_grad_norm=clip, mode="direct")
    for mode in ("opacus", "ghost"):
        got, norms = clipped_grad_sum(model, x, y, max_grad_norm=clip, mode=mode)
        for a, b in zip(ref, got, strict=True):
            assert torch.allclose(a, b, atol=2e-6, rtol=1e-4), mode
        assert torch.allclose(ref_norms, norms, rtol=1e-4, atol=1e-5)
    # the model is left clean: no hooks, no grads
    assert all(p.grad is None for p in model.parameters())
    assert not any(len(m._forward_hooks) for m in model.modules())


def test_clipped_sum_is_bounded() -> None:
    model = mlp()
    x, y = torch.randn(50, 64) * 10, torch.randint(0, 10, (50,))
    grads, norms = clipped_grad_sum(model, x, y, max_grad_norm=0.5)
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert total <= 50 * 0.5 + 1e-4
    assert norms.shape == (50,)


def test_mode_resolution() -> None:
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6, 2))
    assert supports_direct(mlp())
    assert not supports_direct(conv)
    assert resolve_mode(mlp(), "auto") == "direct"
    assert resolve_mode(conv, "auto") == "ghost"
    with pytest.raises(ValueError, match="mode='ghost'"):
        resolve_mode(conv, "direct")


def test_without_noise_and_clipping_it_is_gradient_descent() -> None:
    torch.manual_seed(3)
    a = nn.Sequential(nn.Linear(5, 2))
    b = nn.Sequential(nn.Linear(5, 2))
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    stats = dp_sgd(a, x, y, noise_multiplier=0.0, max_grad_norm=1e9, batch_size=40, steps=3, lr=0.5,
                   rng=SecureRandom.for_testing(0))
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)
    assert stats.sample_rate == 1.0 and stats.steps == 3


def test_noise_scale_matches_the_analysis() -> None:
    # zero learning signal (huge clip, zero inputs): the update is pure noise / expected batch
    model = nn.Sequential(nn.Linear(400, 2, bias=False))
    nn.init.zeros_(model[0].weight)
    x, y = torch.zeros(1000, 400), torch.zeros(1000, dtype=torch.int64)
    dp_sgd(model, x, y, noise_multiplier=2.0, max_grad_norm=3.0, batch_size=100, steps=1, lr=1.0,
           rng=SecureRandom.for_testing(4))
    assert float(model[0].weight.detach().std()) == pytest.approx(2.0 * 3.0 / 100, rel=0.08)


def test_steps_rate_and_test_seam() -> None:
    def run(seed: int) -> tuple[torch.Tensor, object]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 3))
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(100, 8, generator=gen), torch.randint(0, 3, (100,), generator=gen)
        st = dp_sgd(m, x, y, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=30, epochs=2,
                    rng=SecureRandom.for_testing(seed))
        return m[0].weight.detach().clone(), st

    w1, s1 = run(1)
    w2, _ = run(1)
    w3, _ = run(2)
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, w3)
    assert s1.steps == 2 * math.ceil(100 / 30)  # type: ignore[attr-defined]
    assert s1.sample_rate == pytest.approx(0.3)  # type: ignore[attr-defined]


def test_bad_arguments_are_named() -> None:
    m = nn.Sequential(nn.Linear(2, 2))
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_grad_norm"):
        dp_sgd(m, x, y, noise_multiplier=1.0, max_grad_norm=0.0, batch_size=2)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp_sgd(m, x, y, noise_multiplier=-1.0, max_grad_norm=1.0, batch_size=2)
    with pytest.raises(ValueError, match="labels"):
        dp_sgd(m, x, y[:3], noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2)


class TinyCnn(nn.Module):
    """Conv2d (grouped and plain), GroupNorm, LayerNorm and Linear: the non-Linear layers of the direct mode."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.ln = nn.LayerNorm(6 * 3 * 3)
        self.fc = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn(self.c1(x)))
        return self.fc(self.ln(torch.relu(self.c2(h)).flatten(1)))


class TinyText(nn.Module):
    """Embedding -> LayerNorm -> Linear on (B, T, D) -> mean over positions -> Linear."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.ln(self.emb(x)))).mean(1))


def cnn_seq() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3),
    )


def _inputs(model: nn.Module, n: int, gen: torch.Generator) -> torch.Tensor:
    if isinstance(model, TinyText):
        x = torch.randint(0, 11, (n, 7), generator=gen)
        x[:, -2:] = 0  # padding positions (when the model has padding_idx=0)
        x[0] = 5  # one example repeats a token: its rows add up before the norm
        return x
    shape = (n, 2, 7, 7) if isinstance(model, TinyCnn) else (n, 64)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("make", [TinyCnn, TinyText, cnn_seq], ids=["cnn", "text", "cnn_seq"])
@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_direct_conv_norm_embedding_match_opacus(make, clip: float) -> None:  # type: ignore[no-untyped-def]
    """Our closed-form per-example clipped sums equal Opacus's materialised per-sample gradients (float64,
    to 1e-5) and its ghost clipping, for Conv2d (groups, stride, padding), GroupNorm, LayerNorm, Embedding."""
    torch.manual_seed(0)
    model = make().double()
    assert supports_direct(model) and resolve_mode(model, "auto") == "direct"
    # non-trivial affine parameters, so a wrong weight/bias term would show
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm | nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(2)
    x = _inputs(model, 32, gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    ref, ref_norms = clipped_grad_sum(model, x, y, max_grad_norm=clip, mode="opacus")
    got, norms = clipped_grad_sum(model, x, y, max_grad_norm=clip, mode="direct")
    assert torch.allclose(ref_norms, norms, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    ghost, _ = clipped_grad_sum(model, x, y, max_grad_norm=clip, mode="ghost")
    for a, b in zip(ghost, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert not any(len(m._forward_hooks) for m in model.modules())


def test_direct_on_frozen_layers_counts_only_trainable_parameters() -> None:
    """LoRA-style: a frozen base layer contributes nothing to the norms and gets no gradient."""
    model = cnn_seq().double()
    assert isinstance(model, nn.Sequential)
    for p in model[1].parameters():
        p.requires_grad_(False)
    model[8].bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    x, y = _inputs(model, 16, gen), torch.randint(0, 3, (16,), generator=gen)
    ref, ref_norms = clipped_grad_sum(model, x, y, max_grad_norm=0.1, mode="opacus")
    got, norms = clipped_grad_sum(model, x, y, max_grad_norm=0.1, mode="direct")
    assert len(got) == len([p for p in model.parameters() if p.requires_grad])
    assert torch.allclose(ref_norms, norms, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_fall_back_to_opacus() -> None:
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 36, 2))
    circ = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(128, 2))
    assert resolve_mode(bn, "auto") == "ghost"
    assert resolve_mode(circ, "auto") == "ghost"
    with pytest.raises(ValueError, match="mode='ghost'"):
        resolve_mode(bn, "direct")


def test_direct_embedding_padding_row_matches_torch() -> None:
    """torch never updates an Embedding's padding row; the direct mode agrees with torch's own gradient
    (unclipped: the per-example sum is the batch gradient). Opacus 1.6's hooks do not: they give the
    padding row a gradient, which is why the Opacus cross-check above uses no padding_idx."""
    torch.manual_seed(0)
    model = TinyText(padding_idx=0).double()
    gen = torch.Generator().manual_seed(2)
    x, y = _inputs(model, 32, gen), torch.randint(0, 3, (32,), generator=gen)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    plain = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    got, _ = clipped_grad_sum(model, x, y, max_grad_norm=1e9, mode="direct")
    for a, b in zip(plain, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    assert float(got[0][0].abs().max()) == 0.0
    small, norms = clipped_grad_sum(model, x, y, max_grad_norm=0.05, mode="direct")
    assert float(small[0][0].abs().max()) == 0.0 and bool((norms > 0.05).all())
