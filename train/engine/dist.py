"""The process group: set up and torn down for whatever launched us, and the few collectives the
library uses (reductions of flags and counts, object and array gathers, the global loss
normalisation over ranks)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from launch.env import DistEnv, detect, export
from model.losses import weighted_domain_mean


MMAP_THRESHOLD = 4 << 20


def return_large_frees() -> None:
    """glibc: serve allocations of 4 MiB and more from their own mappings, returned to the system
    when freed. By default glibc raises that threshold after each such free, so the transient
    buffers of construction and the optimizer's first step stay in the process's heap: measured
    at 156M parameters, bf16, 2 ranks, ZeRO-3 peaked at 2,697 MiB RSS (0.78x of ZeRO-0) with
    1,208 MiB of live tensors; with this, 1,943 MiB (0.58x). A no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def setup_distributed() -> tuple[DistEnv, torch.device]:
    """Initialise the default process group once; return (who am I, my device)."""
    return_large_frees()
    env = detect()
    export(env)
    if torch.cuda.is_available():
        # Slurm may bind one GPU per task (then each process sees only "its" GPU as cuda:0).
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env, device


def teardown_distributed() -> None:
    """Every rank reaches here before the group goes, so no rank tears down under another's collective."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_now_if_distributed(code: int) -> None:
    """Under a multi-process launcher, end the process without C++ static destructors (after
    :func:`teardown_distributed`; every file and the W&B run closed by then, output flushed here).

    Why: gloo's and DeepSpeed's communication objects are still referenced from module globals
    (``deepspeed.comm``'s backend, ZeRO's groups) after ``destroy_process_group``, so their
    worker threads are destroyed during interpreter finalisation, in no fixed order with the
    thread pools they wait on; a rank then aborted ("terminate called without an active
    exception", SIGABRT) about once in ten runs, turning a finished run into a failed one.
    Every multi-rank entry point (the CLI, the tools, the test scripts) ends through here."""
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _rank0_print(line: str) -> None:
    if rank() == 0:
        print(line, flush=True)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _reduce(values: list[int], op) -> list[int]:
    """All-reduce a few integers; on the device the backend needs (NCCL reduces CUDA tensors only)."""
    if world_size() == 1:
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.long, device=dev)
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def max_over_ranks(values: list[int]) -> list[int]:
    """Element-wise maximum over ranks, identical on every rank (one tiny all-reduce)."""
    return _reduce(values, dist.ReduceOp.MAX)


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (one tiny all-reduce; keeps ranks in step)."""
    return not max_over_ranks([int(not flag)])[0]


def sum_over_ranks(value: int) -> int:
    return _reduce([value], dist.ReduceOp.SUM)[0]


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; identical on all ranks."""
    if world_size() == 1:
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_arrays(local: dict) -> dict:
    """Concatenate every rank's numpy arrays key by key (rank order); identical on all ranks."""
    if world_size() == 1:
        return local
    parts = all_gather_objects(local)
    import numpy as np

    return {k: np.concatenate([p[k] for p in parts]) for k in local}


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def global_domain_loss(sums: list[torch.Tensor], counts: torch.Tensor, weights: list[float]):
    """The seed's L = sum_d w_d * mean CE_d with the means over the *global* batch.

    Per-domain target counts (and the detached CE sums) are all-reduced; each rank's loss is
    ``world * sum_d w_d * local_sum_d / global_count_d``, so after DeepSpeed averages gradients
    over ranks the step equals the single-process step on the global batch, even when a rank's
    batch holds no row of a domain. Returns ``(loss to backprop, stats)``: ``stats`` ``[2, n]``,
    the global per-domain CE sums and target counts, stay on the device (nothing is read on the
    host here; see :func:`loss_value` and :func:`domain_means`).
    """
    world = world_size()
    stats = torch.cat([torch.stack([s.detach().float() for s in sums]), counts.float()])
    if world > 1:
        dist.all_reduce(stats)
    n = len(sums)
    loss = weighted_domain_mean(sums, stats[n:], weights, scale=world)
    return loss, stats.view(2, n)


def domain_means(stats: torch.Tensor) -> torch.Tensor:
    """``[n]`` float32: each domain's mean CE of a global batch (nan where it had no target)."""
    return stats[0] / stats[1]


def loss_value(stats: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """0-dim float64 on the device: sum_d w_d * mean CE_d over the domains with targets."""
    means = domain_means(stats).double()
    value = torch.zeros((), dtype=torch.float64, device=stats.device)
    for d, w in enumerate(weights):
        value = value + torch.where(stats[1, d] > 0, w * means[d], 0.0)
    return value

