"""The stage kinds, each one declared spec (``SPECS``), the run's units, and what a unit reads.

Domains are data: ``data.source`` names one or more domains, ``data.target`` one or more (or
``all``), and every role below is the list the experiment gives it.

- ``target_only``: the baseline, trained the same way on one target domain's events alone: one
  unit (its own model) per target domain, named ``target_only`` when there is one target and
  ``target_only-<domain>`` when there are several.
- ``source``: next-item CE on the source domains' targets of the mixed sequences.
- ``joint``: starts from the best ``source`` weights (of this run, or of ``train.init_from``);
  batches mix source and target rows at ``train.mix_ratio`` (with ``data.target=all``, one stream
  of every domain); L = sum_d w_d * mean CE(d), w_d the stage's source or target weight (or
  ``train.<stage>.domain_weights[d]``); the two-term loss is the two-domain case.

Each unit selects its best epoch on valid of its selection domains (the mean where several;
``eval.select_domains=all``: over every domain it is evaluated on), by the model's scores alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from model import Vocabulary, build_recommender
from train.config import STAGES, ExperimentConfig, baseline_of, unit_stage
from train.data.stream import (vocabulary, ReaderOptions, batches_per_rank, joint_rows, mixed_batches, split_mode,
                               train_batches)
from train.protocol import SAMPLED
from train.loop import StagePlan

Role = Literal["source", "target"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    driver: Role  # whose training samples make one epoch
    evaluates: tuple[Role, ...]  # the domains the stage scores (and is evaluated on)
    selects_on: Role  # whose valid metric keeps the best epoch (eval.select_domains=stage)
    target_only: bool = False  # inputs hold the target domain's events alone (one unit per target: config.units)
    mixed: bool = False  # batches mix source and target rows (train.mix_ratio)
    from_source: bool = False  # starts from the best source weights


SPECS = {s.name: s for s in (
    StageSpec("target_only", driver="target", evaluates=("target",), selects_on="target", target_only=True),
    StageSpec("source", driver="source", evaluates=("source",), selects_on="source"),
    StageSpec("joint", driver="target", evaluates=("source", "target"), selects_on="target", mixed=True,
              from_source=True),
)}
assert tuple(SPECS) == STAGES  # one list of stage names: train.config's


# How the stages are named to people, everywhere (training table, report, plots)
STAGE_LABELS = {"target_only": "target-only", "source": "source only", "joint": "source-then-joint"}


def run_order(stages: list[str]) -> list[str]:
    """The listed stages in ``STAGES`` order (the joint stage after the source stage it starts from)."""
    return [s for s in STAGES if s in stages]


def unit_label(unit: str) -> str:
    """How a unit is named to people (its stage's label)."""
    return STAGE_LABELS[unit_stage(unit)]


def roles(unit: str, cfg: ExperimentConfig) -> dict[str, list[str]]:
    """``{"source": [...], "target": [...]}``: the domains each role means in ``unit`` (a
    per-target unit's target is its own domain)."""
    own = unit.split("-", 1)[1] if "-" in unit else None
    return {"source": cfg.data.sources(), "target": [own] if own else cfg.data.targets()}


def _ordered(domains: list[str]) -> list[str]:
    return list(dict.fromkeys(domains))


def data_problems(cfg: ExperimentConfig, manifest: dict, folder) -> list[str]:
    """What the prepared data cannot give the listed stages, each naming the domain and the
    numbers: a stage's training domain without training rows, an evaluated domain without valid
    or test users, or fewer items outside an evaluated user's sequence than ``eval.num_negatives``."""
    domains = {d["name"]: d for d in manifest["domains"]}
    problems, n = [], cfg.eval.num_negatives
    evaluated = sorted({d for u in cfg.units() for d in stage_domains(u, cfg)})
    for unit in cfg.units():
        for driver in roles(unit, cfg)[SPECS[unit_stage(unit)].driver]:
            if not manifest["counts"][driver]["train"]["samples"]:
                problems.append(f"stage {unit} trains on domain {driver!r}, which has no training rows in {folder}")
    for name in evaluated:
        counts, d = manifest["counts"][name], domains[name]
        empty = [s for s in ("valid", "test") if not counts[s]["samples"]]
        if empty:
            problems.append(f"domain {name!r} has no {' and no '.join(empty)} users in {folder} (every user's last "
                            "two events fall in other domains); nothing to select or report on")
        held = d.get("max_user_items", 1)  # manifests before it was recorded: a user holds its target at least
        if d["n_items"] - held < n:
            who = f" and a user evaluated there holds {held} of them" if "max_user_items" in d else ""
            problems.append(f"eval.num_negatives={n} but domain {name!r} of {folder} has {d['n_items']} items{who}: "
                            f"at most {max(d['n_items'] - held, 0)} negatives can be drawn; lower eval.num_negatives")
    return problems


def own_domain_input(unit: str, cfg: ExperimentConfig) -> bool:
    """A unit's input policy, the one place it is decided: rows hold their own domain's events
    alone (the target-only baseline, or ``model.sequence=per_domain``), else the mixed sequence.
    Training, evaluation, an export and ``recommend`` all apply it."""
    return SPECS[unit_stage(unit)].target_only or cfg.model.sequence == "per_domain"


def stage_domains(unit: str, cfg: ExperimentConfig) -> list[str]:
    """The domains a unit trains its scores for and is evaluated on, by name (sources first)."""
    names = roles(unit, cfg)
    return _ordered([d for r in SPECS[unit_stage(unit)].evaluates for d in names[r]])


def build_model(cfg: ExperimentConfig, manifest: dict, domains: list[str] | None = None) -> torch.nn.Module:
    """The experiment's recommender over the manifest's vocabulary, seeded by ``cfg.seed``.
    ``domains``: the names of the domains the model will train and score (a stage's; None: every
    domain), see :func:`model.build_recommender`."""
    torch.manual_seed(cfg.seed)
    return build_recommender(cfg.model, Vocabulary.of(manifest["domains"]), active=domains)


class StageData:
    """What one unit of a run reads: its batches, steps per epoch and loss weights."""

    def __init__(self, unit: str, cfg: ExperimentConfig, manifest: dict, folder, world: int):
        self.unit, self.spec = unit, SPECS[unit_stage(unit)]
        self.cfg, self.manifest, self.folder, self.world = cfg, manifest, folder, world
        self.names = roles(unit, cfg)
        self.train = cfg.train.for_stage(self.spec.name)
        self.reader = ReaderOptions.of(cfg)
        self.domains = stage_domains(unit, cfg)
        # mixed: source rows beside target rows, unless every source is a target (data.target=all):
        # then one stream of every target domain drives the stage
        self.mixed = self.spec.mixed and not set(self.names["source"]) <= set(self.names["target"])
        self.driver = self.names[self.spec.driver]  # the domains whose training samples make an epoch

    @property
    def own_domain_only(self) -> bool:
        """Inputs hold only the row's own domain (:func:`own_domain_input`)."""
        return own_domain_input(self.unit, self.cfg)

    def selection_domains(self) -> list[str]:
        """The domains whose valid metric (their mean) keeps a unit's best epoch."""
        return self.domains if self.cfg.eval.select_domains == "all" else self.names[self.spec.selects_on]

    def weights(self) -> list[float]:
        """w_d per domain index: the stage's source weight for its sources, target weight for its
        targets (a target's where a domain is both), ``domain_weights`` over both."""
        sc, dom = self.cfg.train.stage(self.spec.name), vocabulary(self.manifest)
        w = [0.0] * len(dom.names)
        for role, weight in (("source", sc.source_weight), ("target", sc.target_weight)):
            if role in self.spec.evaluates:
                for d in self.names[role]:
                    w[dom.index(d)] = weight
        for d, weight in sc.domain_weights.items():
            if d in self.domains:
                w[dom.index(d)] = weight
        return w

    def rows(self) -> int:
        """Driving-domain rows of a micro batch."""
        t = self.train
        return joint_rows(t.micro_batch_size, t.mix_ratio)[1] if self.mixed else t.micro_batch_size

    def steps_per_epoch(self) -> int:
        n = sum(self.manifest["counts"][d]["train"]["samples"] for d in self.driver) / self.world
        return max(1, math.ceil(n / self.rows() / self.train.grad_accum))

    def batches(self, epoch: int):
        """One epoch's training batches of this rank (resampled streams: the nominal number)."""
        t, cfg = self.train, self.cfg
        common = dict(max_len=cfg.model.max_len, seed=cfg.seed, epoch=epoch, buffer=t.shuffle_buffer, reader=self.reader,
                      cloze=cfg.model.objective == "masked", only_domain=self.own_domain_only, buckets=t.length_buckets,
                      latest_target=t.latest_target,
                      epoch_batches=self.steps_per_epoch() * t.grad_accum if t.resampled else None)
        if self.mixed:
            return mixed_batches(self.manifest, self.folder, source=_one(self.names["source"]),
                                 target=_one(self.names["target"]), batch_size=t.micro_batch_size,
                                 mix_ratio=t.mix_ratio, **common)
        return train_batches(self.manifest, self.folder, _one(self.driver), batch_size=t.micro_batch_size, **common)

    def known_steps(self, epoch: int) -> tuple[int, int] | None:
        """(batches every rank trains in ``epoch``, batches other ranks have beyond those), from the
        manifest (:func:`batches_per_rank`); None where a skipped bad sample could change a count."""
        if self.reader.on_error != "raise":
            return None
        t = self.train
        per_rank = batches_per_rank(self.manifest, _one(self.driver), batch_size=self.rows(), seed=self.cfg.seed,
                                    epoch=epoch, world=self.world, num_workers=t.num_workers,
                                    epoch_batches=self.steps_per_epoch() * t.grad_accum if t.resampled else None)
        return min(per_rank), sum(per_rank) - len(per_rank) * min(per_rank)

    def describe(self, model) -> list[str]:
        """The unit's log lines: its inputs, loss and scoring, and how its data is read."""
        names, mc, stage = vocabulary(self.manifest).names, self.cfg.model, self.unit
        inputs = "each row's own domain only" if self.own_domain_only else "the mixed sequence of every domain"
        if model.view_domains:
            whose = f"one {mc.view_layers}-block encoder they share" if mc.view_shared else \
                f"its own {mc.view_layers}-block encoder"
            inputs += ", plus the own-domain view for " + ", ".join(names[d] for d in model.view_domains) + (
                f" (each through {whose})" if mc.view_layers else "")
        if model.transition is not None:
            inputs += ", plus a learned transition vector of each domain's latest event" + (
                " (fitted to what the rest misses)" if model.transition_residual else "")
        loss = model.loss.describe(names)
        per = "its rows, each row's mean first (every user weighs the same)" if mc.loss_mean == "row" else "its targets"
        if not self.train.latest_target:
            per += " (a row's latest event is not one)"
        sc = self.cfg.train.stage(self.spec.name)
        if sc.distill:
            own = ", ".join(self.names["target"])
            sharp = f" (its scores / {sc.distill_temperature:g})" if sc.distill_temperature != 1 else ""
            loss += (f"; each {own} target after an event of its domain in its row: {1 - sc.distill:g} x that CE + "
                     f"{sc.distill:g} x the CE against the target-only model's next-item distribution{sharp} given the "
                     "row's events of the domain alone")
        scores = model.scoring.describe(model.item_bias is not None)
        return [f"[{stage}] inputs: {inputs}",
                f"[{stage}] loss: {loss}; a domain's loss is the mean over {per}; scores: {scores}",
                f"[{stage}] {self._reading()}; micro batch {self.train.micro_batch_size}"]

    def _reading(self) -> str:
        n_shards = sum(len(self.manifest["shards"][d]["train"]) for d in self.driver)
        workers = self.train.num_workers
        readers = self.world * max(workers, 1)
        if self.train.resampled:
            how = f"every reader draws shards with replacement (resampled), an epoch is {self.steps_per_epoch()} steps"
        elif split_mode(n_shards, workers) == "shards":
            how = "whole shards per reader; an epoch is one pass, every rank takes the same number of steps"
        else:
            how = (f"every reader opens every shard, keeping every {readers}th sample; an epoch is one pass, every "
                   "rank takes the same number of steps")
        return (f"{n_shards} {', '.join(self.driver)} train shards, {self.world} rank(s) x {max(workers, 1)} reader(s) "
                f"({workers} DataLoader workers): {how}")

    def plan(self, *, select, ckpt_dir, teacher=None) -> StagePlan:
        """How the training loop runs this stage (``select``: the valid number an epoch is kept by;
        ``teacher``: ``StagePlan.teacher``)."""
        t, sc = self.cfg.train, self.cfg.train.stage(self.spec.name)
        return StagePlan(name=self.unit, batches=self.batches, weights=self.weights(), epochs=sc.epochs,
                         patience=sc.patience, min_epochs=sc.min_epochs, select=select, ckpt_dir=ckpt_dir,
                         log_every=t.log_every,
                         checkpoint_every=t.checkpoint_every, grad_accum=t.grad_accum,
                         domain_names=vocabulary(self.manifest).names, plateau_decay=sc.plateau_decay,
                         keep_checkpoints=t.keep_checkpoints, on_nonfinite=t.on_nonfinite,
                         max_nonfinite_skips=t.max_nonfinite_skips, steps=self.known_steps,
                         select_label=self.select_label(),
                         rows_per_batch=self.train.micro_batch_size * self.world, teacher=teacher)

    def select_label(self) -> str:
        """How the epoch lines name the number an epoch is kept by, e.g. ``valid sampled ndcg@10 (B)``."""
        ev, where = self.cfg.eval, self.selection_domains()
        mean = "mean " if len(where) > 1 else ""
        return f"valid {mean}{'sampled' if ev.select_protocol == SAMPLED else 'full'} {ev.select_metric} ({', '.join(where)})"

    def model_builder(self):
        """The stage's model constructor (its domains' views and auxiliary losses only)."""
        return partial(build_model, self.cfg, self.manifest, domains=self.domains)


def _one(domains: list[str]) -> str | list[str]:
    """A single domain as its name (the stream of one domain), several as the list."""
    return domains[0] if len(domains) == 1 else domains


def format_table(results: dict, targets: list[str], sources: list[str] = (), split: str = "test") -> str:
    """``split`` metrics of each target's target-only baseline vs source-then-joint (and the joint
    model, and the source stage, on each source that is no target)."""
    cols = [("full", "hr@10"), ("full", "ndcg@10"), ("full", "mrr"),
            (SAMPLED, "hr@10"), (SAMPLED, "ndcg@10"), (SAMPLED, "mrr")]
    head = f"{'stage':<22}{'domain':<14}" + "".join(f"{p[:4] + ' ' + m:>16}" for p, m in cols)
    lines = [head, "-" * len(head)]
    rows = [(unit, t) for t in targets for unit in (baseline_of(results, t) or "target_only", "joint")]
    rows += [(unit, s) for s in sources if s not in targets for unit in ("source", "joint")]
    for unit, dom in rows:
        m = results.get(unit, {}).get(split, {}).get(dom)
        if m:
            lines.append(f"{unit_label(unit):<22}{dom:<14}" + "".join(f"{m[p][k]:>16.4f}" for p, k in cols))
    return "\n".join(lines)
