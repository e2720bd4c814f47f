"""A run's stages in order (``train.stages.SPECS``): each trained, resumed, kept from the run
being resumed, or evaluated again (``--reevaluate``); the record written as stages finish."""
from __future__ import annotations

import shutil
import time

from train.checkpoint import ResumeError, load_resume, load_weights
from train.config import ExperimentConfig, save_config
from train.data.stream import vocabulary
from train.distill import Teacher, teacher_checkpoints
from train.engine import barrier, build_engine
from train.protocol import sampled_protocol
from train.loop import NonFiniteError, StageInterrupted, Stopper, run_stage
from train.record import RunRecord, StageRecord
from train.run import Run, start
from train.selection import describe_transfer, evaluate_stage, select_value, transfer
from train.stages import StageData


class Experiment:
    def __init__(self, cfg: ExperimentConfig, log=print, resume: bool = False, reevaluate: bool = False,
                 overwrite: bool = False):
        """``reevaluate``: :meth:`run` trains nothing and evaluates the run's finished stages again
        (their best weights) under ``cfg.eval``; the run's saved model and data config must match.
        ``overwrite``: a run folder holding an earlier run is moved aside (else refused, unless resuming)."""
        self.cfg, self.resume, self.reevaluate = cfg, resume, reevaluate
        self.stopper = Stopper(cfg.train.stop_after_steps)
        self.run_ = start(cfg, resume=resume, reevaluate=reevaluate, overwrite=overwrite, log=log)
        self.env, self.run_dir, self.log = self.run_.env, self.run_.dir, self.run_.log

    def run(self) -> dict:
        t0, run = time.time(), self.run_
        record = self._first_record()
        units = record.finished() if self.reevaluate else self.cfg.units()
        for unit in units:
            self._stage(unit, record)
        record.times["reevaluated_s" if self.reevaluate else "wall_s"] = time.time() - t0
        baselines = {self.cfg.baseline_unit(t) for t in self.cfg.data.targets()}
        if self.env.is_main and {"joint", *baselines} <= set(record.stages):
            record.transfer = transfer(run)
            for line in describe_transfer(record.transfer, self.cfg.eval.num_negatives):
                self.log(line)
        run.save(record)
        results = {k: v for k, v in record.to_json().items() if k != "_meta"}
        run.tracker.summary(results)
        plots = run_plots(run.dir, self.log) if self.env.is_main else []  # drawn whether W&B is on or off
        if run.tracker.run is not None:  # the run's plots and metrics.json go to W&B beside its curves
            run.tracker.save_files([run.dir / "metrics.json", *plots])
        run.tracker.finish()
        return results

    def _first_record(self) -> RunRecord:
        """A fresh record; a re-evaluation's starts from the finished run's (training records kept);
        ``train.init_from`` carries that run's source stage in."""
        protocol = sampled_protocol(self.cfg.eval)
        if self.reevaluate:
            record = self.run_.previous
            record.protocol = protocol
            record.provenance = {**record.provenance, **self.run_.provenance}
            return record
        record = RunRecord(world_size=self.env.world_size, launcher=self.env.launcher, protocol=protocol,
                           provenance=self.run_.provenance)
        if self.run_.init:
            source = self.run_.init[1]
            record.stages["source"] = StageRecord(source.metrics, {**source.meta, "init_from": self.cfg.train.init_from})
        return record

    def _stage(self, stage: str, record: RunRecord) -> None:
        """One unit (``stage``: a stage's name, or ``target_only-<domain>``)."""
        run, previous = self.run_, self.run_.previous.stages.get(stage)
        if self.reevaluate:
            self.log(f"== stage {stage}: evaluating its best weights again ==")
            record.stage(stage).metrics = reevaluate(run, stage)
        elif previous is not None and previous.done:
            self.log(f"== stage {stage}: finished in the run being resumed; keeping its metrics ==")
            record.stages[stage] = previous
        else:
            self.log(f"== stage {stage} ==")
            try:
                metrics, summary = self._train(stage)
            except (StageInterrupted, NonFiniteError) as e:
                record.stopped = ({"stage": e.stage, "step": e.step, "checkpoint": str(e.path)}
                                  if isinstance(e, StageInterrupted) else {"stage": stage, "reason": str(e)})
                run.save(record)
                run.tracker.finish()
                raise
            record.stages[stage] = StageRecord(metrics, {**summary, "done": True})
        run.save(record)

    def _train(self, stage: str) -> tuple[dict, dict]:
        """Train one stage (resuming its newest checkpoint with ``--resume auto``), then evaluate it."""
        run, data = self.run_, stage_data(self.run_, stage)
        model, engine = stage_engine(data)
        ckpt_dir = run.dir / stage / "checkpoints"
        state = load_resume(engine, ckpt_dir, stage=stage, log=self.log) if self.resume else None
        if state is None and self.env.is_main and ckpt_dir.exists():
            # this run's own stage, stopped before its first resume checkpoint: it starts afresh
            self.log(f"[{stage}] no resume checkpoint in {ckpt_dir}; the stage starts afresh")
            shutil.rmtree(ckpt_dir)
        barrier()
        for line in data.describe(model):
            self.log(line)
        if data.spec.from_source and state is None:
            load_source_weights(engine, run)
        if self.env.is_main:
            save_config(self.cfg, ckpt_dir / "config.yaml")
        plan = data.plan(select=lambda: select_value(run, engine, data), ckpt_dir=ckpt_dir, teacher=teacher_of(run, data))
        summary = run_stage(engine, plan, device=run.device, tracker=run.tracker, stopper=self.stopper, resume=state,
                            log=self.log)
        metrics = evaluate_stage(run, engine, data)
        run.tracker.log({stage: metrics})
        return metrics, summary

    def close(self) -> None:
        self.run_.close()


