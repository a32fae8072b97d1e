"""Privacy layers: each owns its client half (``encode``) and its server half (``decode``)."""

from fl.layers.adaptive_clip import AdaptiveClip
from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise

__all__ = ["AdaptiveClip", "Clip", "GaussianNoise", "Quantize"]
