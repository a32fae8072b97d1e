"""DP-SGD (Abadi et al. 2016): Poisson-sampled batches, per-example clipping, Gaussian noise.

One step: every example joins the batch independently with probability ``q = batch_size / n`` (from a
CSPRNG, so the sampling that the privacy amplification relies on is unpredictable), each example's
gradient is clipped to L2 norm ``max_grad_norm``, the clipped gradients are summed, Gaussian noise
``N(0, (noise_multiplier * max_grad_norm)^2)`` from the CSPRNG is added, and the result is divided by the
*expected* batch size ``q * n`` (a data-independent denominator, as the analysis requires). An empty
batch still takes a step with pure noise.

The clipped sum is computed by one of three per-sample-gradient modes, all giving the same sum:

- ``"direct"``: for models whose parametrised modules are ``nn.Linear``, ``nn.Conv2d`` (zero padding),
  ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.Embedding``, with known per-example modules between them
  (activations, pooling, dropout, flatten). One forward, one backward to the layer *outputs* ``g``, then
  per layer closed forms from the inputs ``a``, with no second backward: a Linear layer on 2-D inputs
  has the rank-one gradient ``g_i a_i^T`` (squared norm ``|g_i|^2 (|a_i|^2 + 1)``), on (B, T, d) inputs
  and for Conv2d (``a`` unfolded to patches) a sum over positions whose norm is either materialised
  (B x p x d) or taken by the ghost-norm identity ``sum_{t,s} (g_t.g_s)(a_t.a_s)`` (Li et al. 2022;
  the cheaper of the two per layer, as in Bu et al.'s mixed ghost clipping); LayerNorm/GroupNorm
  gradients are sums of ``g * xhat`` and ``g``; Embedding adds ``g`` into rows (padding row excluded, as
  torch does). The clipped sum is then one weighted matmul per layer. About 2x plain PyTorch on the MLP
  64-256-256-10 (see ``benchmarks/dpsgd_overhead.py``). Frozen parameters are left out of the norms.
- ``"ghost"``: Opacus's ghost clipping (``GradSampleModuleFastGradientClipping``, two backward passes).
- ``"opacus"``: Opacus's grad-sample hooks (materialises per-example gradients; slowest, most general;
  note that Opacus 1.6 gives an Embedding's ``padding_idx`` row a gradient, which torch never does).
- ``"auto"``: ``"direct"`` when the model allows it, else ``"ghost"``.

In every mode the *noise* is ours (CSPRNG), not Opacus's ``torch.normal`` (whose ``secure_mode`` needs
the ``torchcsprng`` package), and the batches are ours too (Opacus's ``DPDataLoader`` samples with
torch's generator). The determinism seam is the ``rng`` argument: pass
``SecureRandom.for_testing(seed)`` for reproducible runs; production passes ``None`` (``os.urandom``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from dp.errors import InputError, PerSampleModeError, PrivacyParameterError
from dp.mechanisms import NoiseSource, torch_gaussian
from dp.rng import SecureRandom

__all__ = [
    "ClassWeightedLoss",
    "DpSgdStats",
    "PerSampleMode",
    "clipped_grad_sum",
    "dp_sgd",
    "poisson_batches",
    "resolve_mode",
    "supports_direct",
]

PerSampleMode = Literal["auto", "direct", "opacus", "ghost"]

_PARAMLESS_OK = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.ELU,
    nn.SiLU,
    nn.Softplus,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Sequential,
    nn.ModuleList,
)
"""Modules without parameters that act on each example separately (they never mix the batch)."""

_DIRECT_LAYERS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
"""Parametrised modules whose per-example gradient norms the direct mode computes in closed form."""


def _direct_layer_ok(m: nn.Module) -> bool:
    """True for a layer of :data:`_DIRECT_LAYERS` in a configuration the closed forms cover."""
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, nn.Embedding):
        return m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    return isinstance(m, _DIRECT_LAYERS)


def supports_direct(model: nn.Module) -> bool:
    """True if every module with parameters is one the direct mode covers (``nn.Linear``, ``nn.Conv2d``
    with zero padding, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.Embedding`` without ``max_norm``/
    ``scale_grad_by_freq``/``sparse``) and every other sub-module is a known per-example map.

    (Such modules never mix examples, so each example's gradient follows from its own activations and
    output gradients. That each layer runs once per forward is checked at run time.)
    """
    for m in model.modules():
        if isinstance(m, _DIRECT_LAYERS):
            if not _direct_layer_ok(m):
                return False
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            return False
        if m is not model and not isinstance(m, _PARAMLESS_OK):
            return False
    return any(p.requires_grad for p in model.parameters())


def resolve_mode(model: nn.Module, mode: PerSampleMode) -> Literal["direct", "opacus", "ghost"]:
    """Pick the per-sample-gradient mode; ``"direct"`` on a model it cannot handle is an error."""
    if mode == "auto":
        return "direct" if supports_direct(model) else "ghost"
    if mode == "direct" and not supports_direct(model):
        raise PerSampleModeError(
            "mode='direct' needs a model whose parametrised modules are all nn.Linear, nn.Conv2d (zero "
            "padding), nn.LayerNorm, nn.GroupNorm or nn.Embedding, with known per-example modules between "
            "them; use mode='ghost' or mode='opacus' for this model"
        )
    if mode not in ("direct", "opacus", "ghost"):
        raise PerSampleModeError(f"unknown DP-SGD mode {mode!r}; choose auto, direct, opacus or ghost")
    return mode


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Finish = Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]
"""Given the per-example clipping coefficients, a layer's clipped-sum gradient for each trainable parameter."""


