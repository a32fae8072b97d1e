"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021) as a stateful layer.

Each round ``t`` every client clips its update to the current norm ``C_t`` and reports the bit
``b_i = [||delta_i|| <= C_t]`` (not clipped). The server learns only a *noisy* sum of the bits and moves
the norm geometrically toward the ``target_quantile`` ``gamma`` of the update norms:

    C_{t+1} = C_t * exp(-learning_rate * (b_bar - gamma)),    b_bar = noisy sum of b_i / n_included

**One Gaussian for both releases.** The client sends ``(clip(delta, C_t) / C_t, c * (b_i - 1/2))``: its
clipped update in units of ``C_t`` (L2 norm <= 1) with one extra coordinate. Adding or removing one
client moves this vector by at most ``S = sqrt(1 + c^2 / 4)`` (:attr:`AdaptiveClip.sensitivity`, the
``l2_bound`` this layer binds), so the following :class:`~fl.layers.noise.GaussianNoise` with multiplier
``z`` -- central or distributed, then ``Quantize`` and a secure sum like any other coordinate -- is one
Gaussian mechanism with noise multiplier ``z`` on the joint vector, and the ledger charges exactly that.
Split into its two parts, the update carries noise multiplier ``z_update = z * S`` (in units of ``C_t``)
and the count carries Gaussian noise of std ``sigma_b = z * S / c`` clients; composing the two gives back
``z``: ``z^-2 = z_update^-2 + (2 sigma_b)^-2``, i.e. Andrew et al.'s ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``.

