"""Sequential recommender: embeddings + encoder + per-domain scoring with tied item weights.

``forward`` gives hidden states, the per-domain CE loss, or one domain's next-item scores;
``recommend`` gives top-k item ids.
"""
from __future__ import annotations

import torch
from torch import nn

from model.embeddings import SequenceEmbedding
from model.encoder import Encoder
from model.losses import domain_cross_entropy


class Recommender(nn.Module):
    def __init__(self, embedding: SequenceEmbedding, encoder: Encoder, ranges: list[tuple[int, int]]):
        """ranges[d] = (first global id, last + 1) of domain d."""
        super().__init__()
        self.embedding = embedding
        self.encoder = encoder
        self.ranges = [tuple(r) for r in ranges]

    def forward(self, items: torch.Tensor, targets: torch.Tensor | None = None,
                weights: list[float] | None = None, domain: int | None = None):
        """One entry point, so a wrapping engine (DeepSpeed ZeRO-3 gathers parameters around
        module forwards) sees every use of the tied item table inside ``forward``.

        - ``targets`` given: ``(loss, per-domain CE sums, per-domain counts)``, see
          ``domain_cross_entropy``; ``weights[d]`` is w_d.
        - ``domain`` given: ``[B, n_items of domain]`` next-item scores at the last position
          (column j = global id ``lo + j``; left padding puts the latest event last).
        - neither: hidden states ``[B, L, D]``.
        items: [B, L] int64, 0 = padding.
        """
        h = self.encoder(self.embedding(items), items)  # (B, L, D)
        table = self.embedding.item.weight
        if targets is not None:
            return domain_cross_entropy(h, targets, table, self.ranges, weights)
        if domain is not None:
            lo, hi = self.ranges[domain]
            return h[:, -1] @ table[lo:hi].T
        return h

    @torch.no_grad()
    def recommend(self, items: torch.Tensor, domain: int, k: int = 10) -> torch.Tensor:
        """[B, L] -> [B, k] global item ids of the best-scored items of ``domain``."""
        return self(items, domain=domain).topk(k, dim=-1).indices + self.ranges[domain][0]


def build_recommender(*, n_items: int, ranges: list[tuple[int, int]], item_domain: torch.Tensor,
                      d_model: int, n_layers: int, n_heads: int, ff_mult: int, dropout: float,
                      emb_dropout: float, max_len: int, causal: bool, domain_embeddings: bool) -> Recommender:
    emb = SequenceEmbedding(n_items=n_items, n_domains=len(ranges), d_model=d_model, max_len=max_len,
                            item_domain=item_domain, domain_embeddings=domain_embeddings, dropout=emb_dropout)
    enc = Encoder(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ff_mult=ff_mult, dropout=dropout,
                  causal=causal)
    return Recommender(emb, enc, ranges)
