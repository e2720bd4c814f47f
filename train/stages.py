"""The stage kinds, each one declared spec (``SPECS``), and what a stage reads.

- ``target_only``: the baseline, trained the same way on the target domain's events alone.
- ``source``: next-item CE on the source-domain targets of the mixed sequences.
- ``joint``: starts from the best ``source`` weights (of this run, or of ``train.init_from``);
  batches mix source and target rows at ``train.mix_ratio``; L = w_s * mean CE(source) + w_t *
  mean CE(target).

Each stage selects its best epoch on valid of its selection domain (``eval.select_domains=all``:
the mean over every domain it is evaluated on), ranking by the model's scores alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from model import Vocabulary, build_recommender
from train.config import STAGES, ExperimentConfig
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
    target_only: bool = False  # inputs hold the target domain's events alone
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


def data_problems(cfg: ExperimentConfig, manifest: dict, folder) -> list[str]:
    """What the prepared data cannot give the listed stages, each naming the domain and the
    numbers: a stage's training domain without training rows, an evaluated domain without valid
    or test users, or fewer items outside an evaluated user's sequence than ``eval.num_negatives``."""
    names = {"source": cfg.data.source, "target": cfg.data.target}
    domains = {d["name"]: d for d in manifest["domains"]}
    problems, n = [], cfg.eval.num_negatives
    evaluated = sorted({names[r] for s in cfg.train.stages for r in SPECS[s].evaluates})
    for stage in run_order(cfg.train.stages):
        driver = names[SPECS[stage].driver]
        if not manifest["counts"][driver]["train"]["samples"]:
            problems.append(f"stage {stage} trains on domain {driver!r}, which has no training rows in {folder}")
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


def own_domain_input(stage: str, cfg: ExperimentConfig) -> bool:
    """A stage's input policy, the one place it is decided: rows hold their own domain's events
    alone (the target-only baseline, or ``model.sequence=per_domain``), else the mixed sequence.
    Training, evaluation, an export and ``recommend`` all apply it."""
    return SPECS[stage].target_only or cfg.model.sequence == "per_domain"


def stage_domains(stage: str, cfg: ExperimentConfig) -> list[str]:
    """The domains a stage trains its scores for and is evaluated on, by name."""
    names = {"source": cfg.data.source, "target": cfg.data.target}
    return [names[r] for r in SPECS[stage].evaluates]


def build_model(cfg: ExperimentConfig, manifest: dict, domains: list[str] | None = None) -> torch.nn.Module:
    """The experiment's recommender over the manifest's vocabulary, seeded by ``cfg.seed``.
    ``domains``: the names of the domains the model will train and score (a stage's; None: every
    domain), see :func:`model.build_recommender`."""
    torch.manual_seed(cfg.seed)
    return build_recommender(cfg.model, Vocabulary.of(manifest["domains"]), active=domains)


