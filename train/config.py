"""One typed config tree for xdrec.

An experiment is a YAML file in ``configs/experiment/``. Its ``model`` and ``data`` sections may
name a preset (``model: tiny`` loads ``configs/model/tiny.yaml``) or give ``{preset: tiny, ...}``
to load a preset and override some of its keys. Dotted command-line overrides
(``model.n_layers=4``) are applied last. Every key is checked against the dataclasses below:
an unknown key or a value of the wrong type raises :class:`ConfigError` naming the key and the
file (or ``command line``) it came from, before any work starts.

Derived values live as methods (``TrainConfig.global_batch_size``), never as extra keys.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

STAGES = ("source", "joint", "target_only")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


@dataclass
class ModelConfig:
    """SASRec-style encoder over the mixed-domain item sequence."""

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
    # targets + sampled_negatives uniform items per domain, log-Q corrected (approximates full,
    # large vocabularies); "uniform": the target against sampled_negatives uniform items of its
    # domain only (what the sampled evaluation protocol measures; cheaper than full)
    loss: Literal["full", "sampled", "uniform"] = "full"
    sampled_negatives: int = 1024
    # full loss only: each target's softmax leaves out the other items of its training row (the
    # user's earlier and later items), which the sampled protocol never draws as negatives
    exclude_own_items: bool = False
    # a domain's loss: "target" = mean over its targets in the global batch; "row" = mean over
    # the rows (users) with targets in it of each row's own mean (every user weighs the same)
    loss_mean: Literal["target", "row"] = "target"
    # > 0: cosine scoring, cos(query, item) / temperature, in training and evaluation (query and
    # item vectors L2-normalised); 0: dot product
    temperature: float = 0.0
    # every score (training and evaluation) adds a learned per-item bias, zero at the start
    item_bias: bool = False
    # full loss only (not with exclude_own_items): share of the training target's mass spread
    # uniformly over its domain's items
    label_smoothing: float = 0.0
    # full loss only, > 0: a target of a domain in uniform_aux_domains ([] = every domain) adds this
    # weight times its CE against sampled_negatives uniform items of its domain (the ranking the
    # sampled protocol measures) to its full-softmax CE; 0 = off
    uniform_aux: float = 0.0
    uniform_aux_domains: list[str] = field(default_factory=list)
    # "mixed": one time-ordered sequence of every domain's events; "per_domain": a domain's rows
    # (training and evaluation) see that domain's events alone, parameters still shared
    # "dual": mixed inputs, and each domain's query adds the encoder's state over the row's
    # events of that domain alone (costs one more encoder pass per domain)
    sequence: Literal["mixed", "per_domain", "dual"] = "mixed"
    # dual only: the domains whose query adds the own-domain view (the others score from the
    # mixed sequence alone, one encoder pass fewer each); [] = every domain
    view_domains: list[str] = field(default_factory=list)
    # dual only: 0 = the views run through the shared encoder; N > 0 = each viewed domain has its
    # own encoder of N blocks for its view, so the shared encoder sees mixed sequences alone
    view_layers: int = 0
    # "next_item" (SASRec, needs causal: true) or "masked" (BERT4Rec-style cloze: bidirectional,
    # causal: false; a random mask_prob share of each row's label-domain items is predicted, at
    # least one; scoring appends a [MASK] after the history)
    objective: Literal["next_item", "masked"] = "next_item"
    mask_prob: float = 0.2


@dataclass
class SyntheticConfig:
    """Generator with planted cross-domain structure: a user's latent taste drives both domains."""

    n_users: int = 2000
    items_per_domain: list[int] = field(default_factory=lambda: [600, 600])
    n_tastes: int = 12
    events_per_domain: list[int] = field(default_factory=lambda: [16, 6])  # mean events a user has
    min_events_per_domain: int = 3
    taste_purity: float = 0.8  # probability an event follows the user's taste (else popularity)
    popularity: Literal["zipf", "uniform"] = "zipf"  # item draws: Zipf within and across clusters, or uniform
    seed: int = 0


@dataclass
class TableConfig:
    """Column mapping for interaction tables: CSV, TSV, Parquet, JSON lines (``.gz`` for text)."""

    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"  # unix seconds (int/float) or an ISO-8601 string
    domain: str = "domain"  # only read when data.path is one table of every domain
    rating: Optional[str] = None  # optional column, needed by data.filter.min_rating
    delimiter: Optional[str] = None  # None: ',' for .csv, tab for .tsv/.txt


