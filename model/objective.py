"""What a training row asks the model to predict, and how a history is scored."""
from __future__ import annotations

import torch


class NextItem:
    """SASRec: each position predicts the next item (inputs and targets as the stream gives them)."""

    mask_id = None

    def training(self, items: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return items, targets

    def scoring(self, items: torch.Tensor) -> torch.Tensor:
        return items


class Cloze:
    """BERT4Rec-style cloze: a random ``mask_prob`` share of a row's labelled positions is
    replaced by ``mask_id`` and predicted; scoring appends ``mask_id`` after the history."""

    def __init__(self, mask_id: int, mask_prob: float):
        self.mask_id, self.mask_prob = mask_id, mask_prob

    def training(self, items: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a random ``mask_prob`` share of the labelled positions (targets > 0; a row's
        targets are its own items of the label domain), at least the last one in a row where
        the draw masked none; only masked positions keep their target."""
        cand = targets > 0
        masked = cand & (torch.rand(targets.shape, device=targets.device) < self.mask_prob)
        none = cand.any(1) & ~masked.any(1)
        last = cand & (cand.long().cumsum(1) == cand.sum(1, keepdim=True))
        masked = masked | (last & none[:, None])
        return items.masked_fill(masked, self.mask_id), targets * masked

    def scoring(self, items: torch.Tensor) -> torch.Tensor:
        return torch.cat([items[:, 1:], torch.full_like(items[:, :1], self.mask_id)], 1)
