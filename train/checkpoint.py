"""Resumable checkpoints, written so that a kill or a full disk at any moment loses nothing.

A stage's checkpoints live in ``runs/<name>/<stage>/checkpoints/``::

    latest                 the newest published tag (replaced atomically)
    step00000040/          a published resume checkpoint:
        *.pt                 DeepSpeed's files (module, optimizer, LR schedule; one per rank under ZeRO)
        rng_rank<r>.pt       each rank's RNG states
        loop.json            the loop position (epoch, batches trained in it, step, best, patience, ...)
        manifest.json        every file above with its size and sha256, the world size, the stage
    best/                  the best-by-valid weights (published the same way, swapped in atomically)

A checkpoint is written to ``.tmp-<tag>/``, completed on every rank, sealed with its manifest and
only then published by an atomic rename; ``latest`` follows. A tag is never overwritten in place.
Loading validates the manifest (sizes and checksums; each rank checks the files it wrote) and
falls back to the newest complete checkpoint, naming what it skipped and why; the skipped ones
are moved aside as ``.bad-<tag>``. The stream is deterministic per (seed, epoch), so skipping the
batches already trained in the epoch puts every rank at the next unseen sample.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from train.config import flatten, to_dict
from train.engine import all_gather_objects, barrier, max_over_ranks, rank, world_size
from train.protocol import LEGACY_PROTOCOL, PROTOCOL_FIELDS
from train.record import RunRecord, StageRecord
from train.files import disk_is_full, fault_point, finite_json, free_space, is_disk_full, sha256_file, write_atomic

MANIFEST = "manifest.json"
LOOP = "loop.json"
BEST = "best"


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
    skipped: int = 0  # batches skipped for a non-finite loss or gradient (train.on_nonfinite=skip)

    def to_json(self) -> str:
        d = asdict(self)
        d["best"] = None if d["best"] == float("-inf") else d["best"]  # strict JSON has no -inf
        return finite_json(d, what="loop state")

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        d = json.loads(text)
        d["best"] = float("-inf") if d.get("best") is None else d["best"]
        return cls(**d)


def _rng_state() -> dict:
    """This process's RNG states as tensors, numbers and strings only (``torch.load(weights_only=True)``
    reads them back; nothing in the file is a pickled object)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n, p = s["numpy"], s["python"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    if isinstance(p, dict):
        p = (p["version"], tuple(p["state"].tolist()), p["gauss_next"])
    np.random.set_state(n)  # tuples: a checkpoint of xdrec before 2026-12-06 (numpy arrays pickled)
    random.setstate(p)
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# The only classes a DeepSpeed checkpoint may hold besides tensors and plain containers (seen in
# deepspeed 0.19.8's ZeRO 0-3 files, fp32, bf16 and fp16): enums and plain records, no code.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something other than data (tensors, numbers, strings, containers and
    the few DeepSpeed records allowed): it could run code when unpickled, so it is not loaded."""


def _numpy_array_globals() -> list:
    """What a pickled numpy array names: its reconstructor, ndarray and dtypes (data, no code)."""
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_data(path: Path, *, deepspeed_types: bool = False, numpy_arrays: bool = False, mmap: bool = False):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only (with
    ``deepspeed_types``, also :func:`_deepspeed_safe_globals`; ``numpy_arrays``, plain numpy
    arrays); anything else is refused with :class:`UnsafeCheckpoint` naming the file."""
    allowed = (_deepspeed_safe_globals() if deepspeed_types else []) + (_numpy_array_globals() if numpy_arrays else [])
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap" in str(e)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # a file of the legacy format
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{path}: refused to load: {_unsafe_what(str(e))}, not only tensors and plain data "
                               "(unpickling it could run code); xdrec loads received files as data only") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UnsafeCheckpoint(f"{path}: not a readable torch file ({type(e).__name__}: "
                               f"{next((ln for ln in str(e).splitlines() if ln.strip()), '')[:200]})") from None


def _unsafe_what(text: str) -> str:
    """What torch's weights-only unpickler refused, from its message (e.g. 'it names GLOBAL posix.system')."""
    m = re.search(r"(?:unsupported|Unsupported global:)\s*(GLOBAL [\w.]+)", text)
    return f"it names {m.group(1)}" if m else "it holds an object"