@dataclass
class FilterConfig:
    """What ``xdrec prepare`` keeps, applied in this order; each step reports what it removed."""

    min_rating: Optional[float] = None  # keep events with rating >= this (needs a rating column)
    duplicates: Literal["keep", "first", "last"] = "keep"  # repeated (user, item): keep all, earliest, latest
    user_core: int = 0  # iterative k-core per domain: a user keeps its events in a domain only with
    item_core: int = 0  # >= user_core of them there; an item needs >= item_core events
    min_domains: int = 1  # 2: keep only users active in both domains (repeated with the k-core to a fixed point)
    last_n: int = 0  # keep each user's last N events (0: all)
    min_events: int = 3  # leave-one-out needs >= 3 events (train, valid, test)
    tie_break: Literal["input", "item"] = "input"  # order of equal timestamps: input order or item id


@dataclass
class DataConfig:
    """Where interactions come from and how they are prepared into shards."""

    name: str = "synthetic"
    format: Literal["synthetic", "abxi", "table", "amazon"] = "synthetic"
    # abxi: folder with *_preprocessed.txt and map_item_*.txt; table: one file (or glob) holding
    # every domain, told apart by the table.domain column
    path: str = ""
    # table / amazon: files (or globs) per domain, e.g. {Books: [reviews_Books_5.json.gz]}; the
    # amazon format is the review JSON lines (reviewerID, asin, unixReviewTime, overall)
    files: dict[str, list[str]] = field(default_factory=dict)
    domains: list[str] = field(default_factory=lambda: ["A", "B"])  # index order = domain id
    source: str = "A"
    target: str = "B"
    out_dir: str = "data/prepared"  # shards go to <out_dir>/<name>/
    shard_samples: int = 1000  # a shard closes at this many samples ...
    shard_bytes: int = 0  # ... or (if > 0) once it holds this many bytes
    # Stream shards from here instead of <out_dir>/<name>/ (the manifest stays local): a base URL
    # (https://host/x, file:///mnt/x) or a pattern with {path}, e.g. "pipe:aws s3 cp s3://b/x/{path} -"
    remote: str = ""
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt shard or sample: stop naming it, or skip and count
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    table: TableConfig = field(default_factory=TableConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)

    def prepared_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class StageConfig:
    """One training stage. ``epochs`` passes over the stage's driving stream."""

    epochs: int = 10
    lr: float = 1e-3
    source_weight: float = 1.0  # w_s in L = w_s * mean CE(source) + w_t * mean CE(target)
    target_weight: float = 1.0  # w_t
    patience: int = 3  # stop after this many evaluations without a better valid metric
    # after each evaluation without a better valid metric, multiply the LR by this (on top of the
    # warmup + cosine schedule) until the stage stops; 1.0: off
    plateau_decay: float = 1.0
    # rows per micro batch in this stage; 0: train.micro_batch_size
    micro_batch_size: int = 0


