"""Item, position and domain embeddings over global item ids (0 = padding)."""
from __future__ import annotations

import torch
from torch import nn

from model.dropout import Dropout


class ItemTable(nn.Embedding):
    """``[n_items + 1, D]`` item embeddings, N(0, 1/D), row 0 (padding) zero.

    Initialised inside its own ``reset_parameters``: a module built under ``deepspeed.zero.Init``
    is partitioned as soon as its ``__init__`` returns, and an init applied afterwards would land
    on an empty partition."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim, padding_idx=0)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.embedding_dim ** -0.5)
        with torch.no_grad():
            self.weight[0].zero_()


class SequenceEmbedding(nn.Module):
    """``items [B, L] -> [B, L, D]``: item + position (+ domain) embeddings, scaled and dropped out.

    ``item_domain`` is an ``[n_items + 1]`` table: 0 for padding, 1 + domain index per item.
    The item table is also the output embedding (tied weights): see ``Recommender.score``.
    """

    def __init__(self, *, n_items: int, n_domains: int, d_model: int, max_len: int,
                 item_domain: torch.Tensor, domain_embeddings: bool, dropout: float):
        super().__init__()
        # Drawn in this order (position, domain, then the item table, N(0, 1/D)) and registered
        # item, position, domain, which fixes the order ZeRO flattens them in. (Until 2026-12-06 an
        # (n_items + 1) x D draw was made and discarded first, to keep an older random stream: 538 MB
        # a rank at a 1M-item vocabulary; every seed's initial weights moved when it went.)
        position = nn.Embedding(max_len, d_model)
        domain = nn.Embedding(n_domains + 1, d_model, padding_idx=0) if domain_embeddings else None
        self.item, self.position, self.domain = ItemTable(n_items + 1, d_model), position, domain
        self.register_buffer("item_domain", item_domain.clone(), persistent=False)
        self.dropout = Dropout(dropout)
        self.scale = d_model ** 0.5

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Positions count from the right (the last column is always position max_len - 1), so a
        batch trimmed of its leading padding columns is embedded as the full-width one."""
        L, width = items.shape[1], self.position.num_embeddings
        if L > width:
            raise ValueError(f"items have {L} columns, more than model.max_len={width}")
        pos = torch.arange(width - L, width, device=items.device)
        x = self.item(items) * self.scale + self.position(pos)[None]  # (B, L, D)
        if self.domain is not None:
            x = x + self.domain(self.item_domain[items])
        return self.dropout(x) * (items != 0).unsqueeze(-1)