def verify_data_only(folder: Path) -> None:
    """Every ``*.pt`` in ``folder`` loads as data only (:func:`load_data`), so DeepSpeed's own
    unpickling of them (it does not restrict what it loads) runs no code; else :class:`UnsafeCheckpoint`."""
    for f in sorted(folder.glob("*.pt")):
        load_data(f, deepspeed_types=True, mmap=True)


def load_weights(engine, ckpt_dir: Path, tag: str = "best"):
    """DeepSpeed's ``load_checkpoint`` of ``ckpt_dir/tag``'s module weights only, after
    :func:`verify_data_only` proved its files hold data alone."""
    verify_data_only(Path(ckpt_dir) / tag)
    return engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True, load_optimizer_states=False,
                                  load_lr_scheduler_states=False)


# -- manifests -------------------------------------------------------------------------------

_RANK_OF = re.compile(r"(?:pp_rank_|rng_rank)(\d+)")


def owner(name: str) -> int:
    """The rank that writes (and checks) a checkpoint file: per-rank files name it, the rest are rank 0's."""
    m = _RANK_OF.search(name)
    return int(m.group(1)) if m else 0


def file_entries(folder: Path, names: list[str]) -> dict:
    """``{name: {"bytes", "sha256"}}`` of ``folder``'s files ``names``."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def write_manifest(folder: Path, files: dict, **info) -> None:
    """Seal ``folder``: its manifest lists ``files`` (see :func:`file_entries`) and ``info``."""
    write_atomic(folder / MANIFEST, finite_json({**info, "files": dict(sorted(files.items()))}, what=str(folder)),
                 point="ckpt.manifest")


def problem(folder: Path, *, me: int, full: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None: it is): its manifest is missing or a
    file it lists is missing, of another size or (``full``; files rank ``me`` owns) of another sha256."""
    try:
        man = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{MANIFEST} missing (the save did not complete)"
    except ValueError as e:
        return f"{MANIFEST} unreadable ({e})"
    for name, want in man.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            return f"{name} missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, its manifest {want['bytes']} (truncated?)"
        if full and owner(name) == me and sha256_file(p) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


# -- saving ----------------------------------------------------------------------------------


def _write_tag(engine, ckpt_dir: Path, tmp: str, loop: LoopState | None, stage: str) -> None:
    """Every rank: DeepSpeed's files, this rank's RNG states and (rank 0) the loop state into
    ``ckpt_dir/tmp``; then the manifest. Any rank's failure (a full disk included) becomes the same
    error on every rank, with the temporary folder removed."""
    folder = ckpt_dir / tmp
    failure, in_deepspeed = None, False
    try:
        in_deepspeed = True
        engine.save_checkpoint(str(ckpt_dir), tag=tmp, client_state={"stage": stage}, save_latest=False)
        in_deepspeed = False
        fault_point("ckpt.model")
        if loop is not None:
            torch.save(_rng_state(), folder / f"rng_rank{rank()}.pt")
            fault_point("ckpt.rng")
            if rank() == 0:
                write_atomic(folder / LOOP, loop.to_json(), point="ckpt.loop")
    except Exception as e:  # noqa: BLE001 - turned into one error on every rank below
        full = is_disk_full(e) or disk_is_full(ckpt_dir)
        failure = f"no space left on device ({free_space(folder)} free there)" if full else f"{type(e).__name__}: {e}"
        if in_deepspeed and world_size() > 1:
            barrier()  # the others wait in save_checkpoint's closing barrier
    failed = max_over_ranks([int(failure is not None)])[0]
    mine = {} if failed else file_entries(folder, [p.name for p in folder.iterdir()
                                                     if p.is_file() and owner(p.name) == rank()])
    parts = all_gather_objects((failure, mine))
    if failed:
        if rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
        barrier()
        raise CheckpointError(f"saving {folder}: {next(f for f, _ in parts if f)}; the checkpoints before it are intact")
    if rank() == 0:
        files = {n: e for _, m in parts for n, e in m.items()}
        write_manifest(folder, files, stage=stage, world_size=world_size(), step=loop.step if loop else None)
    barrier()


