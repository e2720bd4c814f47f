"""Environment detection for the ways xdrec is started.

- single process (``xdrec train``): no RANK/WORLD_SIZE; we act as rank 0 of 1 and pick a free port.
- torchrun / ``accelerate launch``: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set.
- Slurm ``srun`` (one task per process): SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS,
  which only a job step has (a bare ``python`` in the batch script sees SLURM_NTASKS of the
  allocation but is one process). MASTER_ADDR/MASTER_PORT come from the sbatch script
  (``slurm/job.sh``: first host of the allocation, a port derived from the job id); a step over
  more than one node without them is an error.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The launcher's variables do not describe a runnable process group."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "single" | "torchrun" | "accelerate" | "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(environ: dict | None = None) -> DistEnv:
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in e) else "torchrun"
        return DistEnv(int(e["RANK"]), int(e.get("LOCAL_RANK", 0)), int(e["WORLD_SIZE"]),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_PROCID" in e and int(e.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        if "MASTER_ADDR" not in e and int(e.get("SLURM_STEP_NUM_NODES", "1")) > 1:
            raise LaunchError("srun step over several nodes without MASTER_ADDR: start it from "
                               "slurm/train.sbatch or slurm/multinode.sbatch, or export MASTER_ADDR/MASTER_PORT")
        return DistEnv(int(e["SLURM_PROCID"]), int(e.get("SLURM_LOCALID", 0)), int(e["SLURM_STEP_NUM_TASKS"]),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def export(env: DistEnv) -> None:
    """Write the variables torch.distributed's env:// init and WebDataset's splitters read."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
