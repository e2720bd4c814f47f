"""One typed config tree for xdrec.

An experiment is a YAML file. Its ``model`` and ``data`` sections may name a preset
(``model: tiny`` loads ``model/tiny.yaml`` from the experiment's own config tree, else from the
project's ``configs/``), or give ``{preset: tiny, ...}`` to load a preset and override some of its
keys; on the command line ``model=tiny`` selects one too. Dotted command-line overrides
(``model.n_layers=4``) are applied last.

The tree is plain dataclasses; ``ModelConfig`` lives with the model (``model.config``). Types,
unknown keys and single-field ranges are checked by pydantic (v2, the version DeepSpeed already
brings) against a strict mirror of each dataclass: an int is an int (not a bool, not "3"), a float
may be written ``1e6``; ranges are declared beside their fields (``Annotated[int, Field(ge=0)]``).
Cross-field invariants are each section's ``check()``, run when the tree is loaded
(``ModelConfig`` checks itself on construction). Every error is one
:class:`ConfigError` naming the key and the file (or ``command line``) it came from, before any
work starts. Derived values live as methods (``TrainConfig.global_batch_size``), never as keys.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from model.config import ModelConfig

StageName = Literal["target_only", "source", "joint"]
STAGES: tuple[str, ...] = typing.get_args(StageName)  # the one list of stage names, in run order


def baseline_of(units, domain: str) -> str | None:
    """Among recorded ``units``, the target-only baseline of ``domain``: ``target_only-<domain>``
    (several targets) or ``target_only`` (one); None when there is none."""
    units = set(units)
    return next((u for u in (f"target_only-{domain}", "target_only") if u in units), None)


def unit_stage(unit: str) -> str:
    """The stage of a run's unit: a stage's name, or ``target_only-<domain>``, the target-only
    baseline of one of several target domains (:meth:`ExperimentConfig.units`)."""
    return unit.split("-", 1)[0]
REPORTED_KS = (10,)  # the k of the tables, the transfer interval and the plots (HR@10, NDCG@10)
Metric = Annotated[str, Field(pattern=r"^(hr@\d+|ndcg@\d+|mrr)$", description="hr@k, ndcg@k or mrr")]
# A name xdrec turns into a folder (run, prepared data, domain): one path component, never '', '.',
# '..', absolute or with a separator, so no name reaches outside the folder it is meant for.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=200, description="one path component: a letter or "
                            "digit, then letters, digits, '.', '_' or '-' (at most 200)")]
__all__ = ["ModelConfig", "ExperimentConfig", "ConfigError", "load_config", "save_config", "STAGES"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


def _at_least(bound, note: str = "") -> Any:
    return Field(ge=bound, description=f">= {bound}{note}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class SyntheticConfig:
    """Generator with planted cross-domain structure: a user's latent taste drives both domains."""

    n_users: Annotated[int, _at_least(1)] = 2000
    items_per_domain: list[int] = field(default_factory=lambda: [600, 600])
    n_tastes: Annotated[int, _at_least(1)] = 12
    events_per_domain: list[int] = field(default_factory=lambda: [16, 6])  # mean events a user has
    min_events_per_domain: Annotated[int, _at_least(1)] = 3
    taste_purity: Annotated[float, Field(ge=0, le=1, description="in [0, 1]")] = 0.8  # else a popularity draw
    popularity: Literal["zipf", "uniform"] = "zipf"  # item draws: Zipf within and across clusters, or uniform
    seed: int = 0

    def check(self) -> None:
        for key in ("items_per_domain", "events_per_domain"):
            bad = [v for v in getattr(self, key) if v < 1]
            _check(not bad, f"{key}={getattr(self, key)}: every domain needs >= 1, got {bad[0] if bad else ''}")


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
    user_core: Annotated[int, _at_least(0)] = 0  # iterative k-core per domain: a user keeps its events in a
    item_core: Annotated[int, _at_least(0)] = 0  # domain only with >= user_core there; an item >= item_core
    min_domains: Annotated[int, _at_least(1)] = 1  # 2: only users active in both domains (with the k-core)
    last_n: Annotated[int, _at_least(0)] = 0  # keep each user's last N events (0: all)
    min_events: int = 3  # leave-one-out needs >= 3 events (train, valid, test)
    tie_break: Literal["input", "item"] = "input"  # order of equal timestamps: input order or item id

    def check(self) -> None:
        _check(self.min_events >= 3, f"min_events={self.min_events}; leave-one-out needs >= 3")
        _check(not self.last_n or self.last_n >= self.min_events,
               f"last_n={self.last_n} is below min_events={self.min_events}")