def _publish(ckpt_dir: Path, tmp: str, tag: str) -> None:
    """Rank 0: the sealed ``tmp`` becomes ``tag`` by one rename (``best``: swapped with the old one)."""
    src, dst = ckpt_dir / tmp, ckpt_dir / tag
    if tag == BEST:
        old = ckpt_dir / ".old-best"
        shutil.rmtree(old, ignore_errors=True)
        if dst.exists():
            os.rename(dst, old)
        fault_point("ckpt.best")
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(src, dst)
    fault_point("ckpt.publish")
    write_atomic(ckpt_dir / "latest", tag, point="ckpt.latest")


def _new_tag(ckpt_dir: Path, step: int) -> str:
    """``step<N>``, or ``step<N>-<k>`` when that tag exists (an epoch end at a step a mid-epoch
    checkpoint was written at): never the name of an existing checkpoint. Sorts in save order."""
    tag, k = f"step{step:08d}", 0
    while (ckpt_dir / tag).exists():
        k += 1
        tag = f"step{step:08d}-{k}"
    return tag


def save_resume(engine, ckpt_dir: Path, state: LoopState, *, stage: str, keep: int = 2) -> str:
    """Every rank calls this (ZeRO shards are per rank). Returns the published tag; keeps the
    newest ``keep`` resume checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tag = _new_tag(ckpt_dir, state.step) if rank() == 0 else None
    tag = all_gather_objects(tag)[0]
    _write_tag(engine, ckpt_dir, f".tmp-{tag}", state, stage)
    if rank() == 0:
        _publish(ckpt_dir, f".tmp-{tag}", tag)
        for old in _published(ckpt_dir)[keep:]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def save_best(engine, ckpt_dir: Path, *, stage: str) -> None:
    """The current weights as ``best`` (the previous best stays complete until the swap)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _write_tag(engine, ckpt_dir, ".tmp-best", None, stage)
    if rank() == 0:
        _publish(ckpt_dir, ".tmp-best", BEST)
    barrier()


# -- loading ---------------------------------------------------------------------------------


class ResumeError(ValueError):
    """A checkpoint cannot continue this run; the message names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the folder and the cause."""


def _published(ckpt_dir: Path) -> list[str]:
    """Published resume checkpoints, newest first."""
    return sorted((p.name for p in ckpt_dir.glob("step*") if p.is_dir()), reverse=True)


def recover_best(ckpt_dir: Path) -> None:
    """Rank 0: finish or undo a ``best`` swap a kill interrupted (the old best comes back, as the
    loop state of the checkpoint resumed from knows it); drop temporary folders."""
    if rank() == 0 and ckpt_dir.is_dir():
        old, best = ckpt_dir / ".old-best", ckpt_dir / BEST
        if old.is_dir() and not best.exists():
            os.rename(old, best)
        for p in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def _legacy_problem(folder: Path) -> str | None:
    """A checkpoint written before manifests: complete when every rank's RNG file is there."""
    saved = len(list(folder.glob("rng_rank*.pt")))
    if saved != world_size():
        raise ResumeError(f"{folder}: written by {saved} rank(s), this run has {world_size()}; "
                          "resume with the same world size (or start the stage afresh without --resume)")
    return None


def _check(folder: Path, stage: str) -> str | None:
    """This rank's verdict on ``folder``; ResumeError for a checkpoint that is whole but of
    another world size or stage (no fallback can help there)."""
    if not (folder / MANIFEST).exists() and not (folder / LOOP).exists():  # published before manifests existed
        return _legacy_problem(folder)
    why = problem(folder, me=rank())
    if why is None:
        man = json.loads((folder / MANIFEST).read_text())
        if man.get("world_size") != world_size():
            raise ResumeError(f"{folder}: written by {man.get('world_size')} rank(s), this run has {world_size()}; "
                              "resume with the same world size (or start the stage afresh without --resume)")
        if man.get("stage") != stage:
            raise ResumeError(f"{folder}: not a resume checkpoint of stage {stage!r}")
    return why


