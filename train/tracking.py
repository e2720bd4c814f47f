"""Run tracking: a local ``metrics.jsonl`` always, Weights & Biases on rank 0.

W&B mode: ``tracking.mode`` if set, else ``WANDB_MODE`` if set, else ``online`` when an API key
is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) and ``offline``
otherwise, so a machine without network never blocks on a login. Offline runs land in
``<run_dir>/wandb/offline-run-*`` and upload later with ``wandb sync``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from train.config import STAGES, ExperimentConfig, flatten, to_dict
from train.redact import redact, redact_tree
from train.files import DiskFullError, is_disk_full


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(cfg: ExperimentConfig) -> str:
    if not cfg.tracking.wandb:
        return "disabled"
    return cfg.tracking.mode or os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")


def drop_torn_tail(path: Path) -> None:
    """Cut a metrics.jsonl back to its last complete line (a kill mid-write leaves a torn one), so
    appended records start on a line of their own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def _last_step(path: Path) -> int:
    """The ``step`` of the last complete record of a metrics.jsonl (0 if none)."""
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                step = max(step, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    return step


def wandb_group(cfg: ExperimentConfig) -> str:
    """``tracking.group``, else the run name without a ``-seed<k>`` suffix: a seed sweep is one group."""
    return cfg.tracking.group or re.sub(r"-seed\d+$", "", cfg.name)


class Tracker:
    """``log(record)`` appends to metrics.jsonl and W&B (rank 0 only; other ranks do nothing).

    W&B layout: one W&B run per xdrec run (a resumed or requeued process continues it, same id),
    in group :func:`wandb_group`, ``job_type`` train (or reevaluate). Each stage logs under its
    own prefix (``source/loss``, ``joint/valid_select`` ...) against its own optimizer step,
    ``<stage>/stage_step`` (``define_metric``), so a stage's curves start at its step 1 and one run
    holds the whole comparison; ``context`` (git commit, world size, manifest hash ...) is added to
    the run's config. A W&B error warns once and training goes on with metrics.jsonl alone."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, is_main: bool, resume: bool = False,
                 context: dict | None = None, job_type: str = "train"):
        """``resume``: continue the W&B run whose id ``run_dir/wandb_run_id`` holds (same run)."""
        self.is_main = is_main
        self.step = 0
        self.run = None
        self._file = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:  # continue the step axis where the interrupted process left it (W&B needs it monotone)
            self.step = _last_step(run_dir / "metrics.jsonl")
        self._path = run_dir / "metrics.jsonl"
        drop_torn_tail(self._path)
        self._file = open(self._path, "a")
        mode = wandb_mode(cfg)
        if mode != "disabled":
            self._guarded(self._init, cfg, run_dir, mode, resume, dict(context or {}), job_type)

    def _init(self, cfg: ExperimentConfig, run_dir: Path, mode: str, resume: bool, context: dict,
              job_type: str) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        # W&B's system metadata records the command line; a secret on it (data.remote=https://u:TOKEN@...)
        # would reach disk and the server, so the metadata is left out then (the config is redacted)
        secret_in_argv = any(redact(a) != a for a in sys.argv)
        self.run = wandb.init(project=cfg.tracking.project, entity=cfg.tracking.entity, name=cfg.name,
                              group=wandb_group(cfg), job_type=job_type,
                              config=redact_tree({**to_dict(cfg), "run": context}), dir=str(run_dir), mode=mode,
                              id=run_id, resume="allow", settings=wandb.Settings(quiet=True,
                                                                                 x_disable_meta=secret_in_argv))
        for stage in dict.fromkeys([*STAGES, *cfg.units()]):  # target_only-<domain> units log on their own axes
            self.run.define_metric(f"{stage}/stage_step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/stage_step")

    def _guarded(self, fn, *args) -> None:
        """Run a W&B call; on any error warn once, drop W&B and go on (metrics.jsonl keeps everything)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            print(f"warning: W&B failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); training goes on, "
                  f"metrics in {self._path}", file=sys.stderr, flush=True)
            self.run = None

    def log(self, record: dict, *, step: int | None = None) -> None:
        if not self.is_main:
            return
        if step is not None:
            self.step = max(self.step, step)
        flat = flatten(record, sep="/")
        try:
            self._file.write(json.dumps({"time": time.time(), "step": self.step, **flat}) + "\n")
            self._file.flush()
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(self._path) from None
            raise
        if self.run is not None:
            self._guarded(self.run.log, flat)

    def save_files(self, paths: list[Path]) -> None:
        """Files into the W&B run: PNGs as images (``plots/<name>``), others as run files."""
        if self.run is None:
            return
        import wandb

        images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            self._guarded(self.run.log, images)
        for p in paths:
            if p.suffix != ".png" and self.run is not None:
                # a copy in the run's folder is uploaded when the run ends (run.save would symlink
                # it and print a warning on the console for each file)
                self._guarded(lambda f=p: shutil.copyfile(f, Path(self.run.dir) / f.name))

    def summary(self, record: dict) -> None:
        if self.run is not None:
            self._guarded(self.run.summary.update, flatten(record, sep="/"))

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.run is not None:
            self._guarded(self.run.finish)
            self.run = None
