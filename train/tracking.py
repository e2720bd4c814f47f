"""Run tracking: a local ``metrics.jsonl`` always, Weights & Biases on rank 0.

W&B mode: ``tracking.mode`` if set, else ``WANDB_MODE`` if set, else ``online`` when an API key
is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) and ``offline``
otherwise, so a machine without network never blocks on a login. Offline runs land in
``<run_dir>/wandb/offline-run-*`` and upload later with ``wandb sync``.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from train.config import ExperimentConfig, flatten, to_dict
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


class Tracker:
    """``log(record)`` appends to metrics.jsonl and W&B (rank 0 only; other ranks do nothing)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, is_main: bool, resume: bool = False):
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
            import wandb

            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.run = wandb.init(project=cfg.tracking.project, entity=cfg.tracking.entity, name=cfg.name,
                                  config=to_dict(cfg), dir=str(run_dir), mode=mode, id=run_id, resume="allow")

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
            self.run.log(flat, step=self.step)

    def summary(self, record: dict) -> None:
        if self.run is not None:
            self.run.summary.update(flatten(record, sep="/"))

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.run is not None:
            self.run.finish()
            self.run = None