def _per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


class ClassWeightedLoss:
    """Each example's loss times its class weight: ``w[y_i] * loss_i`` (``--class-weight``).

    The weight multiplies the example's *loss*, so it scales that example's gradient before the gradient
    is clipped: per-example clipping still bounds every example's contribution by ``max_grad_norm``
    whatever the weights (a heavy class just reaches the clip sooner). The weights themselves must not
    depend on the private data (public numbers, or computed from a DP release): a weight that one
    example's presence changes would move the other examples' gradients, which the clip does not cover.
    """

    def __init__(self, base: LossFn, weight: torch.Tensor) -> None:
        self.base = base
        self.weight = weight

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.base(logits, y) * self.weight.to(logits.dtype)[y]


def _class_weighted(loss_fn: LossFn, class_weight: Sequence[float] | torch.Tensor, labels: torch.Tensor) -> LossFn:
    """``loss_fn`` weighted per class; refuses weights that are not finite and > 0 or that miss a label."""
    w = torch.as_tensor(class_weight, dtype=torch.float64).detach().clone()
    if w.dim() != 1 or w.numel() == 0 or not bool(torch.all(torch.isfinite(w) & (w > 0))):
        raise InputError(f"class_weight must be one finite weight > 0 per class, got {w.tolist()}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= w.numel()):
        raise InputError(f"labels run up to {int(labels.max())} but class_weight has {w.numel()} entries; give one "
                         f"weight per class")
    return ClassWeightedLoss(loss_fn, w)


def _split_weight(loss_fn: LossFn) -> tuple[LossFn, torch.Tensor | None]:
    """The loss under any class weighting, and the weights (``None`` when unweighted)."""
    if isinstance(loss_fn, ClassWeightedLoss):
        return loss_fn.base, loss_fn.weight
    return loss_fn, None


def _trainable(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def _outer_norms(g: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared Frobenius norms of the per-example ``sum_t g[b,t] a[b,t]^T`` (g: B,T,p; a: B,T,d).

    Either materialises the per-example products (B x p x d, returned for reuse) or uses the ghost-norm
    identity ``|sum_t g_t a_t^T|^2 = sum_{t,s} (g_t.g_s)(a_t.a_s)`` (Li et al. 2022), whichever costs less.
    """
    t, p, d = g.shape[1], g.shape[2], a.shape[2]
    if t * (p + d) < p * d:
        return ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2)), None
    pw = torch.bmm(g.transpose(1, 2), a)
    return (pw * pw).sum((1, 2)), pw


def _weighted_outer(
    g: torch.Tensor, a: torch.Tensor, pw: torch.Tensor | None, coef: torch.Tensor
) -> torch.Tensor:
    """``sum_b coef[b] sum_t g[b,t] a[b,t]^T`` (p x d), reusing materialised products when present."""
    if pw is not None:
        return torch.einsum("b,bpd->pd", coef, pw)
    gs = g * coef[:, None, None]
    return gs.reshape(-1, g.shape[2]).t() @ a.reshape(-1, a.shape[2])


def _linear(mod: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    """``nn.Linear``: rank one per example on 2-D inputs; on (B, ..., d) inputs a sum over positions."""
    w_on, b_on = _trainable(mod.weight), _trainable(mod.bias)
    if a.dim() == 2:
        g2 = (g * g).sum(1)
        norms2 = g2 * ((a * a).sum(1) * w_on + b_on)

        def finish2(coef: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            gs = g * coef[:, None]
            out = [(mod.weight, gs.t() @ a)] if w_on else []
            return out + ([(mod.bias, gs.sum(0))] if b_on else [])

        return norms2, finish2
    g3, a3 = g.reshape(g.shape[0], -1, g.shape[-1]), a.reshape(a.shape[0], -1, a.shape[-1])
    norms2 = torch.zeros(g.shape[0], dtype=g.dtype)
    pw = None
    if w_on:
        wn, pw = _outer_norms(g3, a3)
        norms2 += wn
    gb = g3.sum(1)
    if b_on:
        norms2 += (gb * gb).sum(1)

    def finish(coef: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = [(mod.weight, _weighted_outer(g3, a3, pw, coef))] if w_on else []
        return out + ([(mod.bias, coef @ gb)] if b_on else [])

    return norms2, finish


def _conv2d(mod: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    """``nn.Conv2d`` via unfold: per group, the weight gradient is ``sum_l g_l u_l^T`` over positions."""
    if a.dim() != 4:
        raise PerSampleModeError("mode='direct' needs batched 4-D inputs to nn.Conv2d; use mode='ghost'")
    b, grp = a.shape[0], mod.groups
    u = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)  # type: ignore[arg-type]
    go = g.reshape(b, g.shape[1], -1)  # B, O, L
    w_on, b_on = _trainable(mod.weight), _trainable(mod.bias)
    # groups become extra batch rows: (B*G, L, O/G) and (B*G, L, C/G*k*k)
    gg = go.reshape(b, grp, -1, go.shape[2]).transpose(2, 3).reshape(b * grp, go.shape[2], -1)
    uu = u.reshape(b, grp, -1, u.shape[2]).transpose(2, 3).reshape(b * grp, u.shape[2], -1)
    norms2 = torch.zeros(b, dtype=g.dtype)
    pw = None
    if w_on:
        wn, pw = _outer_norms(gg, uu)
        norms2 += wn.view(b, grp).sum(1)
    gb = go.sum(2)
    if b_on:
        norms2 += (gb * gb).sum(1)

    def finish(coef: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        if w_on:
            if pw is not None:
                w = torch.einsum("b,bgpd->gpd", coef, pw.view(b, grp, *pw.shape[1:]))
            else:
                gs = (gg * coef.repeat_interleave(grp)[:, None, None]).view(b, grp, gg.shape[1], -1)
                w = torch.einsum("bglp,bgld->gpd", gs, uu.view(b, grp, uu.shape[1], -1))
            out.append((mod.weight, w.reshape(mod.weight.shape)))
        if b_on:
            assert mod.bias is not None
            out.append((mod.bias, coef @ gb))
        return out

    return norms2, finish


def _affine_norm(
    weight: torch.Tensor | None, bias: torch.Tensor | None, xhat: torch.Tensor, g: torch.Tensor, keep: int
) -> tuple[torch.Tensor, Finish]:
    """Element-wise affine ``y = xhat * weight + bias`` whose parameters span dims ``keep`` onwards
    (LayerNorm) or dim 1 (GroupNorm, ``keep = -1``): per-example gradients are sums over the other dims."""
    # LayerNorm: the weight covers the last dims, sum over dims 1 .. keep-1; GroupNorm: per channel (dim 1)
    dims = tuple(range(1, keep)) if keep >= 0 else tuple(range(2, g.dim()))
    gw = (g * xhat).sum(dims) if dims else g * xhat
    gb = g.sum(dims) if dims else g
    b = g.shape[0]
    w_on, b_on = _trainable(weight), _trainable(bias)
    norms2 = torch.zeros(b, dtype=g.dtype)
    if w_on:
        norms2 += (gw * gw).reshape(b, -1).sum(1)
    if b_on:
        norms2 += (gb * gb).reshape(b, -1).sum(1)

    def finish(coef: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        if w_on:
            assert weight is not None
            out.append((weight, torch.tensordot(coef, gw, dims=1).reshape(weight.shape)))
        if b_on:
            assert bias is not None
            out.append((bias, torch.tensordot(coef, gb, dims=1).reshape(bias.shape)))
        return out

    return norms2, finish


def _layer_norm(mod: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    k = len(mod.normalized_shape)
    dims = tuple(range(a.dim() - k, a.dim()))
    var, mean = torch.var_mean(a, dim=dims, keepdim=True, correction=0)
    xhat = (a - mean) * torch.rsqrt(var + mod.eps)
    return _affine_norm(mod.weight, mod.bias, xhat, g, keep=a.dim() - k)


def _group_norm(mod: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    r = a.reshape(a.shape[0], mod.num_groups, -1)
    var, mean = torch.var_mean(r, dim=2, keepdim=True, correction=0)
    xhat = ((r - mean) * torch.rsqrt(var + mod.eps)).reshape(a.shape)
    return _affine_norm(mod.weight, mod.bias, xhat, g, keep=-1)


def _embedding(mod: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    """``nn.Embedding``: an example's gradient adds its positions' output gradients into their rows."""
    b, dim, vocab = idx.shape[0], g.shape[-1], mod.num_embeddings
    flat = idx.reshape(b, -1)
    gf = g.reshape(b, -1, dim)
    if mod.padding_idx is not None:  # torch never updates the padding row
        gf = gf * (flat != mod.padding_idx).unsqueeze(-1).to(gf.dtype)
    key = (torch.arange(b)[:, None] * vocab + flat).reshape(-1)
    rows, inv = torch.unique(key, return_inverse=True)
    summed = torch.zeros(rows.shape[0], dim, dtype=g.dtype).index_add_(0, inv, gf.reshape(-1, dim))
    norms2 = torch.zeros(b, dtype=g.dtype).index_add_(0, rows // vocab, (summed * summed).sum(1))

    def finish(coef: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gs = (gf * coef[:, None, None]).reshape(-1, dim)
        return [(mod.weight, torch.zeros_like(mod.weight).index_add_(0, flat.reshape(-1), gs))]

    return norms2, finish


def _layer_terms(mod: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    """Per-example squared gradient norms of ``mod``'s trainable parameters and their clipped sum."""
    if isinstance(mod, nn.Linear):
        return _linear(mod, a, g)
    if isinstance(mod, nn.Conv2d):
        return _conv2d(mod, a, g)
    if isinstance(mod, nn.LayerNorm):
        return _layer_norm(mod, a, g)
    if isinstance(mod, nn.GroupNorm):
        return _group_norm(mod, a, g)
    assert isinstance(mod, nn.Embedding)
    return _embedding(mod, a, g)


Record = tuple[nn.Module, torch.Tensor, torch.Tensor]


class _DirectClipper:
    """Closed-form per-example clipping (see the module docstring): one forward, one backward to the
    outputs of the parametrised layers, then per layer the norms and the clipped sum from activations.

    A flat ``nn.Sequential`` is run layer by layer (no hooks: least overhead); other models are run
    with forward hooks on their parametrised layers.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [
            m for m in model.modules()
            if isinstance(m, _DIRECT_LAYERS) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self.linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flat = isinstance(model, nn.Sequential) and all(
            not isinstance(m, nn.Sequential | nn.ModuleList) for m in model.children()
        )
        self.single = self.flat and [type(m) for m in model.children()] == [nn.Linear] and self.layers
        self._acts: list[Record] = []
        self._handles = [] if self.flat else [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self._acts.append((mod, inp[0], out))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Record]]:
        if not self.flat:
            self._acts = []
            out = self.model(x)
            recorded, self._acts = self._acts, []
            return out, recorded
        layers = set(map(id, self.layers))
        acts: list[Record] = []
        h = x
        for m in self.model.children():
            o = F.linear(h, m.weight, m.bias) if isinstance(m, nn.Linear) else m(h)
            if id(m) in layers:
                acts.append((m, h, o))
            h = o
        return h, acts

    def _linear_ce(
        self, lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
        weight: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        """One Linear layer under cross-entropy: the logit gradient is ``softmax - onehot``, no autograd.

        ``weight``: class weights; example i's loss and logit gradient are scaled by ``weight[y_i]`` (before
        its norm is taken and clipped)."""
        with torch.no_grad():
            logits = F.linear(x, lin.weight, lin.bias)
            logp = torch.log_softmax(logits, dim=1)
            picked = logp.gather(1, y[:, None])
            wy = weight.to(logits.dtype)[y][:, None] if weight is not None else None
            loss = -float((picked * wy).sum() if wy is not None else picked.sum())
            g = logp.exp_()
            g[torch.arange(x.shape[0]), y] -= 1.0
            if wy is not None:
                g.mul_(wy)
            norms2, finish = _linear(lin, x, g)
            norms = norms2.sqrt_()
            grads = {id(p): t for p, t in finish((max_grad_norm / (norms + 1e-6)).clamp_(max=1.0))}
        return [grads.get(id(p), torch.zeros_like(p)) for p in self.params], loss, norms

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, loss_fn: LossFn
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        base, weight = _split_weight(loss_fn)
        if self.single and base is _per_example_ce and x.dim() == 2:
            return self._linear_ce(self.linears[0], x, y, max_grad_norm, weight)
        logits, acts = self._forward(x)
        losses = loss_fn(logits, y)
        if len(acts) != len(self.layers) or len({id(m) for m, _, _ in acts}) != len(acts):
            raise PerSampleModeError("mode='direct' needs each parametrised layer to run exactly once per forward "
                                     "pass; use mode='ghost' or mode='opacus' for this model")
        gouts = torch.autograd.grad(losses.sum(), [o for _, _, o in acts])
        with torch.no_grad():
            norms2 = torch.zeros(x.shape[0], dtype=logits.dtype)
            finishers = []
            for (mod, a, _), g in zip(acts, gouts, strict=True):
                n2, fin = _layer_terms(mod, a.detach(), g)
                norms2 += n2
                finishers.append(fin)
            norms = norms2.sqrt()
            coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            grads = {id(p): t for fin in finishers for p, t in fin(coef)}
        out = [grads.get(id(p), torch.zeros_like(p)) for p in self.params]
        return out, float(losses.detach().sum()), norms


class _OpacusHooksClipper:
    """Opacus grad-sample hooks: materialise per-example gradients, clip, sum."""

    def __init__(self, model: nn.Module) -> None:
        from opacus import GradSampleModule

        self.model = model
        self.gsm = GradSampleModule(model, loss_reduction="sum")

    def close(self) -> None:
        self.gsm._close()

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, loss_fn: LossFn
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
        losses = loss_fn(self.gsm(x), y)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            torch.autograd.backward(losses.sum())
        gs = [p.grad_sample.reshape(x.shape[0], -1) for p in params]  # type: ignore[attr-defined]
        norms = torch.sqrt(torch.stack([(g * g).sum(1) for g in gs]).sum(0))
        coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        out = [(coef @ g).view_as(p) for g, p in zip(gs, params, strict=True)]
        for p in params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
        return out, float(losses.detach().sum()), norms


class _GhostClipper:
    """Opacus ghost clipping: per-example norms without per-example gradients, then a rescaled backward."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        self.model = model
        self.gsm = GradSampleModuleFastGradientClipping(
            model, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )

    def close(self) -> None:
        self.gsm._close()

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, loss_fn: LossFn
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        self.gsm.max_grad_norm = max_grad_norm
        self.gsm.enable_hooks()
        losses = loss_fn(self.gsm(x), y)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            torch.autograd.backward(losses.sum(), retain_graph=True)
        norms = self.gsm.get_norm_sample()
        coef = self.gsm.get_clipping_coef()
        for p in params:
            p.grad = None
        self.gsm.disable_hooks()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            (coef.detach() * losses).sum().backward()
        self.gsm.enable_hooks()
        out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return out, float(losses.detach().sum()), norms.detach()


def clipped_grad_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    mode: PerSampleMode = "auto",
    loss_fn: LossFn = _per_example_ce,
    class_weight: Sequence[float] | torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The sum over examples of per-example gradients clipped to ``max_grad_norm``, and the norms.

    Returns one tensor per trainable parameter (in ``model.parameters()`` order) and the per-example
    gradient norms before clipping. ``loss_fn(logits, y)`` must return per-example losses.
    ``class_weight``: see :class:`ClassWeightedLoss` (the norms returned are of the weighted gradients).
    """
    if class_weight is not None:
        loss_fn = _class_weighted(loss_fn, class_weight, y)
    clipper = _make_clipper(model, resolve_mode(model, mode), max_grad_norm)
    try:
        grads, _, norms = clipper(x, y, max_grad_norm, loss_fn)
    finally:
        clipper.close()
    return grads, norms


def _make_clipper(
    model: nn.Module, mode: Literal["direct", "opacus", "ghost"], max_grad_norm: float
) -> _DirectClipper | _OpacusHooksClipper | _GhostClipper:
    if mode == "direct":
        return _DirectClipper(model)
    if mode == "opacus":
        return _OpacusHooksClipper(model)
    return _GhostClipper(model, max_grad_norm)


def poisson_batches(n: int, *, sample_rate: float, steps: int, rng: NoiseSource) -> list[np.ndarray]:
    """``steps`` Poisson-sampled index batches over ``n`` examples: each example joins each batch
    independently with probability ``sample_rate`` (to within 2^-32), from 32-bit CSPRNG words."""
    if sample_rate >= 1:
        return [np.arange(n) for _ in range(steps)]
    cut = np.uint32(min(2**32 - 1, round(sample_rate * 2**32)))
    out: list[np.ndarray] = []
    chunk = max(1, (1 << 22) // max(1, n))  # at most ~16 MB of keystream at a time
    for start in range(0, steps, chunk):
        k = min(chunk, steps - start)
        words = np.frombuffer(rng.bytes(4 * n * k), dtype=np.uint32).reshape(k, n)
        out += [np.flatnonzero(row < cut) for row in words]
    return out


@dataclass(frozen=True, slots=True)
class DpSgdStats:
    """What one DP-SGD run did: enough to recompute its epsilon (``steps`` at ``sample_rate`` and
    ``noise_multiplier``, Poisson sampling, add/remove-one neighbours)."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    mean_loss: float
    mode: str
    clipped_fraction: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "mean_loss": self.mean_loss,
            "mode": self.mode,
            "clipped_fraction": self.clipped_fraction,
        }


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps in one epoch of Poisson sampling at rate ``batch_size / n``: ``ceil(n / batch_size)``."""
    return max(1, math.ceil(n / batch_size))


def _check_dp_sgd_args(
    *, n: int, labels: torch.Tensor, noise_multiplier: float, max_grad_norm: float, batch_size: int
) -> None:
    """Refuse DP-SGD arguments that would train wrongly or account wrongly, naming the one to fix."""
    if n < 1:
        raise InputError("DP-SGD needs at least one example; pass a non-empty data set")
    if labels.shape[0] != n:
        raise InputError(f"{n} feature rows but {labels.shape[0]} labels; pass one label per feature row")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacyParameterError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}; "
                                    "pass the noise std over max_grad_norm (0 for no noise)")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise PrivacyParameterError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}; "
                                    "pass the per-example clip norm, e.g. max_grad_norm=1.0")
    if batch_size < 1:
        raise PrivacyParameterError(f"batch_size must be >= 1, got {batch_size}; pass the expected Poisson "
                                    "batch size (it sets the sample rate)")


class _ChunkedNoise:
    """DP-SGD's Gaussian noise, drawn for several steps per CSPRNG call (<= 8 MB) and handed out per step.

    Draws happen at the same steps and in the same sizes as one inline buffer would, so the stream of
    random draws (interleaved with batch sampling) is unchanged.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, std: float, total: int, rng: NoiseSource) -> None:
        self._params = params
        self._numel = sum(int(p.numel()) for p in params)
        self._per_chunk = max(1, (1 << 21) // max(1, self._numel))
        self._std, self._total, self._rng = std, total, rng
        self._buf: torch.Tensor | None = None

    def row(self, step: int) -> torch.Tensor:
        """The flat noise vector for ``step`` (steps must be asked for in order 0, 1, 2, ...)."""
        j = step % self._per_chunk
        if j == 0:
            k = min(self._per_chunk, self._total - step)
            dtype = self._params[0].dtype
            self._buf = torch_gaussian(self._numel * k, std=self._std, rng=self._rng, dtype=dtype).view(k, self._numel)
        assert self._buf is not None
        return self._buf[j]


def _set_grads(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    noise: torch.Tensor | None,
    *,
    sizes: Sequence[int],
    expected: float,
) -> None:
    """Set each parameter's ``.grad`` to (clipped sum + its slice of ``noise``) / expected batch size."""
    if noise is not None:
        for p, g, z in zip(params, grads, torch.split(noise, list(sizes)), strict=True):
            p.grad = (g + z.view_as(p)).div_(expected)
    else:
        for p, g in zip(params, grads, strict=True):
            p.grad = g / expected


def _run_steps(
    batches: Sequence[np.ndarray],
    *,
    features: torch.Tensor,
    labels: torch.Tensor,
    clipper: _DirectClipper | _OpacusHooksClipper | _GhostClipper,
    params: Sequence[torch.Tensor],
    opt: torch.optim.Optimizer,
    noise: _ChunkedNoise | None,
    max_grad_norm: float,
    loss_fn: LossFn,
    expected: float,
) -> tuple[float, int, int]:
    """One noisy optimizer step per index batch (an empty batch still steps, on noise alone).

    Returns (summed loss, examples seen, examples whose gradient was clipped).
    """
    sizes = [int(p.numel()) for p in params]
    loss_total, seen, clipped = 0.0, 0, 0
    for step, idx in enumerate(batches):
        if idx.size:
            ti = torch.from_numpy(idx)
            grads, loss, norms = clipper(features[ti], labels[ti], max_grad_norm, loss_fn)
            loss_total += loss
            seen += int(idx.size)
            clipped += int((norms > max_grad_norm).sum())
        else:
            grads = [torch.zeros_like(p) for p in params]
        _set_grads(params, grads, noise.row(step) if noise is not None else None, sizes=sizes, expected=expected)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_total, seen, clipped


def dp_sgd(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    epochs: int = 1,
    steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 0.1,
    mode: PerSampleMode = "auto",
    rng: NoiseSource | None = None,
    loss_fn: LossFn = _per_example_ce,
    class_weight: Sequence[float] | torch.Tensor | None = None,
) -> DpSgdStats:
    """Train ``model`` in place with DP-SGD; returns what is needed to account for it.

    ``steps`` defaults to ``epochs * ceil(n / batch_size)``. ``optimizer`` defaults to SGD(lr).
    ``rng``: the CSPRNG for batch sampling and noise (``None``: a fresh ``SecureRandom`` from
    ``os.urandom``; tests pass ``SecureRandom.for_testing(seed)``). ``class_weight``: one public weight
    per class scaling each example's loss before its gradient is clipped (:class:`ClassWeightedLoss`).
    """
    n = int(features.shape[0])
    _check_dp_sgd_args(
        n=n, labels=labels, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, batch_size=batch_size
    )
    rng = rng if rng is not None else SecureRandom()
    loss_fn = _class_weighted(loss_fn, class_weight, labels) if class_weight is not None else loss_fn
    q = min(1.0, batch_size / n)
    expected = q * n
    total = steps if steps is not None else epochs * steps_per_epoch(n, batch_size)
    opt = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=lr)
    resolved = resolve_mode(model, mode)
    params: Sequence[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    clipper = _make_clipper(model, resolved, max_grad_norm)
    std = noise_multiplier * max_grad_norm
    noise = _ChunkedNoise(params, std=std, total=total, rng=rng) if std > 0 else None
    model.train()
    try:
        loss_total, seen, clipped = _run_steps(
            poisson_batches(n, sample_rate=q, steps=total, rng=rng),
            features=features, labels=labels, clipper=clipper, params=params, opt=opt, noise=noise,
            max_grad_norm=max_grad_norm, loss_fn=loss_fn, expected=expected,
        )
    finally:
        clipper.close()
    return DpSgdStats(
        steps=total,
        sample_rate=q,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        mean_loss=loss_total / seen if seen else float("nan"),
        mode=resolved,
        clipped_fraction=clipped / seen if seen else 0.0,
    )
