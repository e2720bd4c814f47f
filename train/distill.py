"""Knowledge distillation in the joint stage (``train.joint.distill``).

Each target domain's target-only model (trained in this run, or in ``train.init_from``'s run) is
a frozen teacher. A target-domain target of a joint batch whose row holds an earlier event of that
domain also learns the teacher's next-item distribution, the teacher reading what it was trained
on: the row's events of that domain alone, right-aligned (``train.data.stream.train_rows`` with
``only_domain``). The joint model then keeps the target-only model's reading of the target's own
sequence while it learns what the source domain adds (:class:`model.SoftTargets` mixes the two
CEs). The teachers are DeepSpeed engines of the target-only stage (ZeRO-partitioned like it), in
eval mode, run without gradients.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model import SoftTargets
from model.recommender import latest_positions
from train.checkpoint import ResumeError


def own_domain_rows(items: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``items`` [B, L] (left padded), ``own`` [B, L] bool (the domain's items) -> (``sub`` [B, L]:
    each row's ``own`` items alone, in order, right-aligned; ``dest`` [B, L]: where each position's
    item lands in ``sub`` (meaningful at ``own`` positions only))."""
    after = own.flip(1).long().cumsum(1).flip(1) - own.long()  # the row's own items after each position
    dest = items.shape[1] - 1 - after
    sub = torch.zeros_like(items)
    r, c = own.nonzero(as_tuple=True)
    sub[r, dest[r, c]] = items[r, c]
    return sub, dest


class Teacher:
    """``teacher(items, targets)`` -> :class:`model.SoftTargets` of a training batch: for each
    domain d with a teacher engine, the next-item distribution of every domain-d target whose row
    holds a domain-d event at or before the target's input position (``has``): the softmax of the
    teacher's scores / ``temperature``."""

    def __init__(self, engines: dict[int, object], ranges: list[tuple[int, int]], weight: float,
                 temperature: float = 1.0):
        self.engines, self.ranges, self.weight, self.temperature = engines, ranges, weight, temperature

    @torch.no_grad()
    def __call__(self, items: torch.Tensor, targets: torch.Tensor) -> SoftTargets:
        probs, has = {}, {}
        for d, engine in self.engines.items():
            lo, hi = self.ranges[d]
            rows, cols = ((targets >= lo) & (targets < hi)).nonzero(as_tuple=True)  # row-major: the loss's order
            own = (items >= lo) & (items < hi)
            latest = latest_positions(own)[rows, cols]  # the latest d event at or before each target's input
            has[d] = latest >= 0
            taught = has[d].nonzero(as_tuple=True)[0]  # one lookup of the taught targets, indexed 3 times
            sub, dest = own_domain_rows(items, own)
            at_rows = rows[taught]
            logits = engine(sub, domain=d, at=(at_rows, dest[at_rows, latest[taught]]))  # (N_has, n_d)
            p = torch.zeros(len(rows), hi - lo, device=items.device)
            p[taught] = torch.softmax(logits.float() / self.temperature, -1)
            probs[d] = p
        return SoftTargets(probs, has, self.weight)


def teacher_checkpoints(run_dir: Path, init_from: str, unit: str) -> Path:
    """The checkpoints folder of the target-only ``unit`` that teaches: this run's, else
    ``train.init_from``'s; ResumeError naming both where neither holds its best weights."""
    tried = [Path(run_dir) / unit / "checkpoints"] + ([Path(init_from) / unit / "checkpoints"] if init_from else [])
    for folder in tried:
        if (folder / "best").is_dir():
            return folder
    raise ResumeError(f"train.joint.distill: no best weights of stage {unit} in " + " or ".join(map(str, tried))
                      + f" (train {unit} first, in this run or in the run train.init_from names)")