@dataclass
class DataConfig:
    """Where interactions come from and how they are prepared into shards."""

    name: Name = "synthetic"
    format: Literal["synthetic", "abxi", "table", "amazon"] = "synthetic"
    # abxi: folder with *_preprocessed.txt and map_item_*.txt; table: one file (or glob) holding
    # every domain, told apart by the table.domain column
    path: str = ""
    # table / amazon: files (or globs) per domain, e.g. {Books: [reviews_Books_5.json.gz]}; the
    # amazon format is the review JSON lines (reviewerID, asin, unixReviewTime, overall)
    files: dict[str, list[str]] = field(default_factory=dict)
    domains: list[Name] = field(default_factory=lambda: ["A", "B"])  # any number >= 2; index order = domain id
    # the source stage pretrains on every source; a target is scored by the joint model against
    # its own target-only baseline. source: a domain or a list; target: a domain, a list, or "all"
    # (one joint model, every domain a target; sources are then targets too)
    source: Union[str, list[str]] = "A"
    target: Union[str, list[str]] = "B"
    out_dir: str = "data/prepared"  # shards go to <out_dir>/<name>/
    shard_samples: Annotated[int, _at_least(1)] = 1000  # a shard closes at this many samples ...
    shard_bytes: Annotated[int, _at_least(0)] = 0  # ... or (if > 0) once it holds this many bytes
    # Stream shards from here instead of <out_dir>/<name>/ (the manifest stays local): a base URL
    # (https://host/x, file:///mnt/x) or a pattern with {path}, e.g. "pipe:aws s3 cp s3://b/x/{path} -"
    remote: str = ""
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt shard or sample: stop naming it, or skip and count
    # < 1: keep this share of the users with target-domain training events (chosen by
    # target_fraction_seed); the others' target-domain events leave the training data (their
    # valid/test samples stay as they are): how the transfer grows as target data shrinks.
    # Prepared into <out_dir>/<name>-<target><percent>/ beside the full data.
    target_fraction: Annotated[float, Field(gt=0, le=1, description="in (0, 1]")] = 1.0
    target_fraction_seed: int = 0
    # how each user's sequence is cut (train/data/split.py): leave_one_out (the ABXI protocol) or
    # temporal: every user cut at the same two times, split_times (the data's time unit) or else
    # split_quantiles of the kept events' times; prepared into <out_dir>/<name>-temporal/
    split: Literal["leave_one_out", "temporal"] = "leave_one_out"
    split_quantiles: list[float] = field(default_factory=lambda: [0.9, 0.95])
    split_times: list[float] = field(default_factory=list)
    # who prepares: local (this process) or ray (Ray Data operations: a local Ray sized to this
    # machine, or the cluster at ray_address); both give the same samples (manifest samples_sha256)
    engine: Literal["local", "ray"] = "local"
    ray_address: str = ""  # ray: "auto" (a running `ray start`), host:6379 or ray://host:10001
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    table: TableConfig = field(default_factory=TableConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)

    def sources(self) -> list[str]:
        """The source domains, in the order given."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    def targets(self) -> list[str]:
        """The target domains, in the order given (``all``: every domain, in id order)."""
        if self.target == "all":
            return list(self.domains)
        return [self.target] if isinstance(self.target, str) else list(self.target)

    def check(self) -> None:
        _check(len(self.domains) >= 2, f"domains must name at least 2 domains, got {self.domains}")
        _check(len(set(self.domains)) == len(self.domains), f"domains names a domain twice: {self.domains}")
        for key, doms in (("source", self.sources()), ("target", self.targets())):
            _check(bool(doms), f"{key} names no domain")
            _check(len(set(doms)) == len(doms), f"{key} names a domain twice: {doms}")
            for dom in doms:
                _check(dom in self.domains, f"{key}={dom!r} is not one of data.domains {self.domains}")
        both = sorted(set(self.sources()) & set(self.targets()))
        _check(self.target == "all" or not both, f"source and data.target are both {both[0] if both else ''!r} "
               "(a domain is a source or a target; data.target=all makes every domain a target)")
        if self.format == "synthetic":
            for key in ("items_per_domain", "events_per_domain"):
                n = len(getattr(self.synthetic, key))
                _check(n == len(self.domains), f"synthetic.{key} has {n} entries for {len(self.domains)} domains")
        q, t = self.split_quantiles, self.split_times
        _check(len(q) == 2 and 0 < q[0] < q[1] < 1, f"split_quantiles={q}: two increasing quantiles in (0, 1) "
               "(the valid cut, then the test cut)")
        _check(not t or (len(t) == 2 and t[0] < t[1]), f"split_times={t}: two increasing times (valid cut, test cut)")
        _check(self.engine != "ray" or importlib.util.find_spec("ray") is not None,
               "engine='ray' needs Ray Data, which is not installed: pip install 'xdrec[ray]' (or ray[data])")
        _check(self.format != "abxi" or self.path, "path is empty but data.format='abxi' reads a folder")
        _check(self.format != "table" or self.path or self.files, "format='table' needs data.path (one table with a "
               "domain column) or data.files (files per domain)")
        _check(self.format != "amazon" or self.files, "format='amazon' needs data.files: one review file (or more) per domain")
        for dom in self.files:
            _check(dom in self.domains, f"files.{dom}: {dom!r} is not one of data.domains {self.domains}")
        _check(self.filter.min_domains <= len(self.domains),
               f"filter.min_domains={self.filter.min_domains} must be 1..{len(self.domains)}")
        _check(self.target_fraction == 1 or (self.target != "all" and len(self.targets()) == 1),
               f"target_fraction={self.target_fraction} shrinks one target domain; data.target names {self.targets()}")
        _check(self.filter.min_rating is None or self.format == "amazon" or (self.format == "table" and self.table.rating),
               "filter.min_rating needs ratings: data.format 'amazon', or 'table' with data.table.rating (the rating column)")

    def prepared_dir(self) -> Path:
        """``<out_dir>/<name>``, ``-temporal`` added with the temporal split, then
        ``-<target><percent>`` with a target_fraction < 1."""
        name = self.name + ("-temporal" if self.split == "temporal" else "")
        if self.target_fraction < 1:
            pct = f"{self.target_fraction * 100:g}".replace(".", "p")
            return Path(self.out_dir) / f"{name}-{self.targets()[0]}{pct}"
        return Path(self.out_dir) / name


@dataclass
class StageConfig:
    """One training stage: at most ``epochs`` passes over the stage's driving stream; early stopping
    (``patience``) ends it, so the default cap is one a stage rarely reaches."""

    epochs: Annotated[int, _at_least(1)] = 100
    lr: Annotated[float, Field(gt=0, description="> 0")] = 1e-3
    source_weight: float = 1.0  # w_s in L = w_s * mean CE(source) + w_t * mean CE(target)
    target_weight: float = 1.0  # w_t
    patience: Annotated[int, _at_least(1)] = 3  # stop after this many evaluations without a better valid metric
    # patience stops the stage only once this many epochs have run (a model leaving its first,
    # popularity-like phase can dip on valid before it learns the sequences); 0: from the first
    min_epochs: Annotated[int, _at_least(0)] = 0
    # after each evaluation without a better valid metric, multiply the LR by this (on top of the
    # warmup + cosine schedule) until the stage stops; 1.0: off
    plateau_decay: Annotated[float, Field(gt=0, le=1, description="in (0, 1]")] = 1.0
    # rows per micro batch in this stage; 0: train.micro_batch_size
    micro_batch_size: Annotated[int, _at_least(0, " (0: train.micro_batch_size)")] = 0
    # w_d of named domains, over source_weight / target_weight (L = sum_d w_d * mean CE(d))
    domain_weights: dict[str, float] = field(default_factory=dict)
    # joint only, > 0: knowledge distillation from each target's target-only model (of this run or
    # of train.init_from): a target-domain target after an event of that domain in its row trains
    # on (1 - distill) x CE(target) + distill x CE(the target-only model's next-item distribution,
    # given the row's events of that domain alone); 0: off
    distill: Annotated[float, Field(ge=0, le=1, description="in [0, 1]")] = 0.0
    # the teacher's distribution is the softmax of its scores / this (< 1: sharper, > 1: flatter)
    distill_temperature: Annotated[float, Field(gt=0, description="> 0")] = 1.0


@dataclass
class TrainConfig:
    stages: list[StageName] = field(default_factory=lambda: list(STAGES))
    micro_batch_size: Annotated[int, _at_least(1)] = 128
    grad_accum: Annotated[int, _at_least(1)] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # "bf16" (precision fp32 only): the training forward runs under torch.autocast in bfloat16
    # (DeepSpeed's torch_autocast; fp32 weights, optimizer and loss reduction); scores rank in fp32
    autocast: Literal["off", "bf16"] = "off"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU (stage >= 1)
    activation_checkpointing: bool = False  # recompute each Transformer block in backward
    deepspeed_config: Optional[str] = None  # extra DeepSpeed JSON, checked against the keys above
    weight_decay: Annotated[float, _at_least(0)] = 0.0  # AdamW's, on linear layers' weight matrices only
    grad_clip: Annotated[float, _at_least(0)] = 1.0
    warmup_steps: Annotated[int, _at_least(0)] = 50
    mix_ratio: Annotated[float, Field(gt=0, lt=1, description="in (0, 1)")] = 0.5  # joint: the source's share of a batch
    # a run folder (runs/<name>) whose finished source stage the joint stage starts from, instead
    # of a source stage of this run ("source" then stays out of train.stages)
    init_from: str = ""
    shuffle_buffer: Annotated[int, _at_least(0)] = 2000
    num_workers: Annotated[int, _at_least(0)] = 0  # DataLoader worker processes per rank (0: in the training process)
    resampled: bool = False  # infinite stream: shards drawn with replacement, an epoch = the nominal sample count
    # > 0: batches of like sequence length, each trimmed of its padding columns: every run of
    # length_buckets x micro batch samples is sorted by length, cut into batches, and the batches
    # shuffled; 0: every batch padded to model.max_len
    length_buckets: Annotated[int, _at_least(0)] = 0
    # false: a training row's latest event is never a target (it stays an input), so the valid
    # target's latest input is, as the test target's (the held-out valid event), an event the model
    # never learned to predict for that user; true: every event after a row's first is a target
    latest_target: bool = True
    source: StageConfig = field(default_factory=StageConfig)
    joint: StageConfig = field(default_factory=StageConfig)
    target_only: StageConfig = field(default_factory=StageConfig)
    log_every: Annotated[int, _at_least(1)] = 20  # also when the stop signal and the finite check are settled
    checkpoint_every: Annotated[int, _at_least(0)] = 0  # steps between resume checkpoints; 0: at epoch ends only
    keep_checkpoints: Annotated[int, _at_least(1)] = 2  # resume checkpoints kept per stage ("best" apart)
    # a non-finite loss or gradient norm: "stop" training naming the stage, step and batch, or
    # "skip" the batch (counted, logged) until more than max_nonfinite_skips were skipped in a stage
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: Annotated[int, _at_least(0)] = 10
    stop_after_steps: Annotated[int, _at_least(0)] = 0  # write a resume checkpoint and exit after this many steps

    def check(self) -> None:
        _check(bool(self.stages), "stages is empty: name at least one of " + ", ".join(STAGES))
        _check(len(set(self.stages)) == len(self.stages), f"stages names a stage twice: {self.stages}")
        _check("joint" not in self.stages or "source" in self.stages or self.init_from,
               "stages has 'joint' without 'source' (joint starts from it; train.init_from names another run's "
               "source stage instead)")
        _check(not self.init_from or ("source" not in self.stages and "joint" in self.stages),
               f"init_from={self.init_from!r} starts the joint stage from that run's source stage, so train.stages "
               f"must hold 'joint' and not 'source', got {self.stages}")
        for stage in ("source", "target_only"):
            _check(not self.stage(stage).distill, f"{stage}.distill={self.stage(stage).distill}: only the joint stage "
                                                   "distils (from the target-only model)")
        _check(not self.joint.distill or "target_only" in self.stages or self.init_from,
               f"joint.distill={self.joint.distill} learns from the target-only model, so train.stages must hold "
               f"'target_only' or train.init_from name a run that trained it, got stages {self.stages}")
        _check(not self.offload_optimizer or self.zero_stage > 0, "offload_optimizer needs train.zero_stage >= 1")
        _check(self.autocast == "off" or self.precision == "fp32",
               f"autocast={self.autocast} needs train.precision=fp32 (the weights stay fp32), got {self.precision}")

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
    num_negatives: Annotated[int, _at_least(1)] = 999  # ABXI protocol: same-domain negatives, user's items excluded
    batch_size: Annotated[int, _at_least(1)] = 512
    item_chunk: Annotated[int, _at_least(1)] = 65536  # items scored at a time in full ranking (memory batch x chunk)
    select_metric: Metric = "ndcg@10"  # on valid, under select_protocol, on the domains select_domains names
    select_protocol: Literal["full", "sampled999"] = "full"
    # which valid domains pick a stage's best epoch: "stage" = its selection domain (joint and
    # target-only: the target; source: the source); "all" = the mean over every domain the stage
    # is evaluated on (joint: source and target, as ABXI selects on the sum of both domains)
    select_domains: Literal["stage", "all"] = "stage"
    seed: int = 2025  # negatives are a function of (seed, split, user): same for every model
    cold_start: list[int] = field(default_factory=lambda: [5, 10])  # buckets of target training events: 0, 1-5, 6-10, >10
    bootstrap: Annotated[int, _at_least(1)] = 1000  # paired bootstrap resamples over test users
    # > 0: rank by score + prior * log(1 + n), n the item's events observed before the split's
    # targets; evaluation only (epoch selection ranks by the model's scores)
    prior: Annotated[float, _at_least(0, " (0 = the model's scores alone)")] = 0.0
    # > 0: also add transition * log(1 + n(last -> item)), the first-order transitions observed
    # before the split's targets; evaluation only
    transition: Annotated[float, _at_least(0, " (0 = off)")] = 0.0
    # full ranking leaves the user's own history items out of the candidates (as HSTU reports;
    # the sampled protocol never draws them); the held-out item itself always stays in
    exclude_history: bool = True

    def check(self) -> None:
        bad = [k for k in self.ks if k < 1]
        _check(not bad, f"ks={self.ks}: every k must be >= 1, got {bad[0] if bad else ''}")
        need = sorted(set(REPORTED_KS) | ({int(self.select_metric.split("@")[1])} if "@" in self.select_metric else set()))
        missing = [k for k in need if k not in self.ks]
        _check(not missing, f"ks={self.ks} lacks {missing}: the result tables and the transfer use @10"
                            f" and eval.select_metric={self.select_metric} selects epochs by it; add {missing}")
        edges = self.cold_start
        _check(all(e >= 1 for e in edges) and all(a < b for a, b in zip(edges, edges[1:])),
               f"cold_start={edges}: bucket edges must be >= 1 and increasing, e.g. [5, 10]")


@dataclass
class TrackingConfig:
    wandb: bool = True
    project: str = "xdrec"
    entity: Optional[str] = None
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: WANDB_MODE, else auto
    group: Optional[str] = None  # W&B group; None: the run name without its -seed<k> suffix (seeds together)


@dataclass
class ExperimentConfig:
    name: Name = "demo"
    seed: int = 0
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """The checks across sections (each section checks itself)."""
        for stage in STAGES:
            for dom in self.train.stage(stage).domain_weights:
                _check(dom in self.data.domains, f"train.{stage}.domain_weights: {dom!r} is not one of data.domains "
                                                 f"{self.data.domains}")
        for key in ("view_domains", "uniform_aux_domains"):
            for dom in getattr(self.model, key):
                _check(dom in self.data.domains, f"model.{key}: {dom!r} is not one of data.domains {self.data.domains}")
        m = self.model
        _check(not self.train.joint.distill or (m.loss == "full" and not m.exclude_own_items and m.objective == "next_item"),
               f"train.joint.distill={self.train.joint.distill} needs model.loss=full without exclude_own_items and "
               f"model.objective=next_item, got loss={m.loss!r}, exclude_own_items={m.exclude_own_items}, "
               f"objective={m.objective!r}")

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def baseline_unit(self, target: str) -> str:
        """The target-only unit of ``target``: ``target_only``, or ``target_only-<domain>`` when
        there are several targets (each its own model, checkpoints and record)."""
        return "target_only" if len(self.data.targets()) == 1 else f"target_only-{target}"

    def units(self) -> list[str]:
        """What the run trains, in order: each listed stage in ``STAGES`` order, the target-only
        baseline once per target domain. Units name the run's folders, records and W&B prefixes."""
        out = []
        for stage in (s for s in STAGES if s in self.train.stages):
            out += [self.baseline_unit(t) for t in self.data.targets()] if stage == "target_only" else [stage]
        return out


