"""Shared test settings: tiny models are fastest single-threaded on this 2-core machine."""

import torch

torch.set_num_threads(1)
