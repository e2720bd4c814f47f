"""The one place that knows about distribution: process group, device, DeepSpeed engine.

``setup_distributed()`` initialises torch.distributed for whatever launched us (a single debug
process is rank 0 of 1 on gloo/NCCL too, so the same code path runs everywhere) and
``build_engine(model, *, ...)`` wraps a pure-torch model in a DeepSpeed engine whose config is
generated from the typed config: ZeRO stage, precision, micro batch, accumulation, clipping.
The optimizer is torch's AdamW passed in (no op compile) with a warmup + cosine schedule
(times a plateau decay the loop may lower).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from launch.env import DistEnv, detect, export
from model.encoder import Block, Encoder
from model.losses import weighted_domain_mean
from train.config import StageConfig, TrainConfig
from train.ops import clear_stale_build_locks, op_build_message, use_venv_cache

if not torch.cuda.is_available():
    # Must precede the first ``import deepspeed``: it picks its accelerator at import.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
use_venv_cache()


class LaunchConflict(ValueError):
    """``accelerate launch`` was given a setting that disagrees with the typed config."""


def check_launcher_settings(train: TrainConfig, environ: dict | None = None) -> None:
    """The typed config is the one source of truth; ``accelerate launch`` flags may repeat it but
    never contradict it. Each flag accelerate passes on (as ACCELERATE_* variables) is compared
    with its key; a mismatch is an error naming both. ``--mixed_precision no`` is accelerate's
    default and so counts as unspecified. A ``--deepspeed_config_file`` is refused: xdrec
    generates the DeepSpeed JSON from ``train.*``.
    """
    e = os.environ if environ is None else environ
    checks = [
        ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "--zero_stage", "train.zero_stage", str(train.zero_stage)),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "--gradient_accumulation_steps", "train.grad_accum",
         str(train.grad_accum)),
    ]
    for var, flag, key, ours in checks:
        if var in e and e[var] != ours:
            raise LaunchConflict(f"accelerate launch {flag} {e[var]} disagrees with {key}={ours}; "
                                 f"set {key}={e[var]} or drop the flag")
    clip = e.get("ACCELERATE_GRADIENT_CLIPPING")
    if clip not in (None, "none") and float(clip) != train.grad_clip:
        raise LaunchConflict(f"accelerate launch --gradient_clipping {clip} disagrees with "
                             f"train.grad_clip={train.grad_clip}")
    mp = e.get("ACCELERATE_MIXED_PRECISION", "no")
    if mp != "no" and mp != train.precision:
        raise LaunchConflict(f"accelerate launch --mixed_precision {mp} disagrees with "
                             f"train.precision={train.precision}")
    if e.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") not in (None, "none"):
        raise LaunchConflict(f"accelerate launch --deepspeed_config_file {e['ACCELERATE_DEEPSPEED_CONFIG_FILE']}: "
                             "xdrec generates the DeepSpeed config from train.*; drop the flag")


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


@dataclass(frozen=True)
class ModelSize:
    """What the ZeRO settings are derived from, counted on the meta device (no memory)."""

    params: int  # elements of every parameter
    largest_param: int  # the largest single parameter (the item table, or a block's feed-forward)
    largest_block: int  # the largest module directly holding parameters of a repeated unit (a Transformer block)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelSize":
        def n(p) -> int:
            return int(getattr(p, "ds_numel", p.numel()))
        sizes = [n(p) for p in model.parameters()]
        blocks = [sum(n(p) for p in m.parameters()) for m in model.modules() if isinstance(m, Block)]
        return cls(sum(sizes), max(sizes, default=0), max(blocks + [max(sizes, default=0)]))


def zero_settings(size: ModelSize, *, stage: int, world_size: int, cuda: bool) -> dict:
    """ZeRO's buffers sized from each rank's partition and the model's blocks, not from the model.

    Measured here (2 gloo ranks, d 1024 x 12 blocks, 156M parameters, bf16; ``python -m
    train.memory``, live tensors after a step): ZeRO-3's states are 1,192 MiB a rank; its reduce
    bucket, sized to the model before, added 298 MiB (1,491, 0.71x of ZeRO-0's 2,087), a bucket
    of a tenth of the partition adds 15 MiB (1,207, 0.58x). ZeRO-2 with the model-sized buckets
    held 2,385 MiB (1.14x), 1,193 with them.

    - ``reduce_bucket_size``/``allgather_bucket_size``: a tenth of the partition, between 1e6
      (fewer, larger messages for small models) and DeepSpeed's 5e8, a multiple of 4096.
    - ZeRO-3 ``stage3_max_live_parameters``: two blocks (the one computing and the next);
      ``stage3_max_reuse_distance``: one block (only the block backward starts with stays
      gathered between forward and backward); ``stage3_model_persistence_threshold``: at most
      1% of the partition stays gathered on every rank (small tensors: norms, biases);
      ``sub_group_size``: the optimizer steps a quarter of the partition at a time (its fp32
      gradient copy is that big).
    - gloo (CPU): no ``overlap_comm`` and no prefetch. With both on, a 2-rank ZeRO-3 run on gloo
      hung or aborted (mismatched collectives) about once in ten tiny runs (deepspeed 0.19.8);
      with both off, 20 of 20 completed, and neither buys speed on a CPU.
    - NCCL (GPU): ``overlap_comm`` on (reduction overlaps backward; it double-buffers the buckets,
      which the tenth-of-a-partition size keeps small) and ZeRO-3 prefetches two blocks ahead.
    """
    part = -(-size.params // world_size)
    bucket = int(min(5e8, max(1e6, part // 10))) // 4096 * 4096  # ZeRO-1/2 need a multiple of the alignment
    zero = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket, "overlap_comm": cuda}
    if stage == 3:
        block = max(size.largest_block, 1)
        zero.update({"stage3_max_live_parameters": int(max(2 * block, 1e6)),
                     "stage3_max_reuse_distance": int(max(block, 1e6)),
                     "stage3_prefetch_bucket_size": int(2 * block) if cuda else 0,
                     "stage3_model_persistence_threshold": int(max(part // 100, 1e5)),
                     "sub_group_size": int(min(1e9, max(1e6, part // 4)))})
    return zero


def deepspeed_config(train: TrainConfig, *, world_size: int, size: ModelSize) -> dict:
    """The DeepSpeed JSON, generated from the typed config (its one source of truth), its ZeRO
    buffers sized by :func:`zero_settings` from the model's ``size``."""
    zero = {"stage": train.zero_stage,
            **zero_settings(size, stage=train.zero_stage, world_size=world_size, cuda=torch.cuda.is_available())}
    if train.offload_optimizer:
        # ZeRO-Offload: optimizer states and step on the CPU; torch's AdamW steps there (no op build).
        zero["offload_optimizer"] = {"device": "cpu"}
    generated = {
        "train_batch_size": train.global_batch_size(world_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config:
        return merge_user_deepspeed_config(generated, train.deepspeed_config)
    return generated


# Keys of the generated config a user JSON may repeat but never change: they come from train.*.
_OWNED = {"train_batch_size": "train.micro_batch_size x train.grad_accum x world size",
          "train_micro_batch_size_per_gpu": "train.micro_batch_size",
          "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "train.grad_clip",
          "zero_optimization.stage": "train.zero_stage", "bf16.enabled": "train.precision",
          "fp16.enabled": "train.precision", "zero_optimization.offload_optimizer.device": "train.offload_optimizer"}


def merge_user_deepspeed_config(generated: dict, path: str) -> dict:
    """A user DeepSpeed JSON (``train.deepspeed_config``) adds tuning keys to the generated config;
    a key the typed config owns must agree with it (``"auto"`` is accepted), else ConfigError."""
    import json

    from train.config import ConfigError, deep_merge, flatten

    try:
        user = json.loads(open(path).read())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    ours = flatten(generated, sep=".")
    for key, val in flatten(user, sep=".").items():
        if key in _OWNED and val != "auto" and key in ours and val != ours[key]:
            raise ConfigError(f"{path}: '{key}' is {val!r} but {_OWNED[key]} gives {ours[key]!r}; "
                              "set it in the xdrec config (or 'auto') instead")
        if key in _OWNED and key not in ours and val not in ("auto", False, None):
            raise ConfigError(f"{path}: '{key}' is {val!r} but {_OWNED[key]} does not enable it")

    def drop_auto(d: dict) -> dict:  # "auto" keeps the generated value
        return {k: drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}

    return deep_merge(generated, drop_auto(user))


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The LR multiplier of step ``s``: ``warmup_cosine(s) * scale``. ``scale`` is the plateau
    decay so far (``set_lr_scale``); an object, not a lambda, so LambdaLR's state dict (and so a
    DeepSpeed checkpoint) carries it."""

    def __init__(self, *, warmup: int, total: int, scale: float = 1.0):
        self.warmup, self.total, self.scale = warmup, total, scale

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup=self.warmup, total=self.total) * self.scale


def set_lr_scale(scheduler, scale: float) -> None:
    """Set the plateau scale of a LambdaLR built on :class:`Schedule` and apply it at once: the
    optimizer's LR becomes ``base * warmup_cosine(current step) * scale``."""
    for f in scheduler.lr_lambdas:
        f.scale = scale
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)


def construct(build: Callable[[], torch.nn.Module], *, train: TrainConfig, world_size: int):
    """``build()`` the model as the engine will hold it; returns ``(model, DeepSpeed config)``. The
    model is counted on the meta device first (the ZeRO buffers are sized from it); under ZeRO-3
    it is then built inside ``deepspeed.zero.Init``, so each module is partitioned as soon as it
    exists and no rank ever holds the whole model."""
    import deepspeed

    clear_stale_build_locks()
    with torch.device("meta"):
        size = ModelSize.of(build())
    config = deepspeed_config(train, world_size=world_size, size=size)
    if dist.is_initialized():  # zero.Init reads the world from DeepSpeed's comm, which wraps ours
        with op_build_message(log=_rank0_print):
            deepspeed.init_distributed(dist_backend=dist.get_backend())
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=train.zero_stage == 3):
        model = build()
    return model, config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups as the field sets them: ``weight_decay`` on the weight matrices of linear
    layers only; none on biases, norms, embedding tables (items, positions, domains) or the item
    bias. Found by module type, so it holds for ZeRO-3's partitioned (0-sized) parameters too."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def build_engine(build: Callable[[], torch.nn.Module], *, train: TrainConfig, stage: StageConfig, total_steps: int,
                 world_size: int):
    """:func:`construct` the model and wrap it in a DeepSpeed engine (optimizer and schedule
    inside); returns ``(model, engine)``."""
    import deepspeed

    model, config = construct(build, train=train, world_size=world_size)
    opt = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=stage.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(warmup=train.warmup_steps, total=total_steps))
    with op_build_message(log=_rank0_print):  # DeepSpeed loads its comm op here where the above did not
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    if train.activation_checkpointing:  # every encoder of the model: the shared one and any view encoders
        for enc in model.modules():
            if isinstance(enc, Encoder):
                enc.checkpoint_blocks = True
    if train.zero_stage == 3 and hasattr(model, "embedding"):
        # The tied item table is used outside its own module's forward (output scores).
        deepspeed.zero.register_external_parameter(model, model.embedding.item.weight)
    return model, engine


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


def grads_finite(engine) -> torch.Tensor | bool:
    """Whether the accumulated gradients are finite (a 0-dim bool on the device, not read), where
    DeepSpeed does not check them itself before an optimizer step: ZeRO-0 (the gradients are the
    module's, identical on every rank after the all-reduce). ZeRO 1-3 and fp16 skip a step with an
    invalid gradient norm on their own (see :func:`step_skipped`); for them this is True."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or not grads:
        return True
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()


def step_skipped(engine, boundary: bool) -> bool:
    """DeepSpeed skipped the optimizer step just taken at an accumulation ``boundary`` because
    the gradient norm was not finite (not counted under fp16, whose loss scaling skips steps by
    design)."""
    return boundary and not engine.fp16_enabled() and not engine.was_step_applied()


def warm_ops() -> None:
    """Build DeepSpeed's CPU comm op once (about 45 s on a fresh machine), outside any test."""
    env, _ = setup_distributed()
    build_engine(lambda: torch.nn.Linear(2, 2), train=TrainConfig(micro_batch_size=1), stage=StageConfig(),
                 total_steps=1, world_size=env.world_size)
    teardown_distributed()


if __name__ == "__main__":
    warm_ops()