# ----------------------------------------------------------------------------------------------
# Validation: a strict pydantic mirror of each dataclass


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(v: Any) -> Any:
    """A float setting may be an int or a numeral string (YAML 1.1 reads ``1e6`` as a string)."""
    if isinstance(v, str) and _FLOAT.fullmatch(v.strip()):
        return float(v)
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


_SCALARS = {int: Annotated[int, Strict()], bool: Annotated[bool, Strict()], str: Annotated[str, Strict()],
            float: Annotated[float, BeforeValidator(_number), Strict(), Field(allow_inf_nan=False)]}
_MIRROR_CONFIG = ConfigDict(extra="forbid")


def _strict(tp: Any) -> Any:
    """``tp`` with strict scalars and mirrored dataclasses, constraints kept."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if dataclasses.is_dataclass(tp):
        return _mirror(tp)
    if origin is Annotated:
        return Annotated[(_strict(args[0]), *tp.__metadata__)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict(a) for a in args)]
    if origin is list:
        return list[_strict(args[0])]
    if origin is dict:
        return dict[_strict(args[0]), _strict(args[1])]
    return tp  # Literal, None


@functools.cache
def _mirror(cls: type) -> type:
    """A pydantic dataclass with ``cls``'s fields (types made strict, no ``__post_init__``)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(f.name, _strict(hints[f.name]), field(default=None)) for f in dataclasses.fields(cls)]
    return pydantic_dataclass(dataclasses.make_dataclass(f"{cls.__name__}Input", fields), config=_MIRROR_CONFIG)


