"""Per-domain softmax cross-entropy: L = sum_d w_d * mean CE over targets in domain d."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def domain_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor,
                         ranges: list[tuple[int, int]], weights: list[float]):
    """Loss and per-domain statistics.

    hidden: (B, L, D) encoder outputs; targets: (B, L) global item id per position, 0 = no loss;
    item_weight: (n_items + 1, D) tied item table; ranges[d] = (first_id, last_id + 1) of domain d;
    weights[d] = w_d. Each target's softmax runs over the items of its own domain only.

    Returns ``(loss, sums, counts)``: ``sums[d]`` is the summed CE (detached) and ``counts[d]``
    the number of targets of domain d. A domain with no targets adds an exact 0 that still
    touches its item rows, so every parameter takes part in every step.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    loss = hidden.new_zeros(())
    sums, counts = [], []
    for (lo, hi), w in zip(ranges, weights):
        sel = (flat_t >= lo) & (flat_t < hi)
        h = flat_h[sel]  # (N_d, D)
        logits = h @ item_weight[lo:hi].T  # (N_d, n_d)
        n = int(sel.sum())
        if n:
            ce = F.cross_entropy(logits.float(), flat_t[sel] - lo, reduction="sum")
            loss = loss + w * ce / n
            sums.append(ce.detach())
        else:
            loss = loss + 0.0 * logits.sum()
            sums.append(hidden.new_zeros((), dtype=torch.float32))
        counts.append(n)
    return loss, sums, counts