class StageData:
    """What one stage of a run reads: its batches, steps per epoch and loss weights."""

    def __init__(self, spec: StageSpec, cfg: ExperimentConfig, manifest: dict, folder, world: int):
        self.spec, self.cfg, self.manifest, self.folder, self.world = spec, cfg, manifest, folder, world
        self.names = {"source": cfg.data.source, "target": cfg.data.target}
        self.train = cfg.train.for_stage(spec.name)
        self.reader = ReaderOptions.of(cfg)
        self.driver = self.names[spec.driver]
        self.domains = stage_domains(spec.name, cfg)

    @property
    def own_domain_only(self) -> bool:
        """Inputs hold only the row's own domain (:func:`own_domain_input`)."""
        return own_domain_input(self.spec.name, self.cfg)

    def weights(self) -> list[float]:
        """w_d per domain index: the stage's source and target weights."""
        sc, dom = self.cfg.train.stage(self.spec.name), vocabulary(self.manifest)
        w = [0.0] * len(dom.names)
        w[dom.index(self.names["source"])], w[dom.index(self.names["target"])] = sc.source_weight, sc.target_weight
        return w

    def rows(self) -> int:
        """Driving-domain rows of a micro batch."""
        t = self.train
        return joint_rows(t.micro_batch_size, t.mix_ratio)[1] if self.spec.mixed else t.micro_batch_size

    def steps_per_epoch(self) -> int:
        n = self.manifest["counts"][self.driver]["train"]["samples"] / self.world
        return max(1, math.ceil(n / self.rows() / self.train.grad_accum))

    def batches(self, epoch: int):
        """One epoch's training batches of this rank (resampled streams: the nominal number)."""
        t, cfg = self.train, self.cfg
        common = dict(max_len=cfg.model.max_len, seed=cfg.seed, epoch=epoch, buffer=t.shuffle_buffer, reader=self.reader,
                      cloze=cfg.model.objective == "masked", only_domain=self.own_domain_only, buckets=t.length_buckets,
                      epoch_batches=self.steps_per_epoch() * t.grad_accum if t.resampled else None)
        if self.spec.mixed:
            return mixed_batches(self.manifest, self.folder, source=self.names["source"], target=self.names["target"],
                                 batch_size=t.micro_batch_size, mix_ratio=t.mix_ratio, **common)
        return train_batches(self.manifest, self.folder, self.driver, batch_size=t.micro_batch_size, **common)

    def known_steps(self, epoch: int) -> tuple[int, int] | None:
        """(batches every rank trains in ``epoch``, batches other ranks have beyond those), from the
        manifest (:func:`batches_per_rank`); None where a skipped bad sample could change a count."""
        if self.reader.on_error != "raise":
            return None
        t = self.train
        per_rank = batches_per_rank(self.manifest, self.driver, batch_size=self.rows(), seed=self.cfg.seed,
                                    epoch=epoch, world=self.world, num_workers=t.num_workers,
                                    epoch_batches=self.steps_per_epoch() * t.grad_accum if t.resampled else None)
        return min(per_rank), sum(per_rank) - len(per_rank) * min(per_rank)

    def describe(self, model) -> list[str]:
        """The stage's log lines: its inputs, loss and scoring, and how its data is read."""
        names, mc, stage = vocabulary(self.manifest).names, self.cfg.model, self.spec.name
        inputs = "each row's own domain only" if self.own_domain_only else "the mixed sequence of every domain"
        if model.view_domains:
            inputs += ", plus the own-domain view for " + ", ".join(names[d] for d in model.view_domains) + (
                f" (each through its own {mc.view_layers}-block encoder)" if mc.view_layers else "")
        loss = model.loss.describe(names)
        per = "its rows, each row's mean first (every user weighs the same)" if mc.loss_mean == "row" else "its targets"
        scores = model.scoring.describe(model.item_bias is not None)
        return [f"[{stage}] inputs: {inputs}",
                f"[{stage}] loss: {loss}; a domain's loss is the mean over {per}; scores: {scores}",
                f"[{stage}] {self._reading()}; micro batch {self.train.micro_batch_size}"]

    def _reading(self) -> str:
        n_shards, workers = len(self.manifest["shards"][self.driver]["train"]), self.train.num_workers
        readers = self.world * max(workers, 1)
        if self.train.resampled:
            how = f"every reader draws shards with replacement (resampled), an epoch is {self.steps_per_epoch()} steps"
        elif split_mode(n_shards, workers) == "shards":
            how = "whole shards per reader; an epoch is one pass, every rank takes the same number of steps"
        else:
            how = (f"every reader opens every shard, keeping every {readers}th sample; an epoch is one pass, every "
                   "rank takes the same number of steps")
        return (f"{n_shards} {self.driver} train shards, {self.world} rank(s) x {max(workers, 1)} reader(s) "
                f"({workers} DataLoader workers): {how}")

    def plan(self, *, select, ckpt_dir) -> StagePlan:
        """How the training loop runs this stage (``select``: the valid number an epoch is kept by)."""
        t, sc = self.cfg.train, self.cfg.train.stage(self.spec.name)
        return StagePlan(name=self.spec.name, batches=self.batches, weights=self.weights(), epochs=sc.epochs,
                         patience=sc.patience, select=select, ckpt_dir=ckpt_dir, log_every=t.log_every,
                         checkpoint_every=t.checkpoint_every, grad_accum=t.grad_accum,
                         domain_names=vocabulary(self.manifest).names, plateau_decay=sc.plateau_decay,
                         keep_checkpoints=t.keep_checkpoints, on_nonfinite=t.on_nonfinite,
                         max_nonfinite_skips=t.max_nonfinite_skips, steps=self.known_steps,
                         select_label=self.select_label(),
                         rows_per_batch=self.train.micro_batch_size * self.world)

    def select_label(self) -> str:
        """How the epoch lines name the number an epoch is kept by, e.g. ``valid sampled ndcg@10 (B)``."""
        ev = self.cfg.eval
        where = ", ".join(self.domains) if ev.select_domains == "all" else self.names[self.spec.selects_on]
        mean = "mean " if ev.select_domains == "all" and len(self.domains) > 1 else ""
        return f"valid {mean}{'sampled' if ev.select_protocol == SAMPLED else 'full'} {ev.select_metric} ({where})"

    def model_builder(self):
        """The stage's model constructor (its domains' views and auxiliary losses only)."""
        return partial(build_model, self.cfg, self.manifest, domains=self.domains)


def format_table(results: dict, target: str, source: str | None = None, split: str = "test") -> str:
    """``split`` metrics of target-only vs source-then-joint on ``target`` (and joint on ``source``)."""
    cols = [("full", "hr@10"), ("full", "ndcg@10"), ("full", "mrr"),
            (SAMPLED, "hr@10"), (SAMPLED, "ndcg@10"), (SAMPLED, "mrr")]
    head = f"{'stage':<22}{'domain':<14}" + "".join(f"{p[:4] + ' ' + m:>16}" for p, m in cols)
    lines = [head, "-" * len(head)]
    rows = [("target_only", target), ("joint", target)]
    if source:
        rows += [("source", source), ("joint", source)]
    label = STAGE_LABELS
    for stage, dom in rows:
        m = results.get(stage, {}).get(split, {}).get(dom)
        if m:
            lines.append(f"{label[stage]:<22}{dom:<14}" + "".join(f"{m[p][k]:>16.4f}" for p, k in cols))
    return "\n".join(lines)
