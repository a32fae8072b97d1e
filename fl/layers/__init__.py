"""Privacy layers: each owns its client half (``encode``) and its server half (``decode``)."""

from fl.layers.clip import Clip, Quantize
from fl.layers.noise import GaussianNoise

__all__ = ["Clip", "GaussianNoise", "Quantize"]