def _real(cls: type, given: dict, checked: Any, path: str) -> Any:
    """``cls`` from the keys ``given`` with their ``checked`` values (the rest keep their defaults),
    nested sections first; a section's invariant error names its path."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in given.items():
        val = getattr(checked, k)
        kwargs[k] = _real(hints[k], v, val, f"{path}{k}.") if dataclasses.is_dataclass(hints[k]) else val
    try:
        obj = cls(**kwargs)  # ModelConfig checks itself here (model.config)
        if hasattr(obj, "check"):
            obj.check()
        return obj
    except ValueError as e:
        raise _Invariant(f"{path}{e}") from None


class _Invariant(ValueError):
    pass


def build(cls: type, data: dict, origin: str) -> Any:
    """Build dataclass ``cls`` from ``data``: types, unknown keys and ranges by pydantic, then the
    sections' invariants; every error one ConfigError naming the key and ``origin``."""
    try:
        checked = TypeAdapter(_mirror(cls)).validate_python(data)
    except ValidationError as e:
        raise ConfigError(_explain(e.errors()[0], cls, origin)) from None
    try:
        return _real(cls, data, checked, "")
    except _Invariant as e:
        raise ConfigError(f"{origin}: {e}") from None


def _explain(err: dict, cls: type, origin: str) -> str:
    """One pydantic error as xdrec says it: the dotted key, what it expects, what it got."""
    loc = [str(x) for x in err["loc"] if not re.search(r"[\[\(\]]|^function-", str(x))]
    key, got, kind = ".".join(loc), err.get("input"), err["type"]
    owner, name = _field(cls, loc)
    hint = typing.get_type_hints(owner, include_extras=True).get(name) if name else None
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = ".".join(loc[:-1])
        return f"{origin}: unknown config key '{key}' (known under '{parent or '<top>'}': " \
               f"{sorted(f.name for f in dataclasses.fields(owner))})"
    if kind == "literal_error":
        return f"{origin}: key '{key}' must be one of {list(_literal_values(hint))}, got {got!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_pattern_mismatch"):
        desc = _description(hint) or str(err.get("ctx"))
        return f"{origin}: {key} must be {desc}, got {got!r}"
    expected = _type_name(hint, element=loc[-1] != name)
    return f"{origin}: key '{key}' expects {expected}, got {got!r} ({type(got).__name__})"


