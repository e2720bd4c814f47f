"""Setting a run up, before any stage: signals, the process group, the run folder (lock, no silent
overwrite), every check that can refuse the run, the prepared data, the tracker; and the run's
record, written atomically as stages finish."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launch.signals import install as install_signal_handlers
from train.checkpoint import ResumeError, check_same_config, source_of
from train.config import ConfigError, ExperimentConfig, config_sha256, save_config
from train.data.prepare import ensure_prepared, load_manifest
from train.data.stream import ReaderOptions
from train.distill import teacher_checkpoints
from train.files import sha256_file
from train.engine import all_gather_objects, barrier, check_launcher_settings, setup_distributed
from train.evaluate import Evaluator
from train.protocol import sampled_protocol
from train.record import RunRecord, check_same_data
from train.runlock import RunLock, RunLocked
from train.stages import data_problems
from train.tracking import Tracker

_RUN_FILES = ("metrics.json", "config.yaml", "metrics.jsonl", "source", "joint", "target_only")  # (and target_only-<domain>)
RUN_MARK = ".xdrec-run"  # written into every run folder xdrec starts: --overwrite moves only folders that hold it


@dataclass
class Run:
    """What every stage of a run shares."""

    cfg: ExperimentConfig
    env: Any  # launch.env.DistEnv
    device: Any
    dir: Path
    log: Callable
    lock: RunLock | None
    data_lock: Any  # train.runlock.DataLock of the prepared folder, held shared by rank 0 (None elsewhere)
    previous: RunRecord  # the record of the run being resumed (empty for a fresh run)
    manifest: dict
    folder: Path
    evaluator: Evaluator
    tracker: Tracker
    init: tuple[Path, dict] | None  # train.init_from: (that run's source checkpoints, its source record)
    provenance: dict  # run_id, git_commit, config_sha256, data_fingerprint: recorded in metrics.json

    def save(self, record: RunRecord) -> None:
        """metrics.json (rank 0), replaced atomically."""
        if self.env.is_main:
            record.save(self.dir / "metrics.json")

    def close(self) -> None:
        """Release the run's locks (every rank may call it; rank 0 holds them)."""
        if self.data_lock is not None:
            self.data_lock.release()
            self.data_lock = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def start(cfg: ExperimentConfig, *, resume: bool, reevaluate: bool, overwrite: bool, log=print) -> Run:
    """Signals, process group, the run folder claimed, the checks passed, data prepared."""
    install_signal_handlers()
    check_launcher_settings(cfg.train)
    env, device = setup_distributed()
    log = log if env.is_main else (lambda *a, **k: None)
    lock = claim_run_dir(cfg.run_dir(), resume=resume or reevaluate, overwrite=overwrite, is_main=env.is_main, log=log)
    data_lock = None
    try:
        previous = _checked_previous(cfg, resume=resume or reevaluate, reevaluate=reevaluate)
        init = source_of(Path(cfg.train.init_from), cfg) if cfg.train.init_from else None
        if cfg.train.joint.distill and "target_only" not in cfg.train.stages:  # the teachers come from init_from
            for target in cfg.data.targets():
                teacher_checkpoints(cfg.run_dir(), cfg.train.init_from, cfg.baseline_unit(target))
        manifest, data_lock = _prepared(cfg, env, log)
        if init:
            check_same_data(RunRecord.load(Path(cfg.train.init_from) / "metrics.json").provenance, manifest,
                            what=f"train.init_from {cfg.train.init_from}", folder=cfg.data.prepared_dir())
        if env.is_main:
            save_config(cfg, cfg.run_dir() / "config.yaml")
        log(f"{env.launcher}: world size {env.world_size}, device {device}, ZeRO stage {cfg.train.zero_stage}, "
            f"global batch {cfg.train.global_batch_size(env.world_size)}")
        folder = cfg.data.prepared_dir()
        evaluator = Evaluator(manifest, folder, cfg.eval, max_len=cfg.model.max_len, reader=ReaderOptions.of(cfg))
        provenance = {"run_id": previous.provenance.get("run_id") or uuid.uuid4().hex, "git_commit": git_commit(),
                      "config_sha256": config_sha256(cfg), "data_fingerprint": manifest.get("fingerprint")}
        context = {"git_commit": provenance["git_commit"], "world_size": env.world_size, "launcher": env.launcher,
                   "zero_stage": cfg.train.zero_stage, "manifest_fingerprint": manifest.get("fingerprint"),
                   "manifest_sha256": sha256_file(folder / "manifest.json") if env.is_main else None}
        tracker = Tracker(cfg, cfg.run_dir(), is_main=env.is_main, resume=resume, context=context,
                          job_type="reevaluate" if reevaluate else "train")
    except BaseException:
        for held in (data_lock, lock):
            if held is not None:
                held.release()
        raise
    return Run(cfg, env, device, cfg.run_dir(), log, lock, data_lock, previous, manifest, folder, evaluator, tracker,
               init, provenance)


