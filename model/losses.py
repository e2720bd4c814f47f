"""Per-domain softmax cross-entropy: L = sum_d w_d * mean CE over targets in domain d.

The mean is over a domain's targets (every target counts the same), or with ``per_row`` over the
rows that have targets in the domain, each row's own mean over them (every user counts the same,
as in the sampled evaluation, where a user is one test target).

Split in two so a distributed trainer can make the mean global: ``domain_ce_sums`` gives each
domain's summed CE and target count on the local batch; ``weighted_domain_mean`` turns sums and
(possibly all-reduced) counts into the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's next-item distributions for a batch's targets (knowledge distillation).

    ``probs[d]``: (N_d, n_d), over domain d's items, one row per domain-d target of the batch in
    the order :func:`_per_domain` selects them (row-major over the (B, L) targets); ``has[d]``:
    (N_d,) bool, where the teacher gave one. Such a target's CE becomes (1 - weight) x CE(target)
    + weight x CE(teacher's distribution); the other targets (and domains not in ``probs``) keep
    the plain CE."""

    probs: dict[int, torch.Tensor]
    has: dict[int, torch.Tensor]
    weight: float

    def mix(self, d: int, logits: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """Domain d's per-target CE ``ce`` (N_d,) with the teacher's term where it has one."""
        if d not in self.probs or not len(ce):
            return ce
        soft = -(self.probs[d] * F.log_softmax(logits, -1)).sum(-1)
        return torch.where(self.has[d], (1 - self.weight) * ce + self.weight * soft, ce)


def domain_ce_sums(hidden: torch.Tensor | list[torch.Tensor], targets: torch.Tensor, item_weight: torch.Tensor,
                   ranges: list[tuple[int, int]], exclude: torch.Tensor | None = None, per_row: bool = False,
                   label_smoothing: float = 0.0,
                   soft: SoftTargets | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Summed CE and target count per domain.

    hidden: (B, L, D) encoder outputs, or one such tensor per domain (domain d's targets are
    scored from hidden[d]: per-domain query heads); targets: (B, L) global item id per position,
    0 = no loss; item_weight: (n_items + 1, D) tied item table; ranges[d] = (first_id, last_id + 1).
    Each target's softmax runs over the items of its own domain only.
    exclude: optional (B, K) global item ids per row, 0 = none: each of the row's targets is scored
    against its domain's items without these (the target itself always stays in), e.g. the row's
    own items, which the sampled evaluation protocol never draws as negatives.

    Returns ``(sums, counts)``: ``sums[d]`` a scalar with gradient, ``counts`` a (n_domains,)
    int64 tensor. A domain without targets gives an exact 0 that still touches its item rows and
    head, so every parameter takes part in every step. ``per_row``: ``sums[d]`` adds each row's
    mean CE over its domain-d targets and ``counts[d]`` is the number of rows with such targets.
    ``label_smoothing``: as in ``F.cross_entropy``, over the target's domain (not with ``exclude``).
    ``soft``: a teacher's distributions mixed into the CE of the targets it covers (:class:`SoftTargets`;
    not with ``exclude``).
    """
    if (label_smoothing or soft is not None) and exclude is not None:
        raise ValueError("label_smoothing and soft targets cannot be combined with exclude (excluded logits are -inf)")
    domain_of = {lo: d for d, (lo, _) in enumerate(ranges)}

    def full_ce(h, t, lo, hi, rows=None):
        logits = (h @ item_weight[lo:hi].T).float()  # (N_d, n_d)
        if exclude is not None and len(h):
            ex = exclude[rows]  # (N_d, K): each target's row's excluded ids
            drop = (ex >= lo) & (ex < hi) & (ex != t[:, None])
            at = drop.nonzero(as_tuple=True)
            logits = logits.index_put((at[0], ex[at] - lo), logits.new_tensor(float("-inf")))
        if not len(h):
            return 0.0 * logits.sum()
        ce = F.cross_entropy(logits, t - lo, reduction="none", label_smoothing=label_smoothing)
        return ce if soft is None else soft.mix(domain_of[lo], logits, ce)

    return _per_domain(hidden, targets, ranges, full_ce, with_rows=exclude is not None, per_row=per_row)


def _per_domain(hidden, targets: torch.Tensor, ranges: list[tuple[int, int]], ce, with_rows: bool = False,
                per_row: bool = False, domains: list[int] | None = None):
    """``ce(h (N_d, D), t (N_d,), lo, hi)`` gives the CE of each of domain d's targets, (N_d,) (a
    domain without targets: a 0-dim zero that touches its parameters); (sums, counts) of them,
    per target or, with ``per_row``, per row (see :func:`domain_ce_sums`).
    ``with_rows``: ``ce`` also takes each target's batch row (N_d,).
    ``domains``: the domains ``ce`` runs for; the others' sums are a plain 0 (``ce`` not called, so
    no random draws). None: every domain."""
    per_domain = hidden if isinstance(hidden, (list, tuple)) else [hidden] * len(ranges)
    flat_t = targets.reshape(-1)
    rows = torch.arange(targets.shape[0], device=targets.device).repeat_interleave(targets.shape[-1]) \
        if with_rows or per_row else None
    sums, counts = [], []
    for d, (hid, (lo, hi)) in enumerate(zip(per_domain, ranges)):
        sel = (flat_t >= lo) & (flat_t < hi)
        r = rows[sel] if rows is not None else None  # each target's batch row
        per = torch.bincount(r, minlength=targets.shape[0]) if per_row else None  # the domain's targets in each row
        counts.append((per > 0).sum() if per_row else sel.sum())
        if domains is not None and d not in domains:
            sums.append(hid.new_zeros(()))
            continue
        args = (hid.reshape(-1, hid.shape[-1])[sel], flat_t[sel], lo, hi) + ((r,) if with_rows else ())
        losses = ce(*args)
        sums.append((losses / per[r]).sum() if per_row and losses.dim() else losses.sum())
    return sums, torch.stack(counts)


def domain_sampled_ce_sums(hidden: torch.Tensor | list[torch.Tensor], targets: torch.Tensor,
                           item_weight: torch.Tensor, ranges: list[tuple[int, int]],
                           num_sampled: int, per_row: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Like :func:`domain_ce_sums`, but each domain's softmax runs over a candidate set instead of
    every item: the batch's own targets of that domain (in-batch negatives) plus ``num_sampled``
    items drawn uniformly from the domain, each distinct item once. Logits are corrected by
    ``-log Q(c)``, Q(c) = expected draws of c = its count among the batch's targets + num_sampled
    / n_d, so frequent in-batch items are not over-penalised (sampled softmax with log-Q
    correction). Memory and time scale with the candidates, not the vocabulary. With every item
    of a domain a target exactly once and no uniform draws the loss equals the full softmax.
    """
    def sampled_ce(h, t, lo, hi):
        drawn = torch.randint(lo, hi, (num_sampled,), device=t.device)
        cand, inverse = torch.unique(torch.cat([t, drawn]), return_inverse=True)  # sorted, distinct
        in_batch = torch.bincount(inverse[:len(t)], minlength=len(cand)).float()
        log_q = torch.log(in_batch + num_sampled / (hi - lo))
        logits = (h @ item_weight[cand].T).float() - log_q  # (N_d, |C|)
        if len(h):
            return F.cross_entropy(logits, inverse[:len(t)], reduction="none")
        return 0.0 * logits.sum() + 0.0 * item_weight[lo:hi].sum()

    return _per_domain(hidden, targets, ranges, sampled_ce, per_row=per_row)