def _description(tp: Any) -> str | None:
    """The ``description`` declared on a field's type or, for a list or dict, on its elements'."""
    while tp is not None:
        found = next((m.description for m in getattr(tp, "__metadata__", ()) if getattr(m, "description", None)), None)
        if found:
            return found
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        tp = args[0] if origin is Annotated else args[-1] if origin in (list, dict) and args else None
    return None


def _field(cls: type, loc: list[str]) -> tuple[type, str | None]:
    """(the dataclass holding the deepest field ``loc`` names, that field's name)."""
    owner, name = cls, None
    for part in loc:
        hints = typing.get_type_hints(owner)
        if part not in hints:
            break
        if dataclasses.is_dataclass(hints[part]):
            owner, name = hints[part], None
        else:
            name = part
    return owner, name


def _literal_values(tp: Any) -> tuple:
    while typing.get_origin(tp) in (Annotated, Union, types.UnionType, list):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp)


def _type_name(tp: Any, element: bool) -> str:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if element and typing.get_origin(tp) in (list, dict):
        tp = typing.get_args(tp)[-1]
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Loading: YAML files, presets, dotted overrides

_PRESET_SECTIONS = ("model", "data")
PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file (give configs/experiment/<x>.yaml)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); a config is a YAML text file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
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
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict, *, sep: str, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a<sep>b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        out.update(flatten(v, sep=sep, prefix=key) if isinstance(v, dict) else {key: v})
    return out


