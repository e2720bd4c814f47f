"""The recommender's configuration and vocabulary: every model option declared once, here, with
the invariants between them (``ModelConfig.__post_init__``). Pure Python: the experiment config
(``train.config``) reads it from YAML, ``model.build_recommender(cfg, vocab)`` builds from it."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class ModelConfig:
    """SASRec-style encoder over the mixed-domain item sequence. A violated invariant is a
    ValueError naming the field (the experiment config prefixes ``model.``)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ff_mult: int = 4  # feed-forward width = ff_mult * d_model
    dropout: float = 0.2
    emb_dropout: float = 0.2
    max_len: int = 50  # sequences are trimmed to their last max_len events
    causal: bool = True
    domain_embeddings: bool = True
    domain_heads: bool = True  # per-domain residual query projection before scoring
    # training softmax: "full" over every item of the target's domain; "sampled": in-batch
    # targets + sampled_negatives uniform items per domain, log-Q corrected (large vocabularies);
    # "uniform": the target against sampled_negatives uniform items of its domain only
    loss: Literal["full", "sampled", "uniform"] = "full"
    sampled_negatives: int = 1024
    # full loss only: each target's softmax leaves out the other items of its training row
    exclude_own_items: bool = False
    # a domain's loss: "target" = mean over its targets in the global batch; "row" = mean over
    # the rows (users) with targets in it of each row's own mean (every user weighs the same)
    loss_mean: Literal["target", "row"] = "target"
    # > 0: cosine scoring, cos(query, item) / temperature, in training and evaluation; 0: dot product
    temperature: float = 0.0
    # every score (training and evaluation) adds a learned per-item bias, zero at the start
    item_bias: bool = False
    # full loss only (not with exclude_own_items): share of the target's mass spread over its domain
    label_smoothing: float = 0.0
    # full loss only, > 0: a target of a domain in uniform_aux_domains ([] = every domain) adds this
    # weight times its CE against sampled_negatives uniform items of its domain; 0 = off
    uniform_aux: float = 0.0
    uniform_aux_domains: list[str] = field(default_factory=list)
    # "mixed": one time-ordered sequence of every domain's events; "per_domain": a domain's rows
    # see that domain's events alone; "dual": mixed inputs, and each domain's query adds the
    # encoder's state over the row's events of that domain alone (one more encoder pass a domain)
    sequence: Literal["mixed", "per_domain", "dual"] = "mixed"
    view_domains: list[str] = field(default_factory=list)  # dual: the domains with a view; [] = every domain
    view_layers: int = 0  # dual: 0 = views through the shared encoder; N = each its own N-block encoder
    # view_layers > 0 only: one view encoder serves every viewed domain, so a domain that a stage
    # does not train (the target, in the source stage) starts the next stage with a trained view
    view_shared: bool = False
    # next_item only: each domain's query adds a learned vector of the row's latest event of that
    # domain (zero at the start, one row an item): item-to-item transitions held apart from the
    # item embeddings (FPMC's factorised transitions inside the model, not an evaluation term)
    transition_table: bool = False
    # transition_table only: the share of training positions whose queries leave the table's vector
    # out (the encoder must predict without it there); evaluation always adds it. 0 = never left out
    transition_dropout: float = 0.0
    # transition_table only: the table learns only what the rest of the model misses (a second CE
    # with everything but the table held fixed); the rest trains as without it. The training loss
    # logged is the sum of the two CEs
    transition_residual: bool = False
    # "next_item" (SASRec, causal) or "masked" (BERT4Rec-style cloze, bidirectional: a random
    # mask_prob share of each row's label-domain items is predicted, at least one)
    objective: Literal["next_item", "masked"] = "next_item"
    mask_prob: float = 0.2

    def __post_init__(self) -> None:
        for name, tp in typing.get_type_hints(ModelConfig).items():
            if typing.get_origin(tp) is Literal:
                _check(getattr(self, name) in typing.get_args(tp),
                       f"{name} must be one of {list(typing.get_args(tp))}, got {getattr(self, name)!r}")
        for name in ("d_model", "n_layers", "n_heads", "ff_mult", "max_len"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name, most in _MOST.items():  # beyond these no tensor's size fits an int64 count of bytes
            _check(getattr(self, name) <= most, f"{name} must be <= {most:,}, got {getattr(self, name):,}")
        for name in ("dropout", "emb_dropout", "transition_dropout"):
            _check(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        _check(self.causal == (self.objective == "next_item"),
               f"objective={self.objective!r} needs causal={self.objective == 'next_item'} (a bidirectional encoder "
               "would see the next item it is asked for; the cloze objective needs both directions)")
        _check(0 < self.mask_prob <= 1, f"mask_prob must be in (0, 1], got {self.mask_prob}")
        _check(not self.transition_table or self.objective == "next_item", "transition_table needs objective=next_item")
        _check(not self.transition_dropout or self.transition_table, "transition_dropout needs transition_table: true")
        _check(not self.transition_residual or self.transition_table, "transition_residual needs transition_table: true")
        self._check_loss()
        self._check_views()

    def _check_loss(self) -> None:
        full = self.loss == "full"
        _check(full or self.sampled_negatives >= 1,
               f"loss={self.loss} needs sampled_negatives >= 1, got {self.sampled_negatives}")
        _check(not self.exclude_own_items or full, f"exclude_own_items needs loss=full, got {self.loss!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 = dot product), got {self.temperature}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(not self.label_smoothing or (full and not self.exclude_own_items),
               "label_smoothing needs loss=full without exclude_own_items")
        _check(self.uniform_aux >= 0, f"uniform_aux must be >= 0, got {self.uniform_aux}")
        _check(not self.uniform_aux or full, f"uniform_aux={self.uniform_aux} needs loss=full, got {self.loss!r}")
        _check(not self.uniform_aux or self.sampled_negatives >= 1,
               f"uniform_aux needs sampled_negatives >= 1, got {self.sampled_negatives}")

    def _check_views(self) -> None:
        dual = self.sequence == "dual"
        _check(not dual or self.objective == "next_item", "sequence=dual needs objective=next_item")
        _check(not self.view_domains or dual, f"view_domains={self.view_domains} needs sequence=dual, got {self.sequence!r}")
        _check(self.view_layers >= 0, f"view_layers must be >= 0, got {self.view_layers}")
        _check(not self.view_layers or dual, f"view_layers={self.view_layers} needs sequence=dual, got {self.sequence!r}")
        _check(not self.view_shared or self.view_layers, "view_shared needs view_layers >= 1 (0 views through the shared encoder)")


# Upper bounds of the sizes (far above any model that trains: xl is d_model 2048, 24 layers)
_MOST = {"d_model": 65536, "n_layers": 4096, "n_heads": 4096, "ff_mult": 256, "max_len": 1 << 20}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Vocabulary:
    """The domains' item id ranges, the one description of them (prepare, stream, evaluate,
    export and recommend use it): domain k owns global ids ``offsets[k] + 1 .. ends[k]``
    (``ends[k] = offsets[k] + sizes[k]``); 0 is padding."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, domains: list[dict]) -> "Vocabulary":
        """From a manifest's ``domains`` (``name``, ``n_items``, in id order)."""
        return cls(tuple(d["name"] for d in domains), tuple(int(d["n_items"]) for d in domains))

    @property
    def n_items(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """The id before each domain's first: domain k's ids are ``offsets[k] + 1 .. ends[k]``."""
        return tuple(lo - 1 for lo, _ in self.ranges)

    @property
    def ends(self) -> tuple[int, ...]:
        """Each domain's last id."""
        return tuple(hi - 1 for _, hi in self.ranges)

    def of_ids(self, items):
        """The domain index of each item id (ids >= 1; a numpy array or a tensor, returned alike)."""
        ends = torch.tensor(self.ends)
        out = torch.searchsorted(ends, torch.as_tensor(items), side="left")
        return out if isinstance(items, torch.Tensor) else out.numpy()

    def columns(self, domain: int, items):
        """Global ids of ``domain`` as its 0-based columns (what scores and rankings index)."""
        return items - self.offsets[domain] - 1

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """``(first global id, last + 1)`` of each domain."""
        out, lo = [], 1
        for n in self.sizes:
            out.append((lo, lo + n))
            lo += n
        return out

    def index(self, name: str) -> int:
        return self.names.index(name)

    def item_domain(self) -> torch.Tensor:
        """``[n_items + 1]`` int64: 0 for padding, 1 + domain index for each item."""
        t = torch.zeros(self.n_items + 1, dtype=torch.long)
        for d, (lo, hi) in enumerate(self.ranges):
            t[lo:hi] = d + 1
        return t
