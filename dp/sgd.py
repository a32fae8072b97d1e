"""DP-SGD (Abadi et al. 2016): Poisson-sampled batches, per-example clipping, Gaussian noise.

One step: every example joins the batch independently with probability ``q = batch_size / n`` (from a
CSPRNG, so the sampling that the privacy amplification relies on is unpredictable), each example's
gradient is clipped to L2 norm ``max_grad_norm``, the clipped gradients are summed, Gaussian noise
``N(0, (noise_multiplier * max_grad_norm)^2)`` from the CSPRNG is added, and the result is divided by the
*expected* batch size ``q * n`` (a data-independent denominator, as the analysis requires). An empty
batch still takes a step with pure noise.

The clipped sum is computed by one of three per-sample-gradient modes, all giving the same sum:

- ``"direct"``: for models whose only parametrised modules are ``nn.Linear`` applied to 2-D inputs
  (logistic regression, MLPs). A Linear layer's per-example gradient is the outer product of the
  output gradient ``g_i`` and the input ``a_i``, so its squared norm is ``|g_i|^2 (|a_i|^2 + 1)`` (bias)
  and the clipped sum is ``(c * G)^T A`` -- one forward, one backward to the layer outputs, and a matmul
  per layer, with no per-example gradient ever materialised. About 2x plain PyTorch on the MLP
  64-256-256-10 (see ``benchmarks/dpsgd_overhead.py``).
- ``"ghost"``: Opacus's ghost clipping (``GradSampleModuleFastGradientClipping``, two backward passes).
- ``"opacus"``: Opacus's grad-sample hooks (materialises per-example gradients; slowest, most general).
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

from dp.mechanisms import NoiseSource, torch_gaussian
from dp.rng import SecureRandom

__all__ = [
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
    nn.Sequential,
    nn.ModuleList,
)


def supports_direct(model: nn.Module) -> bool:
    """True if every module with parameters is an ``nn.Linear`` and the rest are known element-wise maps.

    (Element-wise modules never mix examples, so per-example gradients stay rank-one per Linear layer.
    The check that each Linear runs once per forward on 2-D inputs happens at run time.)
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            return False
        if m is not model and not isinstance(m, _PARAMLESS_OK):
            return False
    return any(isinstance(m, nn.Linear) for m in model.modules())


def resolve_mode(model: nn.Module, mode: PerSampleMode) -> Literal["direct", "opacus", "ghost"]:
    """Pick the per-sample-gradient mode; ``"direct"`` on a model it cannot handle is an error."""
    if mode == "auto":
        return "direct" if supports_direct(model) else "ghost"
    if mode == "direct" and not supports_direct(model):
        raise ValueError(
            "mode='direct' needs a model whose parametrised modules are all nn.Linear (with element-wise "
            "activations between them); use mode='ghost' or mode='opacus' for this model"
        )
    if mode not in ("direct", "opacus", "ghost"):
        raise ValueError(f"unknown DP-SGD mode {mode!r}; choose auto, direct, opacus or ghost")
    return mode


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


