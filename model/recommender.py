"""Sequential recommender: embeddings + encoder + per-domain scoring with tied item weights.

The recommender is composed of what it is given: a training loss (``model.losses``), an
objective (``model.objective``), a scoring (``model.scoring``) and the domains whose query adds
an own-domain view. ``training_loss`` and ``score`` are its two named entry points; both run
through ``forward`` (``self(...)``), so a wrapping engine (DeepSpeed ZeRO-3 gathers parameters
around module forwards) sees every use of the tied item table. ``build_recommender(cfg, vocab)``
is the one constructor.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from model.config import ModelConfig, Vocabulary
from model.embeddings import SequenceEmbedding
from model.encoder import Encoder
from model.losses import LOSSES, SoftTargets, UniformSoftmax, WithUniformAux
from model.objective import Cloze, NextItem
from model.scoring import Scorer, Scoring


class Recommender(nn.Module):
    def __init__(self, embedding: SequenceEmbedding, encoder: Encoder, ranges: list[tuple[int, int]], *, loss,
                 objective=NextItem(), scoring: Scoring = Scoring(), heads: nn.ModuleList | None = None,
                 view_domains: Sequence[int] = (), view_encoders: nn.ModuleDict | None = None,
                 item_bias: bool = False, transition_table: bool = False, transition_dropout: float = 0.0,
                 transition_residual: bool = False):
        """ranges[d] = (first global id, last + 1) of domain d; heads[d] (optional) maps the shared
        hidden state to domain d's query, residually: q_d = h + heads[d](h). ``view_domains``: for
        each domain d listed, d's query also adds the own-domain view (:meth:`domain_view`),
        through ``view_encoders[str(d)]`` where given (it may hold idle encoders of domains not
        listed, so every stage of a run has the same parameters), or ``view_encoders["shared"]``
        (one for every domain) where that is its only key, else the shared encoder.
        ``item_bias``: a learned bias per item, zero at the start, added to every score.
        ``transition_table``: domain d's query also adds ``transition[the row's latest d event]``, a
        learned vector an item, zero at the start (:class:`ZeroTable`); in training, left out of a
        random ``transition_dropout`` share of the positions (every domain's query at once).
        ``transition_residual``: the table is fitted to what the rest of the model misses (see
        :meth:`_residual_loss`); scoring adds it as above."""
        super().__init__()
        self.embedding, self.encoder, self.heads, self.view_encoders = embedding, encoder, heads, view_encoders
        self.ranges = [tuple(r) for r in ranges]
        self.loss, self.objective, self.scoring = loss, objective, scoring
        self.view_domains = sorted(set(view_domains))
        rows = embedding.item.num_embeddings  # not the weight's shape: under zero.Init it is partitioned by now
        self.item_bias = nn.Parameter(torch.zeros(rows)) if item_bias else None
        self.transition = ZeroTable(rows, embedding.position.embedding_dim) if transition_table else None
        self.transition_dropout, self.transition_residual = transition_dropout, transition_residual

    # -- the two entry points --------------------------------------------------------------------
    def training_loss(self, items: torch.Tensor, targets: torch.Tensor, soft: SoftTargets | None = None):
        """``(per-domain CE sums, per-domain target counts)`` of a batch (see
        ``model.losses.domain_ce_sums``); ``model.losses.weighted_domain_mean`` makes the loss.
        ``soft``: a teacher's distributions for some targets (the full softmax only)."""
        return self(items, targets=targets, soft=soft)

    def score(self, items: torch.Tensor, domain: int, consume: Callable | None = None):
        """``[B, n_items of domain]`` next-item scores at the last position (column j = global id
        ``lo + j``; left padding puts the latest event last), or ``consume(scorer)`` for a
        :class:`model.scoring.Scorer` that scores a range of items at a time."""
        return self(items, domain=domain, consume=consume)

    def next_item_logits(self, items: torch.Tensor, domain: int, rows: torch.Tensor, cols: torch.Tensor):
        """``[N, n_items of domain]``: the scores of the next item after position ``cols[i]`` of row
        ``rows[i]`` (every position's query, as training scores it; a teacher's distributions)."""
        return self(items, domain=domain, at=(rows, cols))

    def forward(self, items: torch.Tensor, targets: torch.Tensor | None = None, domain: int | None = None,
                consume: Callable | None = None, soft: SoftTargets | None = None,
                at: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The entry points' one way in (items: [B, L] int64, 0 = padding): the training loss
        with ``targets``, scores with ``domain`` (at the last position, or at ``at``), else hidden
        states ``[B, L, D]``."""
        if targets is not None:
            return self._training_loss(items, targets, soft)
        if domain is not None:  # scores rank in full precision, also under a training autocast
            with torch.autocast(items.device.type, enabled=False):
                return self._score(items, domain, consume) if at is None else self._logits_at(items, domain, *at)
        return self.encode(items)

    # -- what an engine needs to know ----------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The repeated units (every encoder's Transformer blocks): what ZeRO-3 keeps gathered at
        a time and activation checkpointing recomputes."""
        return [b for enc in self.encoders() for b in enc.blocks]

    def encoders(self) -> list[Encoder]:
        """The shared encoder and any view encoders."""
        return [self.encoder, *(self.view_encoders.values() if self.view_encoders is not None else ())]

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute every encoder's blocks in backward (activation memory for compute)."""
        for enc in self.encoders():
            enc.checkpoint_blocks = on

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters used outside their own module's forward: the tied item table, which also
        scores (ZeRO-3 must gather it around the recommender's forward)."""
        return [self.embedding.item.weight]

    # -- the parts -------------------------------------------------------------------------------
    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] -> hidden states [B, L, D]."""
        return self.encoder(self.embedding(items), items)

    def _training_loss(self, items: torch.Tensor, targets: torch.Tensor, soft: SoftTargets | None = None):
        own = torch.cat([items, targets], 1)  # the row's items: a full softmax may leave them out
        items, targets = self.objective.training(items, targets)
        h = self.encode(items)  # (B, L, D)
        views = {d: self.domain_view(items, d) for d in self.view_domains}
        table = self.scoring.rows(self.embedding.item.weight, self.item_bias)
        kw = {} if soft is None else {"soft": soft}  # only the full softmax takes a teacher's (config checks)
        if self.transition is not None and self.transition_residual:
            return self._residual_loss(items, targets, own, self.queries(h, views), table, kw)
        if self.transition is not None:
            self._add_transitions(items, views)
        bias = self.item_bias is not None
        queries = [self.scoring.query(q, bias) for q in self.queries(h, views)]
        return self.loss(queries, targets, table, self.ranges, own, **kw)

    def _residual_loss(self, items, targets, own, qs, table, kw: dict):
        """The loss of the model without the table plus the loss of the table alone: the second
        CE scores the same queries with the table's vector added, everything but the table held
        fixed (queries and item vectors detached). The encoder, heads, views and item vectors
        train as in the model without the table (they never lean on it); the table learns the
        transitions they miss. ``qs``: the per-domain queries without the table; ``table``: the
        scored item rows; ``kw``: the first CE's extra arguments (a teacher's). Returns the two
        per-domain CE sums added, the counts once."""
        trans: dict[int, torch.Tensor] = {}
        self._add_transitions(items, trans)
        bias = self.item_bias is not None
        sums, counts = self.loss([self.scoring.query(q, bias) for q in qs], targets, table, self.ranges, own, **kw)
        fixed = [self.scoring.query(q.detach() + trans[d], bias) for d, q in enumerate(qs)]
        extra, _ = self.loss(fixed, targets, table.detach(), self.ranges, own)
        return [a + b for a, b in zip(sums, extra)], counts

    def _score(self, items: torch.Tensor, domain: int, consume: Callable | None):
        items = self.objective.scoring(items)
        lo, hi = self.ranges[domain]
        q = self.queries(self.encode(items)[:, -1])[domain]
        if domain in self.view_domains:
            q = q + self.domain_view(items, domain, last_only=True)
        if self.transition is not None:
            q = q + self.transition(latest_of_domain(items, lo, hi)[:, -1])
        scorer = self._scorer(q, domain)
        return consume(scorer) if consume is not None else scorer.columns(0, hi - lo)

    def _logits_at(self, items: torch.Tensor, domain: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        items = self.objective.scoring(items)
        views = {domain: self.domain_view(items, domain)} if domain in self.view_domains else {}
        if self.transition is not None:
            self._add_transitions(items, views)
        q = self.queries(self.encode(items), views)[domain][rows, cols]  # (N, D)
        scorer = self._scorer(q, domain)
        return scorer.columns(0, scorer.n_items)

    def _scorer(self, q: torch.Tensor, domain: int) -> Scorer:
        """The :class:`Scorer` of queries ``q`` [N, D] against ``domain``'s items."""
        lo, hi = self.ranges[domain]
        return Scorer(self.scoring.query(q, self.item_bias is not None), self.embedding.item.weight, self.item_bias,
                      lo, hi, self.scoring)

    def _add_transitions(self, items: torch.Tensor, views: dict[int, torch.Tensor]) -> None:
        """Adds to ``views[d]`` (in place; set where absent) the table's vector of the row's latest d
        event at each position, left out at a random ``transition_dropout`` share of the positions
        in training (one draw a position for every domain, none when 0: the random stream stays)."""
        keep = None
        if self.training and self.transition_dropout:
            keep = (torch.rand(items.shape, device=items.device) >= self.transition_dropout)[..., None]
        for d, (lo, hi) in enumerate(self.ranges):
            t = self.transition(latest_of_domain(items, lo, hi))
            t = t if keep is None else t * keep
            views[d] = views[d] + t if d in views else t

    def queries(self, h: torch.Tensor, views: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-domain query states [..., D]; ``views[d]`` (same shape), where given, is added to
        domain d's. Every head runs on every call (ZeRO-3 needs each module in every forward)."""
        qs = [h] * len(self.ranges) if self.heads is None else [h + head(h) for head in self.heads]
        views = views or {}
        return [q + views[d] if d in views else q for d, q in enumerate(qs)]

    def domain_view(self, items: torch.Tensor, domain: int, last_only: bool = False) -> torch.Tensor:
        """[B, L, D]: at each position p, the view encoder's state at the row's latest ``domain``
        event at or before p, encoded with the other domains' events removed (0 before the first
        one). Events keep their positions, so a state depends on nothing after it (causal).
        ``last_only``: [B, D] at the last position only (scoring)."""
        lo, hi = self.ranges[domain]
        own = (items >= lo) & (items < hi)
        sub = torch.where(own, items, 0)
        hd = self.view_encoder(domain)(self.embedding(sub), sub)  # (B, L, D); other positions are padding
        latest = latest_positions(own)
        if last_only:
            latest = latest[:, -1:]
        view = hd.gather(1, latest.clamp(min=0)[..., None].expand(-1, -1, hd.shape[-1])) * (latest >= 0)[..., None]
        return view[:, 0] if last_only else view

    def view_encoder(self, domain: int) -> nn.Module:
        """The encoder of ``domain``'s own-domain view."""
        if self.view_encoders is None:
            return self.encoder
        return self.view_encoders["shared" if "shared" in self.view_encoders else str(domain)]

    @torch.no_grad()
    def recommend(self, items: torch.Tensor, domain: int, k: int = 10, *,
                  exclude_history: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] -> ([B, k] global item ids of the best-scored items of ``domain``, [B, k] their
        scores). ``exclude_history``: items already in a row are not recommended to it (k shrinks
        to the items left where the domain has fewer)."""
        lo, hi = self.ranges[domain]
        scores = self.score(items, domain)
        seen = torch.zeros_like(scores, dtype=torch.bool)
        if exclude_history:
            rows, cols = ((items >= lo) & (items < hi)).nonzero(as_tuple=True)
            seen[rows, items[rows, cols] - lo] = True
            scores = scores.masked_fill(seen, float("-inf"))
        top = scores.topk(min(k, hi - lo - int(seen.sum(1).max())), dim=-1)  # rows share one k
        return top.indices + lo, top.values


def latest_positions(own: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L]: at each position p the latest position <= p where ``own`` holds, -1
    before the first."""
    pos = torch.arange(own.shape[1], device=own.device)
    return torch.where(own, pos, -1).cummax(1).values


def latest_of_domain(items: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[B, L] item ids -> [B, L]: at each position the row's latest item with id in [lo, hi) at or
    before it, 0 (padding) before the first."""
    latest = latest_positions((items >= lo) & (items < hi))
    return items.gather(1, latest.clamp(min=0)) * (latest >= 0)


class ZeroTable(nn.Embedding):
    """An embedding table that starts at zero, row 0 (padding) staying zero; zeroed in
    ``reset_parameters`` without a draw (the random stream stays as without it), so it holds
    under ``deepspeed.zero.Init`` too."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim, padding_idx=0)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class ZeroLinear(nn.Linear):
    """A linear map that starts at zero (a domain head starts as the shared query: q_d = h). Zeroed
    in ``reset_parameters``, after nn.Linear's own draw (the random stream stays as it was), so it
    holds under ``deepspeed.zero.Init`` too."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def training_loss_of(cfg: ModelConfig, aux_domains: Sequence[int]):
    """The loss object ``cfg`` asks for (:data:`model.losses.LOSSES`); the uniform auxiliary only
    where a domain of the stage uses it."""
    base = LOSSES[cfg.loss](cfg, cfg.loss_mean == "row")
    if not (cfg.uniform_aux and aux_domains):
        return base
    return WithUniformAux(base, UniformSoftmax(cfg.sampled_negatives, cfg.loss_mean == "row", tuple(sorted(aux_domains))),
                          cfg.uniform_aux)


def build_recommender(cfg: ModelConfig, vocab: Vocabulary, active: Sequence[str] | None = None) -> Recommender:
    """The recommender of ``cfg`` over ``vocab``. ``active``: the domains the model will train and
    score (a stage's; None: every domain): the own-domain views and the uniform auxiliary loss of
    the others are left out (no encoder pass, no random draws for them), while their view
    encoders are still built (idle, from a forked RNG: the stage's dropout and sampling see the
    random stream of the model without them), so every stage of a run has the same parameters."""
    active = list(vocab.names) if active is None else list(active)

    def indices(names: list[str]) -> list[int]:  # [] lists every domain
        return [vocab.index(n) for n in (names or vocab.names) if n in active]

    dual = cfg.sequence == "dual"
    masked = cfg.objective == "masked"
    item_domain = vocab.item_domain()
    if masked:  # id n_items + 1 is the [MASK] token (no domain)
        item_domain = torch.cat([item_domain, item_domain.new_zeros(1)])
    emb = SequenceEmbedding(n_items=vocab.n_items + int(masked), n_domains=len(vocab.names), d_model=cfg.d_model,
                            max_len=cfg.max_len, item_domain=item_domain, domain_embeddings=cfg.domain_embeddings,
                            dropout=cfg.emb_dropout)
    block = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, ff_mult=cfg.ff_mult, dropout=cfg.dropout, causal=cfg.causal)
    enc = Encoder(n_layers=cfg.n_layers, **block)
    heads = nn.ModuleList(ZeroLinear(cfg.d_model, cfg.d_model) for _ in vocab.names) if cfg.domain_heads else None
    viewed = indices(cfg.view_domains) if dual else []
    views = None
    if dual and cfg.view_layers > 0:
        views = nn.ModuleDict()
        keys = {"shared": bool(viewed)} if cfg.view_shared else {
            str(d): d in viewed for d in sorted(vocab.index(n) for n in (cfg.view_domains or vocab.names))}
        for key, used in keys.items():
            with torch.random.fork_rng(devices=[], enabled=not used):
                views[key] = Encoder(n_layers=cfg.view_layers, **block)
    objective = Cloze(vocab.n_items + 1, cfg.mask_prob) if masked else NextItem()
    return Recommender(emb, enc, vocab.ranges, loss=training_loss_of(cfg, indices(cfg.uniform_aux_domains)),
                       objective=objective, scoring=Scoring(cfg.temperature), heads=heads, view_domains=viewed,
                       view_encoders=views, item_bias=cfg.item_bias, transition_table=cfg.transition_table,
                       transition_dropout=cfg.transition_dropout, transition_residual=cfg.transition_residual)
