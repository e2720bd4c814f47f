"""Sequential recommender: embeddings + encoder + per-domain scoring with tied item weights.

``forward`` gives hidden states, the per-domain CE loss, or one domain's next-item scores;
``recommend`` gives top-k item ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.embeddings import SequenceEmbedding
from model.encoder import Encoder
from model.losses import domain_ce_sums, domain_sampled_ce_sums, domain_uniform_ce_sums

# sampled training losses by name (``Recommender.loss``; "full" is domain_ce_sums)
_SAMPLED_LOSSES = {"sampled": domain_sampled_ce_sums, "uniform": domain_uniform_ce_sums}


class Scorer:
    """Scores of a batch's queries ``[B, D']`` against the items of one domain (global ids
    ``lo .. hi - 1``), a range of them at a time: ``columns(a, b)`` is ``[B, b - a]`` for the
    domain's items ``a .. b - 1`` (0-based within the domain). Each range is normalised (cosine
    scoring) and given its bias column by itself, so memory stays ``B x (b - a)`` whatever the
    vocabulary, and a column's score is the same whichever range it is computed in."""

    def __init__(self, query: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int,
                 temperature: float):
        self.query, self.table, self.bias, self.lo, self.temperature = query, table, bias, lo, temperature
        self.n_items = hi - lo

    def rows(self, a: int, b: int) -> torch.Tensor:
        """The scored item vectors of the domain's items ``a .. b - 1``: ``[b - a, D']``."""
        return self._scored(self.table[self.lo + a:self.lo + b],
                            None if self.bias is None else self.bias[self.lo + a:self.lo + b])

    def rows_at(self, cols: torch.Tensor) -> torch.Tensor:
        """The scored item vectors of the domain's items ``cols`` (0-based): ``[len(cols), D']``."""
        return self._scored(self.table[self.lo + cols], None if self.bias is None else self.bias[self.lo + cols])

    def _scored(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.temperature:
            rows = F.normalize(rows, dim=-1)
        return rows if bias is None else torch.cat([rows, bias[:, None]], 1)

    def columns(self, a: int, b: int) -> torch.Tensor:
        return self.query @ self.rows(a, b).T

    def at(self, cols: torch.Tensor) -> torch.Tensor:
        """``[B]``: row r's score of the domain's item ``cols[r]``, as a ``[B, B]`` matrix product
        (the kind of product ``columns`` uses) of which the diagonal is kept."""
        return (self.query @ self.rows_at(cols).T).diagonal()


class Recommender(nn.Module):
    def __init__(self, embedding: SequenceEmbedding, encoder: Encoder, ranges: list[tuple[int, int]],
                 heads: nn.ModuleList | None = None, loss: str = "full", num_sampled: int = 0,
                 mask_id: int | None = None, mask_prob: float = 0.2, view_domains: list[int] | None = None,
                 view_encoders: nn.ModuleDict | None = None, exclude_own_items: bool = False,
                 loss_mean: str = "target", temperature: float = 0.0, label_smoothing: float = 0.0,
                 uniform_aux: float = 0.0, uniform_aux_domains: list[int] | None = None, item_bias: bool = False):
        """ranges[d] = (first global id, last + 1) of domain d; heads[d] (optional) maps the shared
        hidden state to domain d's query before scoring, residually: q_d = h + heads[d](h).
        ``loss`` (training only; scoring stays full): "full" softmax over the target's domain,
        "sampled" (in-batch + ``num_sampled`` uniform negatives per domain, log-Q corrected;
        ``model.losses.domain_sampled_ce_sums``) or "uniform" (the target against ``num_sampled``
        uniform draws alone; ``model.losses.domain_uniform_ce_sums``).
        ``mask_id`` (cloze objective): training masks a random ``mask_prob`` share of each row's
        labelled positions (at least one) with ``mask_id`` and predicts them; scoring appends
        ``mask_id`` after the history and reads the prediction there.
        ``view_domains``: for each domain d listed, d's query also adds the shared encoder's state
        over the row's domain-d events alone, up to the same position (``domain_view``): the mixed
        sequence carries cross-domain context, the own-domain view the domain's recent history
        undiluted. A domain not listed scores from the mixed sequence alone (one encoder pass
        fewer); None or [] = no views.
        ``view_encoders`` (optional): ``view_encoders[str(d)]`` encodes domain d's view in place of
        the shared encoder, which then sees mixed sequences alone. It may hold encoders for more
        domains than ``view_domains`` (a stage that does not score them leaves them idle), so
        every stage of a run has the same parameters.
        ``exclude_own_items`` (full loss only): a target's softmax leaves out the other items of
        its row (inputs and targets), as the sampled evaluation never draws a user's own items as
        negatives: later items of the same user are not pushed down as wrong answers.
        ``loss_mean``: "target" (a domain's loss is the mean over its targets) or "row" (the mean
        over rows of each row's mean over its targets of the domain: every user weighs the same,
        as in the evaluation).
        ``temperature`` > 0: cosine scoring, every score (training and evaluation) is
        cos(query, item) / temperature (both L2-normalised, so item norms carry no popularity);
        0: the dot product.
        ``label_smoothing`` (full loss only): the training softmax's target puts that share of its
        mass uniformly over the domain's items (``torch.nn.functional.cross_entropy``).
        ``uniform_aux`` > 0 (full loss only): a target of a domain in ``uniform_aux_domains`` (None =
        every domain) adds that weight times its CE against ``num_sampled`` uniform draws of its
        domain (``model.losses.domain_uniform_ce_sums``, the ranking the sampled evaluation
        measures) to its full-softmax CE; the other domains draw nothing.
        ``item_bias``: every score (training and evaluation) adds a learned bias of the item,
        zero at the start: the cosine scores' range cannot carry popularity, a bias can. Built as
        one more item-table column (the bias) met by a constant 1 in the query, so every loss
        and scoring path sees it unchanged."""
        super().__init__()
        if loss != "full" and loss not in _SAMPLED_LOSSES:
            raise ValueError(f"loss must be 'full' or one of {sorted(_SAMPLED_LOSSES)}, got {loss!r}")
        if exclude_own_items and loss != "full":
            raise ValueError(f"exclude_own_items needs loss 'full', got {loss!r}")
        if loss_mean not in ("target", "row"):
            raise ValueError(f"loss_mean must be 'target' or 'row', got {loss_mean!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = dot product), got {temperature}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing and (loss != "full" or exclude_own_items):
            raise ValueError("label_smoothing needs loss 'full' without exclude_own_items")
        if uniform_aux < 0 or (uniform_aux and (loss != "full" or num_sampled < 1)):
            raise ValueError(f"uniform_aux must be >= 0 and needs loss 'full' with num_sampled >= 1, got {uniform_aux} "
                             f"({loss!r}, num_sampled {num_sampled})")
        self.uniform_aux = uniform_aux
        self.uniform_aux_domains = sorted(set(range(len(ranges)) if uniform_aux_domains is None else uniform_aux_domains))
        self.per_row = loss_mean == "row"
        self.temperature, self.label_smoothing = temperature, label_smoothing
        self.loss, self.num_sampled, self.exclude_own_items = loss, num_sampled, exclude_own_items
        self.view_domains = sorted(set(view_domains or []))
        if any(not 0 <= d < len(ranges) for d in self.view_domains):
            raise ValueError(f"view_domains {view_domains} must index the {len(ranges)} domains")
        if view_encoders is not None and any(str(d) not in view_encoders for d in self.view_domains):
            raise ValueError(f"view_encoders has domains {sorted(view_encoders)}, view_domains {self.view_domains} "
                             "needs one for each")
        self.mask_id, self.mask_prob = mask_id, mask_prob
        self.embedding = embedding
        self.encoder = encoder
        self.ranges = [tuple(r) for r in ranges]
        self.heads = heads
        self.view_encoders = view_encoders
        rows = embedding.item.num_embeddings  # not the weight's shape: under zero.Init it is partitioned by now
        self.item_bias = nn.Parameter(torch.zeros(rows)) if item_bias else None

    def queries(self, h: torch.Tensor, views: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-domain query states [..., D]; ``views[d]`` (same shape), where given, is added to
        domain d's.
        Every head runs on every call (ZeRO-3 needs each module in every forward, whatever the
        batch holds)."""
        qs = [h] * len(self.ranges) if self.heads is None else [h + head(h) for head in self.heads]
        views = views or {}
        return [q + views[d] if d in views else q for d, q in enumerate(qs)]

    def domain_view(self, items: torch.Tensor, domain: int, last_only: bool = False) -> torch.Tensor:
        """[B, L, D]: at each position p, the view encoder's state (the shared one where the model
        has no ``view_encoders``) at the row's latest ``domain`` event
        at or before p, encoded with the other domains' events removed (0 before the first one).
        Events keep their positions in the row, so a state depends on nothing after it (causal).
        ``last_only``: [B, D] at the last position only (scoring)."""
        lo, hi = self.ranges[domain]
        own = (items >= lo) & (items < hi)
        sub = torch.where(own, items, 0)
        encoder = self.encoder if self.view_encoders is None else self.view_encoders[str(domain)]
        hd = encoder(self.embedding(sub), sub)  # (B, L, D); other positions are padding
        pos = torch.arange(items.shape[1], device=items.device)
        latest = torch.where(own, pos, -1).cummax(1).values  # latest own position <= p, -1: none yet
        if last_only:
            latest = latest[:, -1:]
        view = hd.gather(1, latest.clamp(min=0)[..., None].expand(-1, -1, hd.shape[-1])) * (latest >= 0)[..., None]
        return view[:, 0] if last_only else view

    def forward(self, items: torch.Tensor, targets: torch.Tensor | None = None, domain: int | None = None,
                consume=None):
        """One entry point, so a wrapping engine (DeepSpeed ZeRO-3 gathers parameters around
        module forwards) sees every use of the tied item table inside ``forward``.

        - ``targets`` given: ``(per-domain CE sums, per-domain target counts)``, see
          ``model.losses.domain_ce_sums``; ``weighted_domain_mean`` makes the loss of them.
        - ``domain`` given: ``[B, n_items of domain]`` next-item scores at the last position
          (column j = global id ``lo + j``; left padding puts the latest event last); with
          ``consume``, ``consume(scorer)`` instead, a :class:`Scorer` that scores a range of the
          domain's items at a time (bounded memory for any vocabulary).
        - neither: hidden states ``[B, L, D]``.
        items: [B, L] int64, 0 = padding.
        """
        own = torch.cat([items, targets], 1) if targets is not None and self.exclude_own_items else None
        if self.mask_id is not None:
            if targets is not None:
                items, targets = self.cloze(items, targets)
            elif domain is not None:
                items = torch.cat([items[:, 1:], torch.full_like(items[:, :1], self.mask_id)], 1)
        h = self.encoder(self.embedding(items), items)  # (B, L, D)
        if targets is not None:
            table = self.embedding.item.weight
            if self.temperature:
                table = F.normalize(table, dim=-1)
            if self.item_bias is not None:
                table = torch.cat([table, self.item_bias[:, None]], 1)
            q = [self.scaled(x) for x in self.queries(h, {d: self.domain_view(items, d) for d in self.view_domains})]
            if self.loss == "full":
                sums, counts = domain_ce_sums(q, targets, table, self.ranges, exclude=own, per_row=self.per_row,
                                              label_smoothing=self.label_smoothing)
                if self.uniform_aux:
                    aux, _ = domain_uniform_ce_sums(q, targets, table, self.ranges, self.num_sampled,
                                                    per_row=self.per_row, domains=self.uniform_aux_domains)
                    sums = [s + self.uniform_aux * a for s, a in zip(sums, aux)]
                return sums, counts
            return _SAMPLED_LOSSES[self.loss](q, targets, table, self.ranges, self.num_sampled, per_row=self.per_row)
        if domain is not None:
            lo, hi = self.ranges[domain]
            q = self.queries(h[:, -1])[domain]
            if domain in self.view_domains:
                q = q + self.domain_view(items, domain, last_only=True)
            scorer = Scorer(self.scaled(q), self.embedding.item.weight, self.item_bias, lo, hi, self.temperature)
            return consume(scorer) if consume is not None else scorer.columns(0, hi - lo)
        return h

    def scaled(self, q: torch.Tensor) -> torch.Tensor:
        """A query as scored: itself (dot product) or, with a temperature, L2-normalised and
        divided by it (the item table is normalised beside it in ``forward``); with ``item_bias``
        a last column of ones, which meets the table's bias column."""
        q = F.normalize(q, dim=-1) / self.temperature if self.temperature else q
        return torch.cat([q, q.new_ones(q.shape[:-1] + (1,))], -1) if self.item_bias is not None else q

    def cloze(self, items: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a random ``mask_prob`` share of the labelled positions (targets > 0; for the cloze
        objective a row's targets are its own items of the label domain), at least the last one
        in a row where the draw masked none; only masked positions keep their target."""
        cand = targets > 0
        masked = cand & (torch.rand(targets.shape, device=targets.device) < self.mask_prob)
        none = cand.any(1) & ~masked.any(1)
        last = cand & (cand.long().cumsum(1) == cand.sum(1, keepdim=True))
        masked = masked | (last & none[:, None])
        return items.masked_fill(masked, self.mask_id), targets * masked

    @torch.no_grad()
    def recommend(self, items: torch.Tensor, domain: int, k: int = 10) -> torch.Tensor:
        """[B, L] -> [B, k] global item ids of the best-scored items of ``domain``."""
        return self(items, domain=domain).topk(k, dim=-1).indices + self.ranges[domain][0]


class ZeroLinear(nn.Linear):
    """A linear map that starts at zero (a domain head starts as the shared query: q_d = h). Zeroed
    in ``reset_parameters``, after nn.Linear's own draw (the random stream stays as it was), so it
    holds under ``deepspeed.zero.Init`` too."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def build_recommender(*, n_items: int, ranges: list[tuple[int, int]], item_domain: torch.Tensor,
                      d_model: int, n_layers: int, n_heads: int, ff_mult: int, dropout: float,
                      emb_dropout: float, max_len: int, causal: bool, domain_embeddings: bool,
                      domain_heads: bool = False, loss: str = "full", num_sampled: int = 0,
                      masked: bool = False, mask_prob: float = 0.2, view_domains: list[int] | None = None,
                      view_layers: int = 0, view_encoder_domains: list[int] | None = None,
                      exclude_own_items: bool = False, loss_mean: str = "target", temperature: float = 0.0,
                      label_smoothing: float = 0.0, uniform_aux: float = 0.0,
                      uniform_aux_domains: list[int] | None = None, item_bias: bool = False) -> Recommender:
    """``masked``: cloze objective; id ``n_items + 1`` is the [MASK] token (no domain).
    ``loss``/``num_sampled``/``loss_mean``/``temperature``/``label_smoothing``/``uniform_aux``/
    ``item_bias``: the training softmax, its mean and the scoring, see :class:`Recommender`.
    ``view_layers`` > 0: each domain of ``view_encoder_domains`` (default ``view_domains``) gets
    its own encoder of that many blocks (same width and heads) for its own-domain view; 0: the
    views run through the shared encoder. The encoders of domains outside ``view_domains`` stay
    idle and leave the global RNG as they found it."""
    if masked:
        item_domain = torch.cat([item_domain, item_domain.new_zeros(1)])
    emb = SequenceEmbedding(n_items=n_items + int(masked), n_domains=len(ranges), d_model=d_model, max_len=max_len,
                            item_domain=item_domain, domain_embeddings=domain_embeddings, dropout=emb_dropout)
    enc = Encoder(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ff_mult=ff_mult, dropout=dropout,
                  causal=causal)
    heads = nn.ModuleList(ZeroLinear(d_model, d_model) for _ in ranges) if domain_heads else None
    views = None
    if view_layers > 0:
        used = set(view_domains or [])
        views = nn.ModuleDict()
        for d in sorted(used if view_encoder_domains is None else set(view_encoder_domains)):
            # an idle encoder (a domain this model does not view, e.g. the source's in a target-only
            # stage) draws its init from a forked RNG: the stage's dropout and sampling then see the
            # random stream of the model without it
            with torch.random.fork_rng(devices=[], enabled=d not in used):
                views[str(d)] = Encoder(d_model=d_model, n_layers=view_layers, n_heads=n_heads,
                                        ff_mult=ff_mult, dropout=dropout, causal=causal)
    return Recommender(emb, enc, ranges, heads, loss=loss, num_sampled=num_sampled,
                       mask_id=n_items + 1 if masked else None, mask_prob=mask_prob, view_domains=view_domains,
                       view_encoders=views, exclude_own_items=exclude_own_items, loss_mean=loss_mean,
                       temperature=temperature, label_smoothing=label_smoothing, uniform_aux=uniform_aux,
                       uniform_aux_domains=uniform_aux_domains, item_bias=item_bias)
