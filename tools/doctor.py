"""``xdrec doctor``: what this machine gives xdrec, read without starting anything. Versions of the
stack, CUDA and NCCL, the DeepSpeed op cache (built, building, a stale lock), the W&B mode a run
would take, the launch environment and the Slurm commands on PATH."""
from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata

PACKAGES = ("torch", "deepspeed", "accelerate", "webdataset", "wandb", "transformers", "pydantic")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def accelerator() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": "not available", "device": "cpu (DeepSpeed with gloo, DS_ACCELERATOR=cpu)"}
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "unknown"
    return {"cuda": torch.version.cuda, "devices": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0),
            "nccl": nccl, "bf16": torch.cuda.is_bf16_supported()}


def op_cache() -> dict:
    """Each op folder of the DeepSpeed/torch extension cache: built (a .so), and its lock's state."""
    from train.ops import cache_root, lock_state, use_venv_cache

    use_venv_cache()
    root = cache_root()
    ops = {}
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        state, pids = lock_state(folder)
        built = any(folder.glob("*.so"))
        lock = {"none": "", "building": f", being built by pid {pids}",
                "idle": ", a lock nobody builds behind (the next run removes it)"}[state]
        ops[folder.name] = ("built" if built else "not built") + lock
    return {"root": str(root), "ops": ops or "none built yet (the first run builds deepspeed_shm_comm, about a minute)"}


def tracking() -> str:
    from train.tracking import _has_api_key

    mode = os.environ.get("WANDB_MODE")
    if mode:
        return f"{mode} (WANDB_MODE)"
    return "online (an API key is configured)" if _has_api_key() else "offline (no API key: runs/<name>/wandb, then wandb sync)"


def launch() -> str:
    from launch.env import LaunchError, detect

    try:
        env = detect()
    except LaunchError as e:
        return f"error: {e}"
    return f"{env.launcher}: rank {env.rank} of {env.world_size}" + (
        f", master {env.master_addr}:{env.master_port}" if env.world_size > 1 else "")


def which(command: str) -> str:
    """A command on PATH or beside this Python (the virtual environment's bin, not activated)."""
    return shutil.which(command) or shutil.which(command, path=os.path.dirname(sys.executable)) or "not found"


def report() -> dict:
    return {"versions": versions(), "accelerator": accelerator(), "deepspeed_op_cache": op_cache(),
            "wandb": tracking(), "launch": launch(),
            "slurm": {c: which(c) for c in ("sbatch", "srun", "scontrol")},
            "torchrun": which("torchrun"), "accelerate": which("accelerate")}


def format_doctor(r: dict, indent: str = "") -> str:
    lines = []
    for key, value in r.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(format_doctor(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)