def git_commit() -> str:
    """The commit of this checkout (``+dirty`` with uncommitted changes); "unknown" outside git."""
    import subprocess

    here = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _checked_previous(cfg: ExperimentConfig, *, resume: bool, reevaluate: bool) -> RunRecord:
    """The record being resumed or re-evaluated, checked to be of this run's model, data and
    evaluation protocol (ResumeError naming the file otherwise)."""
    run_dir = cfg.run_dir()
    previous = RunRecord.load(run_dir / "metrics.json") if resume else RunRecord()
    if reevaluate and not previous.finished():
        raise ResumeError(f"--reevaluate: {run_dir / 'metrics.json'} is missing or has no finished stage")
    if resume and (run_dir / "config.yaml").is_file():  # its checkpoints need the same model and data
        check_same_config(run_dir / "config.yaml", cfg, "--reevaluate" if reevaluate else "--resume auto",
                          protocol=False)
    recorded, ours = previous.recorded_protocol(), sampled_protocol(cfg.eval)
    if recorded and recorded != ours and not reevaluate:
        raise ResumeError(f"{run_dir / 'metrics.json'}: its stages were evaluated with {recorded}, this run with "
                          f"{ours}; resume with the same eval.num_negatives, eval.seed, eval.prior, "
                          "eval.transition and eval.exclude_history, re-evaluate with --reevaluate, or start the run afresh")
    return previous


def _prepared(cfg: ExperimentConfig, env, log) -> tuple[dict, Any]:
    """Rank 0 prepares (the others wait) and holds the folder's data lock; refused when the data
    cannot meet the evaluation protocol. Returns (manifest, the lock or None)."""
    manifest, lock = ensure_prepared(cfg.data, log=log) if env.is_main else (None, None)
    try:
        barrier()
        manifest = manifest or load_manifest(cfg.data.prepared_dir())
        problems = data_problems(cfg, manifest, cfg.data.prepared_dir())
        if problems:
            raise ConfigError("; ".join(problems))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return manifest, lock


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool, log) -> RunLock | None:
    """Rank 0 takes the run's lock (:class:`RunLock`) and checks that a fresh start does not land
    on an earlier run: such a folder is refused (ResumeError) or, with ``overwrite``, moved aside.
    Every rank raises the same error. Returns the held lock (rank 0) or None."""
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
                if not made_by_xdrec(run_dir):
                    raise ResumeError(f"{run_dir} holds {', '.join(held)} but is not a run folder xdrec made (no "
                                      f"{RUN_MARK} or metrics.json in it); --overwrite moves only xdrec's own run "
                                      "folders: move it away yourself or choose another name")
                lock = _move_aside(run_dir, lock, log)
            (run_dir / RUN_MARK).touch()
        except (ResumeError, RunLocked) as e:
            if lock is not None:
                lock.release()
            error = (type(e).__name__, str(e))
    error = all_gather_objects(error)[0]
    if error:
        raise (RunLocked if error[0] == "RunLocked" else ResumeError)(error[1])
    return lock


def made_by_xdrec(run_dir: Path) -> bool:
    """A folder xdrec started a run in: it holds the run mark (or, written before the mark, a metrics.json)."""
    return (run_dir / RUN_MARK).is_file() or (run_dir / "metrics.json").is_file()


def _move_aside(run_dir: Path, lock: RunLock, log) -> RunLock:
    """``--overwrite``: the old run goes to ``<run_dir>.old-<time>`` (its lock with it); a new lock here."""
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    fresh = RunLock(run_dir, log=log)
    fresh.acquire()
    lock.release()
    log(f"--overwrite: moved the earlier run {run_dir} to {aside}")
    return fresh
