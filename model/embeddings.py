"""Item, position and domain embeddings over global item ids (0 = padding)."""
from __future__ import annotations

import torch
from torch import nn


class SequenceEmbedding(nn.Module):
    """``items [B, L] -> [B, L, D]``: item + position (+ domain) embeddings, scaled and dropped out.

    ``item_domain`` is an ``[n_items + 1]`` table: 0 for padding, 1 + domain index per item.
    The item table is also the output embedding (tied weights): see ``Recommender.score``.
    """

    def __init__(self, *, n_items: int, n_domains: int, d_model: int, max_len: int,
                 item_domain: torch.Tensor, domain_embeddings: bool, dropout: float):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, d_model, padding_idx=0)
        self.position = nn.Embedding(max_len, d_model)
        self.domain = nn.Embedding(n_domains + 1, d_model, padding_idx=0) if domain_embeddings else None
        self.register_buffer("item_domain", item_domain.clone(), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = d_model ** 0.5
        nn.init.normal_(self.item.weight, std=d_model ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        L = items.shape[1]
        pos = torch.arange(L, device=items.device)
        x = self.item(items) * self.scale + self.position(pos)[None]  # (B, L, D)
        if self.domain is not None:
            x = x + self.domain(self.item_domain[items])
        return self.dropout(x) * (items != 0).unsqueeze(-1)