@dataclass
class TrainConfig:
    stages: list[str] = field(default_factory=lambda: ["target_only", "source", "joint"])
    micro_batch_size: int = 128
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU (stage >= 1)
    activation_checkpointing: bool = False  # recompute each Transformer block in backward
    deepspeed_config: Optional[str] = None  # extra DeepSpeed JSON, checked against the keys above
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 50
    mix_ratio: float = 0.5  # joint stage: fraction of each batch drawn from the source domain
    # a run folder (runs/<name>) whose finished source stage the joint stage starts from, instead
    # of a source stage of this run ("source" then stays out of train.stages); its model and data
    # config must match this one's
    init_from: str = ""
    shuffle_buffer: int = 2000
    num_workers: int = 0  # DataLoader worker processes decoding shards per rank (0: in the training process)
    resampled: bool = False  # infinite stream: shards drawn with replacement, an epoch = the nominal sample count
    source: StageConfig = field(default_factory=StageConfig)
    joint: StageConfig = field(default_factory=StageConfig)
    target_only: StageConfig = field(default_factory=StageConfig)
    log_every: int = 20
    checkpoint_every: int = 0  # steps between resume checkpoints; 0: at epoch ends only
    keep_checkpoints: int = 2  # resume checkpoints kept per stage (the newest; "best" is kept apart)
    # a non-finite loss or gradient norm: "stop" training naming the stage, step and batch, or
    # "skip" the batch (counted, logged) until more than max_nonfinite_skips were skipped in a stage
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10
    stop_after_steps: int = 0  # write a resume checkpoint and exit after this many steps (0: never)

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * world_size

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    def for_stage(self, name: str) -> "TrainConfig":
        """This config as stage ``name`` trains with: its own ``micro_batch_size`` where it sets one."""
        return replace(self, micro_batch_size=self.stage(name).micro_batch_size or self.micro_batch_size)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    num_negatives: int = 999  # ABXI protocol: same-domain negatives, user's items excluded
    batch_size: int = 512
    item_chunk: int = 65536  # items scored at a time in full ranking: memory batch_size x item_chunk, any vocabulary
    select_metric: str = "ndcg@10"  # on valid, under select_protocol, on the domains select_domains names
    select_protocol: Literal["full", "sampled999"] = "sampled999"
    # which valid domains pick a stage's best epoch: "stage" = its selection domain (joint and
    # target-only: the target; source: the source); "all" = the mean over every domain the stage
    # is evaluated on (joint: source and target, as ABXI selects on the sum of both domains)
    select_domains: Literal["stage", "all"] = "stage"
    seed: int = 2025  # negatives are a function of (seed, split, user): same for every model
    cold_start: list[int] = field(default_factory=lambda: [5, 10])  # buckets of target training events: 0, 1-5, 6-10, >10
    bootstrap: int = 1000  # paired bootstrap resamples over test users (source-then-joint vs target-only)
    # > 0: rank by score + prior * log(1 + n), n = the item's events observed before the split's
    # targets (every user's events but its last two for valid, but its last one for test), in
    # every domain; 0 = the model's scores alone. Epoch selection always ranks by the model's
    # scores, so the prior never changes what is trained or kept.
    prior: float = 0.0
    # > 0: also add transition * log(1 + n(j -> i)), n(j -> i) how often item i directly followed
    # item j in a user's events of the domain observed before the split's targets (same events as
    # the prior), j the user's last item of the domain; 0 = off. Like the prior, eval only.
    transition: float = 0.0


@dataclass
class TrackingConfig:
    wandb: bool = True
    project: str = "xdrec"
    entity: Optional[str] = None
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: WANDB_MODE, else auto