def preset_roots(path: Path | None) -> list[Path]:
    """Where presets are looked up: the experiment's own config tree (``<configs>/experiment/x.yaml``
    -> ``<configs>``), then the project's ``configs/``."""
    roots = [path.resolve().parent.parent] if path is not None else []
    return roots + [PROJECT_CONFIGS] if PROJECT_CONFIGS not in roots else roots


def _preset(section: str, name: str, where: str, roots: list[Path]) -> dict:
    """A preset's keys (checked on their own, so an error names the preset's file)."""
    for root in roots:
        ppath = root / section / f"{name}.yaml"
        if ppath.is_file():
            pdata = _read_yaml(ppath)
            build(ExperimentConfig, {section: pdata}, str(ppath))
            return pdata
    known = sorted({p.stem for r in roots for p in (r / section).glob("*.yaml")})
    raise ConfigError(f"{where}: key '{section}' names preset {name!r}, which is not in "
                      f"{' or '.join(str(r / section) for r in roots)}; known: {known}")


def _resolve_presets(raw: dict, where: str, roots: list[Path]) -> dict:
    """Replace ``model: tiny`` / ``model: {preset: tiny, ...}`` with the preset's keys."""
    out = dict(raw)
    for section in _PRESET_SECTIONS:
        val = raw.get(section)
        if isinstance(val, str):
            out[section] = _preset(section, val, where, roots)
        elif isinstance(val, dict) and "preset" in val:
            overrides = {k: v for k, v in val.items() if k != "preset"}
            out[section] = deep_merge(_preset(section, val["preset"], where, roots), overrides)
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


