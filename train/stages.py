"""Source-then-joint training and the target-only baseline, as configuration, not branches.

- ``source``: next-item CE on source-domain targets of the mixed sequences.
- ``joint``: starts from the best ``source`` weights (of this run, or of the run named by
  ``train.init_from``); batches mix source and target rows at
  ``train.mix_ratio``; L = w_s * mean CE(source) + w_t * mean CE(target).
- ``target_only``: the same model, built from the same seed and trained the same way, on
  target-domain events alone (source items removed from its inputs and evaluation histories).

Each stage selects its best epoch on valid (sampled protocol by default) of its selection domain
(source for ``source``, target otherwise), ranking by the model's scores alone, and reports valid
and test metrics of those weights (with the ``eval.prior`` and ``eval.transition`` terms where they are set).
``Experiment(reevaluate=True)`` trains nothing and reports a finished run's stages again.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from model import build_recommender
from train.config import ConfigError, ExperimentConfig, save_config
from train.data.prepare import ensure_prepared, load_manifest
from train.data.stream import (DomainIndex, ReaderOptions, batches_per_rank, joint_rows, mixed_batches, split_mode,
                               train_batches)
from train.engine import barrier, build_engine, check_launcher_settings, setup_distributed
from train.evaluate import (PROTOCOLS, SAMPLED, Evaluator, ndcg_at, paired_bootstrap, protocol_label, recorded_protocol,
                            sampled_protocol)
from launch.signals import install as install_signal_handlers
from train.checkpoint import ResumeError, check_same_config, load_resume, read_metrics, source_of
from train.files import finite_json, write_atomic
from train.loop import NonFiniteError, StageInterrupted, StagePlan, Stopper, run_stage, score_fn
from train.runlock import RunLock, RunLocked
from train.tracking import Tracker


@dataclass(frozen=True)
class StageSpec:
    select_domain: str  # "source" | "target"
    eval_domains: tuple[str, ...]
    only_target: bool  # inputs hold target-domain items alone


SPECS = {
    "source": StageSpec("source", ("source",), False),
    "joint": StageSpec("target", ("source", "target"), False),
    "target_only": StageSpec("target", ("target",), True),
}


def listed_domains(names: list[str], dom: DomainIndex, within: list[str]) -> list[int]:
    """Indices of the domains a config key lists (``[]``: every domain) that are among ``within``."""
    return [dom.index(n) for n in (names or dom.names) if n in within]


def view_domains(m, dom: DomainIndex, within: list[str]) -> list[int]:
    """Indices of the domains among ``within`` whose query adds the own-domain view
    (``model.sequence=dual``)."""
    return listed_domains(m.view_domains, dom, within) if m.sequence == "dual" else []


def build_model(cfg: ExperimentConfig, manifest: dict, domains: list[str] | None = None) -> torch.nn.Module:
    """``domains``: the names of the domains the model will train and score (a stage's); the
    own-domain views and the uniform auxiliary loss of the others are left out (no encoder pass,
    no random draws for them). None: every domain."""
    dom = DomainIndex(manifest)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    ranges = [(int(o) + 1, int(e) + 1) for o, e in zip(dom.offsets, dom.ends)]
    return build_recommender(n_items=dom.n_items, ranges=ranges, item_domain=dom.item_domain_table(),
                             d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, ff_mult=m.ff_mult,
                             dropout=m.dropout, emb_dropout=m.emb_dropout, max_len=m.max_len, causal=m.causal,
                             domain_embeddings=m.domain_embeddings, domain_heads=m.domain_heads,
                             loss=m.loss, num_sampled=m.sampled_negatives,
                             view_domains=view_domains(m, dom, domains or dom.names),
                             view_layers=m.view_layers, view_encoder_domains=view_domains(m, dom, dom.names),
                             masked=m.objective == "masked", mask_prob=m.mask_prob,
                             exclude_own_items=m.exclude_own_items, loss_mean=m.loss_mean,
                             temperature=m.temperature, label_smoothing=m.label_smoothing,
                             uniform_aux=m.uniform_aux, item_bias=m.item_bias,
                             uniform_aux_domains=listed_domains(m.uniform_aux_domains, dom, domains or dom.names))


class Experiment:
    """Everything a run shares across its stages: config, data, evaluator, tracker, device."""

    def __init__(self, cfg: ExperimentConfig, log=print, resume: bool = False, reevaluate: bool = False,
                 overwrite: bool = False):
        """``reevaluate``: :meth:`run` trains nothing and evaluates the run's finished stages again
        (their best weights) under ``cfg.eval``; the run's saved model and data config must match.
        ``overwrite``: a run folder that already holds a run is moved aside (``<name>.old-<time>``)
        and the run starts afresh; without it (and without ``resume``) such a folder is refused."""
        self.cfg, self.resume, self.reevaluate = cfg, resume or reevaluate, reevaluate
        self.stopper = Stopper(cfg.train.stop_after_steps)
        install_signal_handlers()
        check_launcher_settings(cfg.train)
        self.env, self.device = setup_distributed()
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.run_dir = cfg.run_dir()
        self.lock = claim_run_dir(self.run_dir, resume=self.resume, overwrite=overwrite, is_main=self.env.is_main,
                                  log=self.log)
        try:
            self._setup(cfg, reevaluate)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: ExperimentConfig, reevaluate: bool) -> None:
        """Every check that can refuse the run, then data; config.yaml is written once they passed."""
        # --resume auto keeps finished stages' metrics: they must be of this run's sampled protocol
        self.prev = self._previous_metrics() if self.resume else {}
        if reevaluate:
            if not any(v.get("done") for v in self.prev.get("_meta", {}).values() if isinstance(v, dict)):
                raise ResumeError(f"--reevaluate: {self.run_dir / 'metrics.json'} is missing or has no finished stage")
        if self.resume and (self.run_dir / "config.yaml").is_file():  # its checkpoints need the same model and data
            check_same_config(self.run_dir / "config.yaml", cfg, "--reevaluate" if reevaluate else "--resume auto",
                              protocol=False)
        recorded = self.prev.get("_meta", {}).get("eval")
        recorded = recorded and recorded_protocol(recorded)
        ours = sampled_protocol(cfg.eval)
        if recorded and recorded != ours and not reevaluate:
            raise ResumeError(f"{self.run_dir / 'metrics.json'}: its stages were evaluated with {recorded}, "
                              f"this run with {ours}; resume with the same eval.num_negatives, eval.seed, "
                              "eval.prior and eval.transition, re-evaluate with --reevaluate, or start the run afresh")
        # train.init_from: (the other run's source checkpoints, its source metrics), checked now
        self.init = source_of(Path(cfg.train.init_from), cfg) if cfg.train.init_from else None
        manifest = ensure_prepared(cfg.data, log=self.log) if self.env.is_main else None  # the others wait
        barrier()
        self.manifest = manifest or load_manifest(cfg.data.prepared_dir())
        self.folder = cfg.data.prepared_dir()
        for d in self.manifest["domains"]:
            if d["n_items"] <= cfg.eval.num_negatives:
                raise ConfigError(f"eval.num_negatives={cfg.eval.num_negatives} but domain {d['name']!r} of "
                                  f"{self.folder} has only {d['n_items']} items; lower eval.num_negatives")
        if self.env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.log(f"{self.env.launcher}: world size {self.env.world_size}, device {self.device}, "
                 f"ZeRO stage {cfg.train.zero_stage}, global batch "
                 f"{cfg.train.global_batch_size(self.env.world_size)}")
        self.names = {"source": cfg.data.source, "target": cfg.data.target}
        self.dom = DomainIndex(self.manifest)
        self.reader = ReaderOptions.of(cfg)
        self.evaluator = Evaluator(self.manifest, self.folder, cfg.eval, max_len=cfg.model.max_len, reader=self.reader)
        self.tracker = Tracker(cfg, self.run_dir, is_main=self.env.is_main, resume=self.resume and not reevaluate)

    # -- data -------------------------------------------------------------------------------
    def _driver(self, stage: str) -> str:
        """The domain whose training samples make one epoch of ``stage``."""
        return self.names["source" if stage == "source" else "target"]

    def _batches(self, stage: str, epoch: int):
        cfg, t = self.cfg, self.cfg.train.for_stage(stage)
        # resampled streams are endless: an epoch is the nominal number of steps of one pass
        common = dict(max_len=cfg.model.max_len, seed=cfg.seed, epoch=epoch, buffer=t.shuffle_buffer, reader=self.reader,
                      cloze=cfg.model.objective == "masked",
                      epoch_batches=self._steps_per_epoch(stage) * t.grad_accum if t.resampled else None)
        if stage == "joint":
            return mixed_batches(self.manifest, self.folder, source=self.names["source"],
                                 target=self.names["target"], batch_size=t.micro_batch_size,
                                 mix_ratio=t.mix_ratio, only_domain=self._own_domain_only(stage), **common)
        return train_batches(self.manifest, self.folder, self._driver(stage), batch_size=t.micro_batch_size,
                             only_domain=self._own_domain_only(stage), **common)

    def _own_domain_only(self, stage: str) -> bool:
        """Inputs hold only the row's own domain: the target-only baseline, or model.sequence=per_domain."""
        return SPECS[stage].only_target or self.cfg.model.sequence == "per_domain"

    def _known_steps(self, stage: str, epoch: int) -> tuple[int, int] | None:
        """(batches every rank trains in ``epoch``, batches other ranks have beyond those), from the
        manifest (:func:`batches_per_rank`); None where a skipped bad sample could change a count."""
        if self.reader.on_error != "raise":
            return None
        t = self.cfg.train.for_stage(stage)
        rows = joint_rows(t.micro_batch_size, t.mix_ratio)[1] if stage == "joint" else t.micro_batch_size
        per_rank = batches_per_rank(self.manifest, self._driver(stage), batch_size=rows, seed=self.cfg.seed,
                                    epoch=epoch, world=self.env.world_size, num_workers=t.num_workers,
                                    epoch_batches=self._steps_per_epoch(stage) * t.grad_accum if t.resampled else None)
        return min(per_rank), sum(per_rank) - len(per_rank) * min(per_rank)

    def _steps_per_epoch(self, stage: str) -> int:
        t = self.cfg.train.for_stage(stage)
        rows = joint_rows(t.micro_batch_size, t.mix_ratio)[1] if stage == "joint" else t.micro_batch_size
        n = self.manifest["counts"][self._driver(stage)]["train"]["samples"] / self.env.world_size
        return max(1, math.ceil(n / rows / t.grad_accum))

    # -- evaluation ---------------------------------------------------------------------------
    def _select(self, engine, stage: str) -> float:
        """The valid number a stage keeps its best epoch by: ``eval.select_metric`` under
        ``eval.select_protocol`` on the stage's selection domain, or with ``eval.select_domains=all``
        the unweighted mean of it over the stage's evaluation domains; ranked by the model's scores
        alone (no ``eval.prior`` or ``eval.transition``), so those terms never change the weights kept."""
        spec, ev = SPECS[stage], self.cfg.eval
        roles = spec.eval_domains if ev.select_domains == "all" else (spec.select_domain,)
        values = [self.evaluator.evaluate(score_fn(engine), self.names[r], "valid",
                                          only_domain=self._own_domain_only(stage), device=self.device,
                                          eval_terms=False)[ev.select_protocol][ev.select_metric]
                  for r in roles]
        return sum(values) / len(values)

    def evaluate_stage(self, engine, stage: str) -> dict:
        """Valid and test metrics per domain; on test also per history bucket (``cold_start``), and
        each test user's ranks saved to ``<run>/<stage>/test_ranks.npz`` for the paired bootstrap."""
        spec = SPECS[stage]
        out: dict = {}
        saved = {}
        for split in ("valid", "test"):
            for role in spec.eval_domains:
                name = self.names[role]
                r = self.evaluator.ranks(score_fn(engine), name, split, only_domain=self._own_domain_only(stage),
                                         device=self.device)
                res = self.evaluator.metrics(r)
                if split == "test":
                    res["cold_start"] = self.evaluator.by_history(r)
                    saved.update({f"{name}/{k}": v for k, v in r.items()})
                out.setdefault(split, {})[name] = res
        if self.env.is_main:
            np.savez(self.run_dir / stage / "test_ranks.npz", **saved)
        return out

    def transfer(self) -> dict:
        """Paired bootstrap over the target's test users: source-then-joint minus target-only
        NDCG@10, per protocol (from the two stages' saved ranks)."""
        t = self.names["target"]
        runs = {s: np.load(self.run_dir / s / "test_ranks.npz") for s in ("joint", "target_only")}
        j, o = runs["joint"], runs["target_only"]
        if not np.array_equal(j[f"{t}/user"], o[f"{t}/user"]):
            raise RuntimeError(f"{self.run_dir}: joint and target-only were tested on different users")
        out = {"metric": "ndcg@10", "domain": t}
        for p in PROTOCOLS:
            out[p] = paired_bootstrap(ndcg_at(j[f"{t}/{p}"], 10), ndcg_at(o[f"{t}/{p}"], 10),
                                      resamples=self.cfg.eval.bootstrap, seed=self.cfg.eval.seed)
        return out

    # -- stages -----------------------------------------------------------------------------
    def _engine(self, stage: str):
        """The stage's model (fresh weights) wrapped in its DeepSpeed engine."""
        sc = self.cfg.train.stage(stage)
        domains = [self.names[r] for r in SPECS[stage].eval_domains]
        return build_engine(partial(build_model, self.cfg, self.manifest, domains=domains),
                            train=self.cfg.train.for_stage(stage), stage=sc,
                            total_steps=sc.epochs * self._steps_per_epoch(stage), world_size=self.env.world_size)

    def reevaluate_stage(self, stage: str) -> dict:
        """Valid and test metrics (and test ranks) of the stage's best weights in this run folder."""
        ckpt = self.run_dir / stage / "checkpoints"
        if not (ckpt / "best").is_dir():
            carried = self.prev["_meta"][stage].get("init_from")
            raise ResumeError(f"--reevaluate: {ckpt / 'best'} does not exist"
                              + (f" (stage {stage} was carried over from {carried}: re-evaluate that run)"
                                 if carried else ""))
        _, engine = self._engine(stage)
        engine.load_checkpoint(str(ckpt), tag="best", load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        engine.eval()
        return self.evaluate_stage(engine, stage)

    def run_stage(self, stage: str) -> tuple[dict, dict]:
        cfg = self.cfg
        sc = cfg.train.stage(stage)
        weights = [0.0] * len(self.dom.names)
        weights[self.dom.index(self.names["source"])] = sc.source_weight
        weights[self.dom.index(self.names["target"])] = sc.target_weight
        model, engine = self._engine(stage)
        train = cfg.train.for_stage(stage)
        ckpt_dir = self.run_dir / stage / "checkpoints"
        state = load_resume(engine, ckpt_dir, stage=stage, log=self.log) if self.resume else None
        if state is None and self.env.is_main and ckpt_dir.exists():
            # this run's own stage, stopped before its first resume checkpoint: it starts afresh
            self.log(f"[{stage}] no resume checkpoint in {ckpt_dir}; the stage starts afresh")
            shutil.rmtree(ckpt_dir)
        barrier()
        domain = self._driver(stage)
        n_shards = len(self.manifest["shards"][domain]["train"])
        workers = cfg.train.num_workers
        readers = self.env.world_size * max(workers, 1)
        if cfg.train.resampled:
            how = ("every reader draws shards with replacement (resampled), an epoch is "
                   f"{self._steps_per_epoch(stage)} steps")
        elif split_mode(n_shards, workers) == "shards":
            how = "whole shards per reader; an epoch is one pass, every rank takes the same number of steps"
        else:
            how = (f"every reader opens every shard, keeping every {readers}th sample; an epoch is one pass, every "
                   "rank takes the same number of steps")
        inputs = "each row's own domain only" if self._own_domain_only(stage) else "the mixed sequence of every domain"
        if model.view_domains:
            inputs += ", plus the own-domain view for " + ", ".join(self.dom.names[d] for d in model.view_domains)
            if cfg.model.view_layers:
                inputs += f" (each through its own {cfg.model.view_layers}-block encoder)"
        self.log(f"[{stage}] inputs: {inputs}")
        n = model.num_sampled
        softmax = {"full": "full softmax over the target's domain",
                   "sampled": f"sampled softmax (in-batch + {n} uniform negatives of the domain, log-Q corrected)",
                   "uniform": f"softmax over the target and {n} uniform negatives of its domain"}[model.loss]
        per = "its rows, each row's mean first (every user weighs the same)" if model.per_row else "its targets"
        if model.label_smoothing:
            softmax += f", label smoothing {model.label_smoothing:g}"
        if model.uniform_aux and model.uniform_aux_domains:
            softmax += (f", plus {model.uniform_aux:g} x the CE against {n} uniform negatives of the domain for "
                        + ", ".join(self.dom.names[d] for d in model.uniform_aux_domains))
        scores = f"cos(query, item) / {model.temperature:g}" if model.temperature else "dot(query, item)"
        if model.item_bias is not None:
            scores += " + a learned bias per item"
        self.log(f"[{stage}] loss: {softmax}; a domain's loss is the mean over {per}; scores: {scores}")
        self.log(f"[{stage}] {n_shards} {domain} train shards, {self.env.world_size} rank(s) x "
                 f"{max(workers, 1)} reader(s) ({workers} DataLoader workers): {how}; micro batch "
                 f"{train.micro_batch_size}")
        if stage == "joint" and state is None:
            src = self.init[0] if self.init else self.run_dir / "source" / "checkpoints"
            engine.load_checkpoint(str(src), tag="best", load_module_only=True,
                                   load_optimizer_states=False, load_lr_scheduler_states=False)
            self.log(f"[joint] starting from the best source weights in {src}")
        plan = StagePlan(name=stage, batches=partial(self._batches, stage), weights=weights, epochs=sc.epochs,
                         patience=sc.patience, select=partial(self._select, engine, stage),
                         ckpt_dir=ckpt_dir, log_every=cfg.train.log_every,
                         checkpoint_every=cfg.train.checkpoint_every, grad_accum=cfg.train.grad_accum,
                         domain_names=self.dom.names, plateau_decay=sc.plateau_decay,
                         keep_checkpoints=cfg.train.keep_checkpoints, on_nonfinite=cfg.train.on_nonfinite,
                         max_nonfinite_skips=cfg.train.max_nonfinite_skips, steps=partial(self._known_steps, stage))
        if self.env.is_main:
            save_config(cfg, plan.ckpt_dir / "config.yaml")
        summary = run_stage(engine, plan, device=self.device, tracker=self.tracker, stopper=self.stopper,
                            resume=state, log=self.log)
        metrics = self.evaluate_stage(engine, stage)
        self.tracker.log({stage: metrics})
        return metrics, summary

    def run(self) -> dict:
        t0 = time.time()
        results: dict = {}
        meta: dict = {"world_size": self.env.world_size, "launcher": self.env.launcher,
                      "eval": sampled_protocol(self.cfg.eval)}
        # The joint stage needs the source checkpoint: run source first whatever the order given.
        order = sorted(self.cfg.train.stages, key=lambda s: ("source", "joint").index(s) if s != "target_only" else -1)
        if self.init:  # the source stage of another run: its metrics stand in for this run's
            results["source"] = self.init[1]["source"]
            meta["source"] = {**self.init[1]["_meta"], "init_from": self.cfg.train.init_from}
        if self.reevaluate:  # the stages this run folder finished, their training records kept
            order = [s for s in ("target_only", "source", "joint") if self.prev["_meta"].get(s, {}).get("done")]
            meta = {**self.prev["_meta"], "eval": meta["eval"]}
        for stage in order:
            if self.reevaluate:
                self.log(f"== stage {stage}: evaluating its best weights again ==")
                results[stage] = self.reevaluate_stage(stage)
                self.write_metrics(results, meta)
                continue
            if self.prev.get("_meta", {}).get(stage, {}).get("done"):
                self.log(f"== stage {stage}: finished in the run being resumed; keeping its metrics ==")
                results[stage], meta[stage] = self.prev[stage], self.prev["_meta"][stage]
                continue
            self.log(f"== stage {stage} ==")
            try:
                results[stage], meta[stage] = self.run_stage(stage)
            except StageInterrupted as e:
                meta["stopped"] = {"stage": e.stage, "step": e.step, "checkpoint": str(e.path)}
                self.write_metrics(results, meta)
                self.tracker.finish()
                raise
            except NonFiniteError as e:
                meta["stopped"] = {"stage": stage, "reason": str(e)}
                self.write_metrics(results, meta)
                self.tracker.finish()
                raise
            meta[stage]["done"] = True
            self.write_metrics(results, meta)
        meta["reevaluated_s" if self.reevaluate else "wall_s"] = time.time() - t0
        if self.env.is_main and {"joint", "target_only"} <= set(results):
            results["transfer"] = self.transfer()
            tr = results["transfer"]
            for p in PROTOCOLS:
                label = protocol_label(p, self.cfg.eval.num_negatives)
                self.log(f"transfer on {tr['domain']} test, {label} NDCG@10: joint - target-only = {tr[p]['diff']:+.4f}, "
                         f"95% CI [{tr[p]['ci95'][0]:+.4f}, {tr[p]['ci95'][1]:+.4f}] ({tr[p]['n_users']} users, "
                         f"{tr[p]['resamples']} paired bootstrap resamples)")
        self.write_metrics(results, meta)
        self.tracker.summary(results)
        self.tracker.finish()
        return results

    def _previous_metrics(self) -> dict:
        return read_metrics(self.run_dir / "metrics.json")

    def write_metrics(self, results: dict, meta: dict) -> None:
        """metrics.json, replaced atomically; strict JSON (a NaN or infinity is an error naming its key)."""
        if self.env.is_main:
            path = self.run_dir / "metrics.json"
            write_atomic(path, finite_json({**results, "_meta": meta}, what=str(path)), point="metrics.json")

    def close(self) -> None:
        """Release the run's lock (every rank may call it; rank 0 holds it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


_RUN_FILES = ("metrics.json", "config.yaml", "metrics.jsonl", "source", "joint", "target_only")


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool, log) -> RunLock | None:
    """Rank 0 takes the run's lock (:class:`RunLock`) and checks that a fresh start does not land
    on an earlier run: such a folder is refused (ResumeError) or, with ``overwrite``, moved aside.
    Every rank raises the same error. Returns the held lock (rank 0) or None."""
    from train.engine import all_gather_objects

    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir, log=log)
            lock.acquire()
            held = [n for n in _RUN_FILES if (run_dir / n).exists()]
            if held and not resume:
                if not overwrite:
                    raise ResumeError(f"{run_dir} already holds a run ({', '.join(held)}); continue it with "
                                      "--resume auto, or start afresh with --overwrite (moves it aside)")
                lock = _move_aside(run_dir, lock, log)
        except (ResumeError, RunLocked) as e:
            if lock is not None:
                lock.release()
            error = (type(e).__name__, str(e))
    error = all_gather_objects(error)[0]
    if error:
        raise (RunLocked if error[0] == "RunLocked" else ResumeError)(error[1])
    return lock


def _move_aside(run_dir: Path, lock: RunLock, log) -> RunLock:
    """``--overwrite``: the old run goes to ``<run_dir>.old-<time>`` (its lock with it); a new lock here."""
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    fresh = RunLock(run_dir, log=log)
    fresh.acquire()
    lock.release()
    log(f"--overwrite: moved the earlier run {run_dir} to {aside}")
    return fresh


def format_table(results: dict, target: str, source: str | None = None) -> str:
    """Test metrics of target-only vs source-then-joint on ``target`` (and joint on ``source``)."""
    cols = [("full", "hr@10"), ("full", "ndcg@10"), ("full", "mrr"),
            (SAMPLED, "hr@10"), (SAMPLED, "ndcg@10"), (SAMPLED, "mrr")]
    head = f"{'stage':<22}{'domain':<14}" + "".join(f"{p[:4] + ' ' + m:>16}" for p, m in cols)
    lines = [head, "-" * len(head)]
    rows = [("target_only", target), ("joint", target)]
    if source:
        rows += [("source", source), ("joint", source)]
    label = {"joint": "source-then-joint", "target_only": "target-only", "source": "source only"}
    for stage, dom in rows:
        m = results.get(stage, {}).get("test", {}).get(dom)
        if m:
            lines.append(f"{label[stage]:<22}{dom:<14}" + "".join(f"{m[p][k]:>16.4f}" for p, k in cols))
    return "\n".join(lines)