@dataclass
class ExperimentConfig:
    name: str = "demo"
    seed: int = 0
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def validate(self, origin: str = "config") -> None:
        """Cross-field checks that single-key typing cannot express."""
        d = self.data
        for key, dom in (("data.source", d.source), ("data.target", d.target)):
            if dom not in d.domains:
                raise ConfigError(f"{origin}: {key}={dom!r} is not one of data.domains {d.domains}")
        if d.source == d.target:
            raise ConfigError(f"{origin}: data.source and data.target are both {d.source!r}")
        if len(d.domains) != 2:
            raise ConfigError(f"{origin}: data.domains must name exactly 2 domains, got {d.domains}")
        for s in self.train.stages:
            if s not in STAGES:
                raise ConfigError(f"{origin}: train.stages has {s!r}; known stages: {list(STAGES)}")
        for s in STAGES:
            if not 0.0 < self.train.stage(s).plateau_decay <= 1.0:
                raise ConfigError(f"{origin}: train.{s}.plateau_decay must be in (0, 1], got "
                                  f"{self.train.stage(s).plateau_decay}")
            if self.train.stage(s).micro_batch_size < 0:
                raise ConfigError(f"{origin}: train.{s}.micro_batch_size must be >= 0 (0: train.micro_batch_size), "
                                  f"got {self.train.stage(s).micro_batch_size}")
        stages, init = self.train.stages, self.train.init_from
        if "joint" in stages and "source" not in stages and not init:
            raise ConfigError(f"{origin}: train.stages has 'joint' without 'source' (joint starts from it; "
                              "train.init_from names another run's source stage instead)")
        if init and ("source" in stages or "joint" not in stages):
            raise ConfigError(f"{origin}: train.init_from={init!r} starts the joint stage from that run's source "
                              f"stage, so train.stages must hold 'joint' and not 'source', got {stages}")
        if not 0.0 < self.train.mix_ratio < 1.0:
            raise ConfigError(f"{origin}: train.mix_ratio must be in (0, 1), got {self.train.mix_ratio}")
        if self.model.causal != (self.model.objective == "next_item"):
            raise ConfigError(f"{origin}: model.objective={self.model.objective!r} needs model.causal="
                              f"{self.model.objective == 'next_item'} (a bidirectional encoder would see the next "
                              "item it is asked for; the cloze objective needs both directions)")
        if self.model.sequence == "dual" and self.model.objective != "next_item":
            raise ConfigError(f"{origin}: model.sequence=dual needs model.objective=next_item")
        if self.model.exclude_own_items and self.model.loss != "full":
            raise ConfigError(f"{origin}: model.exclude_own_items needs model.loss=full, got {self.model.loss!r}")
        if self.model.temperature < 0:
            raise ConfigError(f"{origin}: model.temperature must be >= 0 (0 = dot product), got {self.model.temperature}")
        if not 0 <= self.model.label_smoothing < 1:
            raise ConfigError(f"{origin}: model.label_smoothing must be in [0, 1), got {self.model.label_smoothing}")
        if self.model.label_smoothing and (self.model.loss != "full" or self.model.exclude_own_items):
            raise ConfigError(f"{origin}: model.label_smoothing needs model.loss=full without model.exclude_own_items")
        if self.model.uniform_aux < 0:
            raise ConfigError(f"{origin}: model.uniform_aux must be >= 0, got {self.model.uniform_aux}")
        if self.model.uniform_aux and self.model.loss != "full":
            raise ConfigError(f"{origin}: model.uniform_aux={self.model.uniform_aux} needs model.loss=full, "
                              f"got {self.model.loss!r}")
        if self.model.uniform_aux and self.model.sampled_negatives < 1:
            raise ConfigError(f"{origin}: model.uniform_aux needs model.sampled_negatives >= 1, "
                              f"got {self.model.sampled_negatives}")
        if self.model.view_domains and self.model.sequence != "dual":
            raise ConfigError(f"{origin}: model.view_domains={self.model.view_domains} needs model.sequence=dual, "
                              f"got {self.model.sequence!r}")
        if self.model.view_layers < 0:
            raise ConfigError(f"{origin}: model.view_layers must be >= 0, got {self.model.view_layers}")
        if self.model.view_layers and self.model.sequence != "dual":
            raise ConfigError(f"{origin}: model.view_layers={self.model.view_layers} needs model.sequence=dual, "
                              f"got {self.model.sequence!r}")
        for key in ("view_domains", "uniform_aux_domains"):
            for dom in getattr(self.model, key):
                if dom not in d.domains:
                    raise ConfigError(f"{origin}: model.{key}: {dom!r} is not one of data.domains {d.domains}")
        if self.model.loss != "full" and self.model.sampled_negatives < 1:
            raise ConfigError(f"{origin}: model.loss={self.model.loss} needs model.sampled_negatives >= 1, "
                              f"got {self.model.sampled_negatives}")
        if not 0.0 < self.model.mask_prob <= 1.0:
            raise ConfigError(f"{origin}: model.mask_prob must be in (0, 1], got {self.model.mask_prob}")
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(f"{origin}: model.d_model={self.model.d_model} is not divisible by "
                              f"model.n_heads={self.model.n_heads}")
        if self.eval.prior < 0:
            raise ConfigError(f"{origin}: eval.prior must be >= 0 (0 = the model's scores alone), got {self.eval.prior}")
        if self.eval.transition < 0:
            raise ConfigError(f"{origin}: eval.transition must be >= 0 (0 = off), got {self.eval.transition}")
        if self.eval.item_chunk < 1:
            raise ConfigError(f"{origin}: eval.item_chunk must be >= 1, got {self.eval.item_chunk}")
        if self.eval.select_metric.split("@")[0] not in ("hr", "ndcg", "mrr"):
            raise ConfigError(f"{origin}: eval.select_metric={self.eval.select_metric!r} is not hr@k, ndcg@k or mrr")
        if self.train.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{origin}: train.zero_stage must be 0, 1, 2 or 3, got {self.train.zero_stage}")
        if self.train.offload_optimizer and self.train.zero_stage == 0:
            raise ConfigError(f"{origin}: train.offload_optimizer needs train.zero_stage >= 1")
        if d.format == "abxi" and not d.path:
            raise ConfigError(f"{origin}: data.path is empty but data.format='abxi' reads a folder")
        if d.format == "table" and not (d.path or d.files):
            raise ConfigError(f"{origin}: data.format='table' needs data.path (one table with a domain column) "
                              "or data.files (files per domain)")
        if d.format == "amazon" and not d.files:
            raise ConfigError(f"{origin}: data.format='amazon' needs data.files: one review file (or more) per domain")
        for dom in d.files:
            if dom not in d.domains:
                raise ConfigError(f"{origin}: data.files.{dom}: {dom!r} is not one of data.domains {d.domains}")
        f = d.filter
        if f.min_events < 3:
            raise ConfigError(f"{origin}: data.filter.min_events={f.min_events}; leave-one-out needs >= 3")
        if f.last_n and f.last_n < f.min_events:
            raise ConfigError(f"{origin}: data.filter.last_n={f.last_n} is below data.filter.min_events={f.min_events}")
        if f.min_domains > len(d.domains) or f.min_domains < 1:
            raise ConfigError(f"{origin}: data.filter.min_domains={f.min_domains} must be 1..{len(d.domains)}")
        if f.min_rating is not None and (d.format in ("abxi", "synthetic") or (d.format == "table" and not d.table.rating)):
            raise ConfigError(f"{origin}: data.filter.min_rating needs ratings: data.format 'amazon', or 'table' "
                              "with data.table.rating (the rating column)")
        if d.shard_samples < 1 or d.shard_bytes < 0:
            raise ConfigError(f"{origin}: data.shard_samples must be >= 1 and data.shard_bytes >= 0")
        if self.train.num_workers < 0:
            raise ConfigError(f"{origin}: train.num_workers must be >= 0")
        if self.train.keep_checkpoints < 1 or self.train.max_nonfinite_skips < 0:
            raise ConfigError(f"{origin}: train.keep_checkpoints must be >= 1 and train.max_nonfinite_skips >= 0")