def newest_complete(ckpt_dir: Path, *, stage: str, log=print) -> str | None:
    """The newest checkpoint every rank finds complete; the skipped ones named with their reason
    and moved aside (``.bad-<tag>``). None when there is no checkpoint; ResumeError when none is complete."""
    skipped = []
    for tag in _published(ckpt_dir):
        verdicts = [v for v in all_gather_objects(_check(ckpt_dir / tag, stage)) if v]
        if not verdicts:
            if skipped:
                log(f"[{stage}] resuming from {ckpt_dir / tag}, the newest complete checkpoint; skipped "
                    + "; ".join(f"{t} ({why})" for t, why in skipped))
            return tag
        skipped.append((tag, verdicts[0]))
        if rank() == 0:
            os.rename(ckpt_dir / tag, ckpt_dir / f".bad-{tag}")
    barrier()
    if skipped:
        raise ResumeError(f"{ckpt_dir}: no complete checkpoint to resume from: "
                          + "; ".join(f"{t} ({why})" for t, why in skipped)
                          + " (moved aside as .bad-<tag>); start the stage afresh without --resume")
    return None


def load_resume(engine, ckpt_dir: Path, *, stage: str, log=print) -> LoopState | None:
    """Load the newest complete resume checkpoint of ``stage`` into ``engine``; None if there is none."""
    recover_best(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    tag = newest_complete(ckpt_dir, stage=stage, log=log)
    if tag is None:
        return None
    folder = ckpt_dir / tag
    verify_data_only(folder)
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as e:  # noqa: BLE001 - a file the manifest vouched for still failed to load
        raise ResumeError(f"{folder}: could not be loaded ({type(e).__name__}: {e})") from None
    if path is None or client is None or client.get("stage") != stage:
        raise ResumeError(f"{folder}: not a resume checkpoint of stage {stage!r}")
    _set_rng_state(load_data(folder / f"rng_rank{rank()}.pt", numpy_arrays=True))
    loop = folder / LOOP
    return LoopState.from_json(loop.read_text()) if loop.is_file() else LoopState(**client["loop"])


# The parts of a config the source weights depend on: a joint stage started from another run's
# source stage needs them equal (``train.init_from``).
_WEIGHTS_KEYS = ("model", "data.name", "data.domains", "data.source")
# The evaluation protocol the carried-over source metrics were measured under: equal too, so one
# metrics.json never mixes two protocols under the same keys.
_PROTOCOL_KEYS = tuple(f"eval.{k}" for k in PROTOCOL_FIELDS)


def source_of(run: Path, cfg) -> tuple[Path, StageRecord]:
    """The best-weights folder of ``run``'s finished source stage, for ``cfg``'s joint stage, and
    that run's source stage record; ResumeError naming the file when it is missing, unfinished or
    built with another model or data config (checked before any training)."""
    ckpt = run / "source" / "checkpoints"
    metrics, conf = run / "metrics.json", run / "config.yaml"
    for path in (ckpt / BEST, metrics, conf):
        if not path.exists():
            raise ResumeError(f"train.init_from: {path} does not exist (not a run folder with a source stage?)")
    source = RunRecord.load(metrics).stages.get("source")
    if source is None or not source.done:
        raise ResumeError(f"train.init_from: {metrics} has no finished source stage")
    check_same_config(conf, cfg, "train.init_from", protocol=True)
    return ckpt, source


def check_same_config(conf: Path, cfg, what: str, *, protocol: bool) -> None:
    """ResumeError naming ``conf`` (a run's saved config.yaml) and the first key where it differs
    from ``cfg`` in what its weights depend on (model and data) or, with ``protocol``, in what its
    metrics depend on (``eval.num_negatives``, ``eval.seed``, ``eval.prior``, ``eval.transition``)."""
    theirs, ours = flatten(yaml.safe_load(conf.read_text()), sep="."), flatten(to_dict(cfg), sep=".")
    # a key added to the config tree after that run was made: it ran with the key's default then
    legacy = {f"eval.{k}": v for k, v in LEGACY_PROTOCOL.items()}
    theirs = {**flatten(to_dict(type(cfg)()), sep="."), **legacy, **theirs}
    for key in sorted(ours):
        if key.startswith(_WEIGHTS_KEYS) and theirs.get(key) != ours[key]:
            raise ResumeError(f"{what}: {conf} has {key}={theirs.get(key)!r}, this run {ours[key]!r}; "
                              "its weights need the same model and data")
        if protocol and key in _PROTOCOL_KEYS and theirs.get(key) != ours[key]:
            raise ResumeError(f"{what}: {conf} has {key}={theirs.get(key)!r}, this run {ours[key]!r}; "
                              "its metrics were measured under another evaluation protocol")
