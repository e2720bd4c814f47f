"""Dropout with ``nn.Dropout``'s contract (in training each element is zeroed with probability p
and the rest scaled by 1 / (1 - p); identity in evaluation), whose CPU mask is drawn as 16-bit
uniform integers instead of by torch's per-element Bernoulli kernel.

On the CPU that kernel draws from the generator one element at a time: in a profile of the joint
stage on the Amazon pairs (2 cores, docs/experiments.md) ``nn.Dropout`` took a fifth of the
training loop's time; this layer takes 0.4-0.6x its time forward and backward, and a step of
that stage's model 0.90-0.96x (``make bench``, part ``dropout``). p is rounded to a multiple of 2^-16 (0.5 exactly; 0.3 becomes 0.29999). Other
devices keep ``F.dropout`` (a fused kernel there). Draws come from torch's default generator of
the tensor's device, so a seed (and a restored RNG state) reproduces the masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * _LEVELS)  # an element is kept where its draw >= threshold
        self.scale = _LEVELS / (_LEVELS - self.threshold)  # 1 / (1 - the p drawn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.threshold:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        keep = torch.randint(0, _LEVELS, x.shape, dtype=torch.int32) >= self.threshold
        return x * (keep * self.scale).to(x.dtype)  # one product: its backward is one op, as torch's

    def extra_repr(self) -> str:
        return f"p={self.p}"
