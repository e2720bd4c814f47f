"""The optimizer's parameter groups and the LR schedule: linear warmup, cosine decay to 0.1x, times
a plateau scale the training loop may lower."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The LR multiplier of step ``s``: ``warmup_cosine(s) * scale``. ``scale`` is the plateau
    decay so far (``set_lr_scale``); an object, not a lambda, so LambdaLR's state dict (and so a
    DeepSpeed checkpoint) carries it."""

    def __init__(self, *, warmup: int, total: int, scale: float = 1.0):
        self.warmup, self.total, self.scale = warmup, total, scale

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup=self.warmup, total=self.total) * self.scale


def set_lr_scale(scheduler, scale: float) -> None:
    """Set the plateau scale of a LambdaLR built on :class:`Schedule` and apply it at once: the
    optimizer's LR becomes ``base * warmup_cosine(current step) * scale``."""
    for f in scheduler.lr_lambdas:
        f.scale = scale
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups as the field sets them: ``weight_decay`` on the weight matrices of linear
    layers only; none on biases, norms, embedding tables (items, positions, domains) or the item
    bias. Found by module type, so it holds for ZeRO-3's partitioned (0-sized) parameters too."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]