def stage_data(run: Run, unit: str) -> StageData:
    return StageData(unit, run.cfg, run.manifest, run.folder, run.env.world_size)


def stage_engine(data: StageData):
    """``(model, DeepSpeed engine)`` of a stage: fresh weights, its schedule's length."""
    sc = data.cfg.train.stage(data.spec.name)
    return build_engine(data.model_builder(), train=data.train, stage=sc,
                        total_steps=sc.epochs * data.steps_per_epoch(), world_size=data.world)


def teacher_of(run: Run, data: StageData) -> Teacher | None:
    """The joint stage's teachers (``train.joint.distill``): each target's target-only model at its
    best weights, in eval mode; None where the stage does not distil."""
    sc = data.cfg.train.stage(data.spec.name)
    weight = sc.distill
    if not weight:
        return None
    vocab, engines = vocabulary(run.manifest), {}
    for target in data.names["target"]:
        unit = run.cfg.baseline_unit(target)
        folder = teacher_checkpoints(run.dir, run.cfg.train.init_from, unit)
        _, engine = stage_engine(stage_data(run, unit))
        load_weights(engine, folder)
        engine.eval()
        engines[vocab.index(target)] = engine
        run.log(f"[{data.unit}] distilling from {unit}'s best weights in {folder} (train.{data.spec.name}.distill="
                f"{weight:g}, its scores / {sc.distill_temperature:g})")
    return Teacher(engines, vocab.ranges, weight, sc.distill_temperature)


def load_source_weights(engine, run: Run) -> None:
    """The joint stage's start: the best source weights of this run (or of ``train.init_from``)."""
    src = run.init[0] if run.init else run.dir / "source" / "checkpoints"
    load_weights(engine, src)
    run.log(f"[joint] starting from the best source weights in {src}")


def reevaluate(run: Run, stage: str) -> dict:
    """Valid and test metrics (and test ranks) of the stage's best weights in this run folder."""
    ckpt = run.dir / stage / "checkpoints"
    if not (ckpt / "best").is_dir():
        carried = run.previous.stages[stage].meta.get("init_from")
        raise ResumeError(f"--reevaluate: {ckpt / 'best'} does not exist"
                          + (f" (stage {stage} was carried over from {carried}: re-evaluate that run)" if carried else ""))
    data = stage_data(run, stage)
    _, engine = stage_engine(data)
    load_weights(engine, ckpt)
    engine.eval()
    return evaluate_stage(run, engine, data)


def run_plots(run_dir, log) -> list:
    """The run's PNGs (``runs/<name>/plots``); a drawing error warns and costs only the pictures."""
    from train.plots import draw
    from train.report import aggregate

    try:
        return draw(aggregate([run_dir]), run_dir / "plots")
    except Exception as e:  # noqa: BLE001 - the results are written already; pictures are extra
        log(f"warning: the run's plots were not drawn ({type(e).__name__}: {e})")
        return []