# ----------------------------------------------------------------------------------------------
# Typed construction from plain dicts


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    o = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{origin}: key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if o in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, origin)
            except ConfigError:
                pass
        raise bad
    if o is Literal:
        if value in args:
            return value
        raise ConfigError(f"{origin}: key '{key}' must be one of {list(args)}, got {value!r}")
    if o is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if o is dict:
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, args[0], key, origin): _coerce(v, args[1], f"{key}.{k}", origin)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, origin, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e6 as a string
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{origin}: key '{key}' has unsupported type {tp}")  # pragma: no cover


def build(cls: type, data: dict, origin: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{origin}: unknown config key '{full}' (known under "
                              f"'{prefix or '<top>'}': {sorted(names)})")
        kwargs[k] = _coerce(v, hints[k], full, origin)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Loading: YAML files, presets, dotted overrides

_PRESET_SECTIONS = ("model", "data")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def flatten(d: dict, *, sep: str, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a<sep>b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        out.update(flatten(v, sep=sep, prefix=key) if isinstance(v, dict) else {key: v})
    return out


def _configs_root(path: Path) -> Path:
    """``configs/`` for a file at ``configs/<section>/<x>.yaml``."""
    return path.resolve().parent.parent


def _resolve_presets(raw: dict, path: Path) -> dict:
    """Replace ``model: tiny`` / ``model: {preset: tiny, ...}`` with the preset's keys.

    Returns (merged dict). Errors in a preset name the preset's own file.
    """
    out = dict(raw)
    for section in _PRESET_SECTIONS:
        val = raw.get(section)
        preset = None
        overrides: dict = {}
        if isinstance(val, str):
            preset = val
        elif isinstance(val, dict) and "preset" in val:
            overrides = {k: v for k, v in val.items() if k != "preset"}
            preset = val["preset"]
        if preset is None:
            continue
        ppath = _configs_root(path) / section / f"{preset}.yaml"
        if not ppath.exists():
            raise ConfigError(f"{path}: key '{section}' names preset {preset!r} but {ppath} does not exist")
        pdata = _read_yaml(ppath)
        # Check the preset on its own so an error names the preset file.
        build(ExperimentConfig, {section: pdata}, str(ppath))
        out[section] = deep_merge(pdata, overrides)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form a.b=value")
    key, _, val = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"command line: override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(val) if val.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override {text!r}: value is not valid YAML: {e}") from None
    return key.split("."), value


def _set_dotted(d: dict, parts: list[str], value: Any) -> None:
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or the built-in defaults when ``path`` is None) plus overrides."""
    raw: dict = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        raw = _resolve_presets(_read_yaml(path), path)
    cfg = build(ExperimentConfig, raw, origin)
    cfg.validate(origin)
    if overrides:
        ov: dict = {}
        for text in overrides:
            parts, value = parse_override(text)
            _set_dotted(ov, parts, value)
        merged = deep_merge(to_dict(cfg), ov)
        cfg = build(ExperimentConfig, merged, "command line")
        cfg.validate("command line")
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with :func:`load_config`) and JSON."""
    from train.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