def domain_uniform_ce_sums(hidden: torch.Tensor | list[torch.Tensor], targets: torch.Tensor,
                           item_weight: torch.Tensor, ranges: list[tuple[int, int]],
                           num_sampled: int, per_row: bool = False,
                           domains: list[int] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Like :func:`domain_ce_sums`, but each target's softmax runs over itself and ``num_sampled``
    items drawn uniformly (with replacement) from its domain, one draw shared by the batch's
    targets of that domain; a drawn item equal to a row's own target is left out of that row.

    No in-batch negatives and no correction (a uniform proposal shifts every logit equally), so the
    optimum ranks a user's next item above uniformly drawn items of its domain: the quantity the
    sampled evaluation protocol (999 uniform same-domain negatives) measures, not full-catalogue
    ranking, which puts more weight on popular items. Cost scales with ``num_sampled``.
    ``domains``: only these domains draw and score (the others' sums are 0); None: every domain.
    """
    def uniform_ce(h, t, lo, hi):
        drawn = torch.randint(lo, hi, (num_sampled,), device=t.device)
        pos = (h * item_weight[t]).sum(-1, keepdim=True)  # (N_d, 1)
        neg = (h @ item_weight[drawn].T).masked_fill(drawn[None, :] == t[:, None], float("-inf"))
        logits = torch.cat([pos, neg], 1).float()
        if len(h):
            return F.cross_entropy(logits, torch.zeros_like(t), reduction="none")
        return 0.0 * logits.sum() + 0.0 * item_weight[lo:hi].sum()

    return _per_domain(hidden, targets, ranges, uniform_ce, per_row=per_row, domains=domains)


def weighted_domain_mean(sums: list[torch.Tensor], counts: torch.Tensor, weights: list[float],
                         scale: float = 1.0) -> torch.Tensor:
    """``scale * sum_d w_d * sums[d] / counts[d]`` (a domain with count 0 adds 0 * sums[d]).

    Computed where ``counts`` live, without reading them on the host: each factor
    ``w_d * scale / counts[d]`` is formed in float64 and rounded once to the sums' dtype, as a
    Python scalar multiplying them would be, so the loss is the same to the bit."""
    c = counts.to(torch.float64)
    w = torch.tensor(weights, dtype=torch.float64, device=counts.device) * scale
    factors = torch.where(c > 0, w / c.clamp(min=1), torch.zeros_like(c)).to(sums[0].dtype)
    loss = sums[0].new_zeros(())
    for d, s in enumerate(sums):
        loss = loss + factors[d] * s
    return loss


def domain_cross_entropy(hidden, targets: torch.Tensor, item_weight: torch.Tensor,
                         ranges: list[tuple[int, int]], weights: list[float]):
    """Single-batch loss: ``(loss, detached per-domain CE sums, per-domain counts as a list)``."""
    sums, counts = domain_ce_sums(hidden, targets, item_weight, ranges)
    return weighted_domain_mean(sums, counts, weights), [s.detach() for s in sums], counts.tolist()


# -- the training losses a Recommender is given ----------------------------------------------------
# Each is called as ``loss(queries, targets, table, ranges, own)`` -> (per-domain CE sums,
# per-domain counts): ``queries`` one [B, L, D'] tensor per domain, ``table`` the scored item
# table, ``own`` (B, 2L) the row's inputs and targets (for exclude_own_items). The full softmax
# (alone or under the uniform auxiliary) also takes ``soft=`` a teacher's :class:`SoftTargets`.


# Every loss has one interface: ``loss(queries, targets, table, ranges, own)``, ``describe(names)``
# (names: the domains by index) and ``columns(n_domain_items, batch_rows)``, the logits a target is
# scored against (what memory and FLOP estimates need). Chosen by name through :data:`LOSSES`.


@dataclass(frozen=True)
class FullSoftmax:
    """Softmax over every item of the target's domain (:func:`domain_ce_sums`)."""

    per_row: bool = False
    label_smoothing: float = 0.0
    exclude_own_items: bool = False

    def __call__(self, queries, targets, table, ranges, own, soft: SoftTargets | None = None):
        return domain_ce_sums(queries, targets, table, ranges, exclude=own if self.exclude_own_items else None,
                              per_row=self.per_row, label_smoothing=self.label_smoothing, soft=soft)

    def describe(self, names: list[str] | None = None) -> str:
        return "full softmax over the target's domain" + (
            f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")

    def columns(self, n_domain_items: int, batch_rows: int) -> int:
        return n_domain_items


@dataclass(frozen=True)
class SampledSoftmax:
    """In-batch targets + ``num_sampled`` uniform items, log-Q corrected (:func:`domain_sampled_ce_sums`)."""

    num_sampled: int
    per_row: bool = False

    def __call__(self, queries, targets, table, ranges, own):
        return domain_sampled_ce_sums(queries, targets, table, ranges, self.num_sampled, per_row=self.per_row)

    def describe(self, names: list[str] | None = None) -> str:
        return f"sampled softmax (in-batch + {self.num_sampled} uniform negatives of the domain, log-Q corrected)"

    def columns(self, n_domain_items: int, batch_rows: int) -> int:
        return min(n_domain_items, self.num_sampled + batch_rows)


@dataclass(frozen=True)
class UniformSoftmax:
    """The target against ``num_sampled`` uniform items of its domain (:func:`domain_uniform_ce_sums`);
    ``domains``: only these draw and score (None: every domain)."""

    num_sampled: int
    per_row: bool = False
    domains: tuple[int, ...] | None = None

    def __call__(self, queries, targets, table, ranges, own):
        return domain_uniform_ce_sums(queries, targets, table, ranges, self.num_sampled, per_row=self.per_row,
                                      domains=None if self.domains is None else list(self.domains))

    def describe(self, names: list[str] | None = None) -> str:
        return f"softmax over the target and {self.num_sampled} uniform negatives of its domain"

    def columns(self, n_domain_items: int, batch_rows: int) -> int:
        return self.num_sampled + 1


@dataclass(frozen=True)
class WithUniformAux:
    """A full softmax plus ``weight`` x the uniform-negative CE of the listed domains (ABXI's auxiliary)."""

    base: FullSoftmax
    aux: UniformSoftmax
    weight: float

    def __call__(self, queries, targets, table, ranges, own, soft: SoftTargets | None = None):
        sums, counts = self.base(queries, targets, table, ranges, own, soft=soft)
        aux, _ = self.aux(queries, targets, table, ranges, own)
        return [s + self.weight * a for s, a in zip(sums, aux)], counts

    def describe(self, names: list[str] | None = None) -> str:
        doms = ", ".join(names[d] for d in self.aux.domains) if names and self.aux.domains else "its domains"
        return (f"{self.base.describe()}, plus {self.weight:g} x the CE against {self.aux.num_sampled} uniform "
                f"negatives of the domain for {doms}")

    def columns(self, n_domain_items: int, batch_rows: int) -> int:
        return self.base.columns(n_domain_items, batch_rows) + self.aux.columns(n_domain_items, batch_rows)


# model.loss -> how a ModelConfig builds it (``model.recommender.training_loss_of`` adds the auxiliary)
LOSSES = {
    "full": lambda cfg, per_row: FullSoftmax(per_row, cfg.label_smoothing, cfg.exclude_own_items),
    "sampled": lambda cfg, per_row: SampledSoftmax(cfg.sampled_negatives, per_row),
    "uniform": lambda cfg, per_row: UniformSoftmax(cfg.sampled_negatives, per_row),
}