class _DirectClipper:
    """Closed-form per-example clipping for Linear-only models (see the module docstring).

    A flat ``nn.Sequential`` is run layer by layer (no hooks: least overhead); other models are run
    with forward hooks on their Linear layers.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.flat = isinstance(model, nn.Sequential) and all(
            isinstance(m, nn.Linear) or not isinstance(m, nn.Sequential | nn.ModuleList) for m in model.children()
        )
        self.single = self.flat and [type(m) for m in model.children()] == [nn.Linear]
        self._acts: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        self._handles = [] if self.flat else [lin.register_forward_hook(self._hook) for lin in self.linears]

    def _hook(self, mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(mod, nn.Linear)
        self._acts.append((mod, inp[0], out))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]]:
        if not self.flat:
            self._acts = []
            out = self.model(x)
            acts, self._acts = self._acts, []
            return out, acts
        acts = []
        h = x
        for m in self.model.children():
            if isinstance(m, nn.Linear):
                o = F.linear(h, m.weight, m.bias)
                acts.append((m, h, o))
                h = o
            else:
                h = m(h)
        return h, acts

    def _linear_ce(
        self, lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        """One Linear layer under cross-entropy: the logit gradient is ``softmax - onehot``, no autograd."""
        with torch.no_grad():
            logits = F.linear(x, lin.weight, lin.bias)
            logp = torch.log_softmax(logits, dim=1)
            loss = -float(logp.gather(1, y[:, None]).sum())
            g = logp.exp_()
            g[torch.arange(x.shape[0]), y] -= 1.0
            a2 = (x * x).sum(1)
            norms = ((g * g).sum(1) * (a2 + 1.0 if lin.bias is not None else a2)).sqrt_()
            g *= (max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)[:, None]
            grads = {id(lin.weight): g.t() @ x}
            if lin.bias is not None:
                grads[id(lin.bias)] = g.sum(0)
        return [grads.get(id(p), torch.zeros_like(p)) for p in self.params], loss, norms

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, loss_fn: LossFn
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        if self.single and loss_fn is _per_example_ce and x.dim() == 2:
            return self._linear_ce(self.linears[0], x, y, max_grad_norm)
        logits, acts = self._forward(x)
        losses = loss_fn(logits, y)
        if len(acts) != len(self.linears) or len({id(m) for m, _, _ in acts}) != len(acts):
            raise ValueError("mode='direct' needs each nn.Linear to run exactly once per forward pass")
        for _, a, _ in acts:
            if a.dim() != 2:
                raise ValueError("mode='direct' needs 2-D inputs to every nn.Linear; use mode='ghost'")
        outs = [o for _, _, o in acts]
        gouts = torch.autograd.grad(losses.sum(), outs)
        norms2 = torch.zeros(x.shape[0], dtype=x.dtype)
        for (mod, a, _), g in zip(acts, gouts, strict=True):
            g2 = (g * g).sum(1)
            a2 = (a * a).sum(1)
            norms2 += g2 * (a2 + 1.0) if mod.bias is not None else g2 * a2
        norms = norms2.sqrt().detach()
        coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        grads: dict[int, torch.Tensor] = {}
        for (mod, a, _), g in zip(acts, gouts, strict=True):
            gs = g * coef[:, None]
            if mod.weight.requires_grad:
                grads[id(mod.weight)] = gs.t() @ a.detach()
            if mod.bias is not None and mod.bias.requires_grad:
                grads[id(mod.bias)] = gs.sum(0)
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
            losses.sum().backward()
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
            losses.sum().backward(retain_graph=True)
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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The sum over examples of per-example gradients clipped to ``max_grad_norm``, and the norms.

    Returns one tensor per trainable parameter (in ``model.parameters()`` order) and the per-example
    gradient norms before clipping. ``loss_fn(logits, y)`` must return per-example losses.
    """
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
) -> DpSgdStats:
    """Train ``model`` in place with DP-SGD; returns what is needed to account for it.

    ``steps`` defaults to ``epochs * ceil(n / batch_size)``. ``optimizer`` defaults to SGD(lr).
    ``rng``: the CSPRNG for batch sampling and noise (``None``: a fresh ``SecureRandom`` from
    ``os.urandom``; tests pass ``SecureRandom.for_testing(seed)``).
    """
    n = int(features.shape[0])
    if n < 1:
        raise ValueError("DP-SGD needs at least one example")
    if labels.shape[0] != n:
        raise ValueError(f"{n} feature rows but {labels.shape[0]} labels")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = rng if rng is not None else SecureRandom()
    q = min(1.0, batch_size / n)
    expected = q * n
    total = steps if steps is not None else epochs * steps_per_epoch(n, batch_size)
    opt = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=lr)
    resolved = resolve_mode(model, mode)
    params: Sequence[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    clipper = _make_clipper(model, resolved, max_grad_norm)
    std = noise_multiplier * max_grad_norm
    numel = sum(int(p.numel()) for p in params)
    sizes = [int(p.numel()) for p in params]
    per_chunk = max(1, (1 << 21) // max(1, numel))  # noise for several steps per CSPRNG call (<= 8 MB)
    noise_buf: torch.Tensor | None = None
    loss_total, seen, clipped = 0.0, 0, 0
    model.train()
    try:
        for step, idx in enumerate(poisson_batches(n, sample_rate=q, steps=total, rng=rng)):
            if idx.size:
                ti = torch.from_numpy(idx)
                grads, loss, norms = clipper(features[ti], labels[ti], max_grad_norm, loss_fn)
                loss_total += loss
                seen += int(idx.size)
                clipped += int((norms > max_grad_norm).sum())
            else:
                grads = [torch.zeros_like(p) for p in params]
            if std > 0:
                j = step % per_chunk
                if j == 0:
                    k = min(per_chunk, total - step)
                    noise_buf = torch_gaussian(numel * k, std=std, rng=rng, dtype=params[0].dtype).view(k, numel)
                assert noise_buf is not None
                for p, g, z in zip(params, grads, noise_buf[j].split(sizes), strict=True):
                    p.grad = (g + z.view_as(p)).div_(expected)
            else:
                for p, g in zip(params, grads, strict=True):
                    p.grad = g / expected
            opt.step()
            opt.zero_grad(set_to_none=True)
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
