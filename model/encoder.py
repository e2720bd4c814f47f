"""Pre-LN Transformer blocks over item sequences, causal or bidirectional.

Blocks live in an ``nn.ModuleList`` (not ``nn.TransformerEncoder``, whose deep copy of its layer
defeats ``deepspeed.zero.Init`` partitioning).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.dropout import Dropout


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(),
                                nn.Linear(ff_mult * d_model, d_model))
        self.dropout = dropout
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); mask: (B, 1, L, L) bool, True = may attend."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.ff(self.ln2(x)))


class Encoder(nn.Module):
    def __init__(self, *, d_model: int, n_layers: int, n_heads: int, ff_mult: int, dropout: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.checkpoint_blocks = False  # recompute blocks in backward: activation memory for compute
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ff_mult, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)

    def attention_mask(self, items: torch.Tensor) -> torch.Tensor:
        """(B, 1, L, L) bool: keys that are real items (and, if causal, not in the future).

        The diagonal is always allowed so a padding query still has one key (no NaN rows).
        """
        L = items.shape[1]
        keep = (items != 0)[:, None, None, :]  # (B, 1, 1, L)
        if self.causal:
            keep = keep & torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        return keep | torch.eye(L, dtype=torch.bool, device=items.device)

    def forward(self, x: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) embeddings of items (B, L) -> (B, L, D)."""
        mask = self.attention_mask(items)
        for blk in self.blocks:
            if self.checkpoint_blocks and self.training:
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.ln(x)