``count_noise`` is ``sigma_b / z`` (the count's noise std per unit of noise multiplier; must exceed 1/2),
which fixes ``c = 1 / sqrt(count_noise^2 - 1/4)``. The default 2.0 spends 1/16 of the privacy (in the
Gaussian's ``mu^2``) on the count: ``z_update = 1.033 z``. Andrew et al. take ``sigma_b = m / 20`` for
``m`` clients per round, which is ``count_noise = m / (20 z)`` here.

The server decodes the sum back into the original units (``* C_t``) and strips the extra coordinate;
:meth:`AdaptiveClip.next_state` turns it into the noisy count (post-processing of the release). The
state ``{"clip", "round", ...}`` is public: it goes into the round line, checkpoints and the report.
The layer itself releases the count without noise: it must be followed by a noise layer (the CLI
refuses ``aclip`` without ``noise`` or ``dnoise``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fl.spec import CompositionError, Guarantee, RandomSource, RoundInfo, ValueSpec

__all__ = ["AdaptiveClip"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveClip:
    """Clip to a norm that tracks the ``target_quantile`` of client update norms, privately.

    ``initial_clip``: ``C_1``. ``learning_rate``: ``eta`` of the geometric update. ``count_noise``:
    the std of the noise on the count of unclipped clients, per unit of the noise layer's multiplier
    (> 1/2; see the module docstring for what it costs).
    """

    target_quantile: float = 0.5
    initial_clip: float = 0.1
    learning_rate: float = 0.2
    count_noise: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"AdaptiveClip(target_quantile=...) must be in [0, 1], got {self.target_quantile}")
        if not (self.initial_clip > 0 and math.isfinite(self.initial_clip)):
            raise ValueError(f"AdaptiveClip(initial_clip=...) needs a positive finite norm, got {self.initial_clip}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"AdaptiveClip(learning_rate=...) must be positive, got {self.learning_rate}")
        if not (self.count_noise > 0.5 and math.isfinite(self.count_noise)):
            raise ValueError(
                f"AdaptiveClip(count_noise=...) must be a finite number > 0.5 (the count's noise std per unit of "
                f"noise multiplier; at 0.5 the update would need infinite noise), got {self.count_noise}"
            )

    @property
    def name(self) -> str:
        return f"adaptive-clip(q={self.target_quantile:g}, C0={self.initial_clip:g})"

    @property
    def count_scale(self) -> float:
        """``c``: the extra coordinate is ``c * (b - 1/2)``."""
        return 1.0 / math.sqrt(self.count_noise**2 - 0.25)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one client's encoded vector, in units of the round's clip: ``sqrt(1 + c^2/4)``."""
        return math.sqrt(1.0 + self.count_scale**2 / 4.0)

    def split(self, sigma: float) -> tuple[float, float]:
        """``(update noise multiplier, count noise std)`` for Gaussian noise of std ``sigma`` on the joint sum.

        ``sigma`` is in the layer's output units (``C_t = 1``): the update's sensitivity there is 1, the
        count's coordinate is ``c`` times the count.
        """
        return sigma, sigma / self.count_scale

    # ---- the StatefulLayer protocol ----------------------------------------------------------------
    def initialize(self) -> dict[str, Any]:
        return {"clip": self.initial_clip, "round": 0}

    def _clip(self, state: Mapping[str, Any] | None) -> float:
        if state is None:
            raise CompositionError(
                "AdaptiveClip is stateful: pass the round's state (BoundPipeline.initialize(), then what "
                "BoundPipeline.advance returns)"
            )
        clip = float(state["clip"])
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"adaptive clip state holds an invalid clip norm {clip!r}")
        return clip

    def bind(self, spec: ValueSpec) -> ValueSpec:
        if spec.domain != "real":
            raise CompositionError("AdaptiveClip works on real vectors: put it before Quantize")
        if spec.noise_std > 0:
            raise CompositionError("AdaptiveClip after noise voids the noise calibration: put it before the noise")
        return spec.with_(size=spec.size + 1, l2_bound=self.sensitivity, linf_bound=None)

    def encode(
        self, x: NDArray[Any], spec: ValueSpec, rng: RandomSource, state: Mapping[str, Any] | None = None
    ) -> NDArray[Any]:
        clip = self._clip(state)
        x = np.asarray(x, dtype=np.float64)
        norm = float(np.linalg.norm(x))
        unclipped = norm <= clip
        scaled = x / clip if unclipped else x / norm  # clip(x, C) / C: norm <= 1
        return np.concatenate([scaled, [self.count_scale * (float(unclipped) - 0.5)]])

    def decode(
        self, total: NDArray[Any], spec: ValueSpec, info: RoundInfo, rng: RandomSource,
        state: Mapping[str, Any] | None = None,
    ) -> NDArray[Any]:
        return np.asarray(total, dtype=np.float64)[:-1] * self._clip(state)

    def unclipped_count(self, total: NDArray[Any], info: RoundInfo) -> float:
        """The noisy number of included clients that were not clipped, from the released sum."""
        return float(np.asarray(total, dtype=np.float64)[-1]) / self.count_scale + info.n_included / 2.0

    def next_state(
        self, state: Mapping[str, Any], total: NDArray[Any], spec: ValueSpec, info: RoundInfo
    ) -> dict[str, Any]:
        """The geometric update from the noisy count (``b_bar`` clamped to [0, 1]: post-processing)."""
        clip = self._clip(state)
        n = info.n_included
        if n == 0:
            return dict(state)
        count = self.unclipped_count(total, info)
        fraction = min(1.0, max(0.0, count / n))
        nxt = clip * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return {"clip": nxt, "round": int(state["round"]) + 1, "clip_used": clip, "unclipped_count": count,
                "included": n, "clipped_fraction": 1.0 - fraction}

    def measurements(self, state: Mapping[str, Any]) -> dict[str, float]:
        """Last round's clip norm and noisy clipped fraction, and the next round's clip."""
        if "clip_used" not in state:
            return {"next_clip": float(state["clip"])}
        return {"clip": float(state["clip_used"]), "clipped_fraction": float(state["clipped_fraction"]),
                "next_clip": float(state["clip"])}

    def guarantees(self, spec: ValueSpec, info: RoundInfo) -> tuple[Guarantee, ...]:
        c, s = self.count_scale, self.sensitivity
        return (
            Guarantee(
                layer=self.name,
                property=(
                    f"each client's contribution is its update clipped to the round's norm C_t (in units of C_t) "
                    f"plus one coordinate c*(b - 1/2) with c = {c:.4g} (b: not clipped): L2 sensitivity "
                    f"sqrt(1 + c^2/4) = {s:.6g}, which the following noise layer is calibrated to"
                ),
                against="no one by itself: the count is released only through the following noise layer",
                assumptions=(
                    "C_t is public (it is the server's state); C_{t+1} = C_t exp(-eta (b_bar - gamma)) is "
                    "post-processing of the noisy count",
                    "the noise layer's multiplier z covers both releases: update z*S, count std z*S/c clients",
                ),
                params={"target_quantile": self.target_quantile, "initial_clip": self.initial_clip,
                        "learning_rate": self.learning_rate, "count_noise": self.count_noise,
                        "count_scale": c, "l2_sensitivity": s},
            ),
        )