def _overrides(texts: list[str] | tuple[str, ...], roots: list[Path]) -> tuple[dict, set[str]]:
    """Dotted overrides as one nested dict, in order (a later one wins); ``model=<preset>``
    selects a preset (whose section then replaces the experiment's). Returns (overrides, the
    sections a preset replaced)."""
    ov: dict = {}
    replaced = set()
    for text in texts:
        parts, value = parse_override(text)
        if len(parts) == 1 and parts[0] in _PRESET_SECTIONS and isinstance(value, str):
            ov[parts[0]] = _preset(parts[0], value, "command line", roots)
            replaced.add(parts[0])
            continue
        cur = ov
        for p in parts[:-1]:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = value
    return ov, replaced


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or the built-in defaults when ``path`` is None) plus overrides."""
    path = Path(path) if path is not None else None
    roots = preset_roots(path)
    raw = _resolve_presets(_read_yaml(path), str(path), roots) if path is not None else {}
    cfg = build(ExperimentConfig, raw, str(path) if path else "defaults")
    if overrides:
        ov, replaced = _overrides(overrides, roots)
        base = {k: v for k, v in to_dict(cfg).items() if k not in replaced}
        cfg = build(ExperimentConfig, deep_merge(base, ov), "command line")
    return cfg


def config_text(cfg: ExperimentConfig) -> str:
    """The resolved config as ``config.yaml`` holds it: YAML, URL credentials redacted."""
    from train.redact import redact_tree

    return yaml.safe_dump(redact_tree(to_dict(cfg)), sort_keys=False)


def config_sha256(cfg: ExperimentConfig) -> str:
    """sha256 of :func:`config_text`: which resolved config a result came from."""
    import hashlib

    return hashlib.sha256(config_text(cfg).encode()).hexdigest()


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with :func:`load_config`), atomically, with URL
    credentials redacted (``train.redact``: a resumed or re-evaluated run gives its ``data.remote``
    again, or names the secret as ``${VAR}``)."""
    from train.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, config_text(cfg))  # no secret reaches disk
