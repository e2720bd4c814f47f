"""DeepSpeed's configuration, generated from the typed config (its one source of truth): ZeRO stage,
precision, batch and clipping, the ZeRO buffers sized from each rank's partition, and the checks
that launcher flags and a user JSON agree with it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from train.config import TrainConfig


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
        blocks = [sum(n(p) for p in m.parameters()) for m in getattr(model, "blocks", list)()]
        return cls(sum(sizes), max(sizes, default=0), max(blocks + [max(sizes, default=0)]))


def zero_settings(size: ModelSize, *, stage: int, world_size: int, cuda: bool) -> dict:
    """ZeRO's buffers sized from each rank's partition and the model's blocks, not from the model.

    Measured here (2 gloo ranks, d 1024 x 12 blocks, 156M parameters, bf16; ``python -m
    tools.memory``, live tensors after a step): ZeRO-3's states are 1,192 MiB a rank; its reduce
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
        "torch_autocast": {"enabled": train.autocast != "off", "dtype": "bfloat16"},
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
          "fp16.enabled": "train.precision", "torch_autocast.enabled": "train.autocast",
          "zero_optimization.offload_optimizer.device": "train.offload_optimizer"}


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

