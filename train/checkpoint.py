"""Resumable checkpoints: DeepSpeed's own (every rank saves its part) plus the loop position.

A resume checkpoint of a stage lives in ``runs/<name>/<stage>/checkpoints/step<N>/`` and holds
the module, optimizer and LR-schedule state (DeepSpeed ``save_checkpoint``), the loop state
(epoch, batches already trained in that epoch, step, best valid metric, patience, LR plateau
scale, losses) as
client state, each rank's RNG states (``rng_rank<r>.pt``) and the resolved config. The stream
is deterministic per (seed, epoch), so skipping the batches already trained in the epoch puts
every rank at the next unseen sample. DeepSpeed's ``latest`` file names the newest one; the
``best`` tag (best valid weights) is saved beside it without touching ``latest``.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from train.config import flatten, to_dict
from train.engine import barrier, rank, world_size
from train.evaluate import PROTOCOL_FIELDS

KEEP = 2  # resume checkpoints kept per stage


@dataclass
class LoopState:
    epoch: int = 0  # the epoch being trained
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained (on every rank)
    step: int = 0
    best: float = float("-inf")
    best_epoch: int = -1
    bad: int = 0  # evaluations since the last improvement
    lr_scale: float = 1.0  # plateau decay applied so far (StageConfig.plateau_decay ** evaluations without gain)
    losses: list = field(default_factory=list)  # mean loss of each finished epoch
    ep_loss: float = 0.0
    ep_n: int = 0
    done: bool = False
    train_s: float = 0.0  # seconds the stage ran (training and evaluating) up to this checkpoint, all restarts summed


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_resume(engine, ckpt_dir: Path, state: LoopState, *, stage: str) -> str:
    """Every rank calls this (ZeRO shards are per rank). Returns the tag."""
    tag = f"step{state.step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"loop": asdict(state), "stage": stage,
                                                                 "world_size": world_size()})
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        old = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())[:-KEEP]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return tag


class ResumeError(ValueError):
    """A checkpoint cannot continue this run; the message names the file."""


def load_resume(engine, ckpt_dir: Path, *, stage: str) -> LoopState | None:
    """Load the newest resume checkpoint of ``stage`` into ``engine``; None if there is none."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    saved = sorted(p.name for p in (ckpt_dir / tag).glob("rng_rank*.pt"))
    if len(saved) != world_size():
        raise ResumeError(f"{ckpt_dir / tag}: written by {len(saved)} rank(s), this run has {world_size()}; "
                          "resume with the same world size (or start the stage afresh without --resume)")
    rng = ckpt_dir / tag / f"rng_rank{rank()}.pt"
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or client is None or client.get("stage") != stage:
        raise ResumeError(f"{ckpt_dir / tag}: not a resume checkpoint of stage {stage!r}")
    _set_rng_state(torch.load(rng, weights_only=False))
    return LoopState(**client["loop"])


# The parts of a config the source weights depend on: a joint stage started from another run's
# source stage needs them equal (``train.init_from``).
_WEIGHTS_KEYS = ("model", "data.name", "data.domains", "data.source")
# The evaluation protocol the carried-over source metrics were measured under: equal too, so one
# metrics.json never mixes two protocols under the same keys.
_PROTOCOL_KEYS = tuple(f"eval.{k}" for k in PROTOCOL_FIELDS)


def source_of(run: Path, cfg) -> tuple[Path, dict]:
    """The best-weights folder of ``run``'s finished source stage, for ``cfg``'s joint stage, and
    that run's source metrics; ResumeError naming the file when it is missing, unfinished or built
    with another model or data config (checked before any training)."""
    ckpt = run / "source" / "checkpoints"
    metrics, conf = run / "metrics.json", run / "config.yaml"
    for path in (ckpt / "best", metrics, conf):
        if not path.exists():
            raise ResumeError(f"train.init_from: {path} does not exist (not a run folder with a source stage?)")
    prev = json.loads(metrics.read_text())
    if not prev.get("_meta", {}).get("source", {}).get("done"):
        raise ResumeError(f"train.init_from: {metrics} has no finished source stage")
    check_same_config(conf, cfg, "train.init_from", protocol=True)
    return ckpt, {"source": prev["source"], "_meta": prev["_meta"]["source"]}


def check_same_config(conf: Path, cfg, what: str, *, protocol: bool) -> None:
    """ResumeError naming ``conf`` (a run's saved config.yaml) and the first key where it differs
    from ``cfg`` in what its weights depend on (model and data) or, with ``protocol``, in what its
    metrics depend on (``eval.num_negatives``, ``eval.seed``, ``eval.prior``, ``eval.transition``)."""
    theirs, ours = flatten(yaml.safe_load(conf.read_text()), sep="."), flatten(to_dict(cfg), sep=".")
    # a key added to the config tree after that run was made: it ran with the key's default
    theirs = {**flatten(to_dict(type(cfg)()), sep="."), **theirs}
    for key in sorted(ours):
        if key.startswith(_WEIGHTS_KEYS) and theirs.get(key) != ours[key]:
            raise ResumeError(f"{what}: {conf} has {key}={theirs.get(key)!r}, this run {ours[key]!r}; "
                              "its weights need the same model and data")
        if protocol and key in _PROTOCOL_KEYS and theirs.get(key) != ours[key]:
            raise ResumeError(f"{what}: {conf} has {key}={theirs.get(key)!r}, this run {ours[key]!r}; "
                              "its metrics were measured under another evaluation protocol")
