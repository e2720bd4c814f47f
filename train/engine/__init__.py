"""The one place that knows about distribution, split by concern:

- ``train.engine.dist``: the process group (``setup_distributed()`` for whatever launched us: a
  single debug process is rank 0 of 1 on gloo/NCCL too, so one code path runs everywhere) and the
  collectives the library uses, the loss normalised over the global batch among them;
- ``train.engine.zero``: the DeepSpeed JSON generated from the typed config, ZeRO buffers sized
  from each rank's partition, launcher flags checked against it;
- ``train.engine.optim``: AdamW's parameter groups and the warmup + cosine schedule (times a
  plateau scale the loop may lower);
- ``train.engine.build``: ``build_engine(model, *, ...)`` wraps a pure-torch model in a DeepSpeed
  engine (partitioned from the start under ZeRO-3), torch's AdamW passed in (no op compile).

Everything is imported from here (``from train.engine import ...``).
"""
from __future__ import annotations

import os

import torch

from train.ops import use_venv_cache

if not torch.cuda.is_available():
    # Must precede the first ``import deepspeed``: it picks its accelerator at import.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
use_venv_cache()

from train.engine.build import build_engine, construct, grads_finite, step_skipped, warm_ops  # noqa: E402
from train.engine.dist import (all_gather_objects, all_ranks, barrier, domain_means, exit_now_if_distributed,  # noqa: E402
                               gather_arrays, global_domain_loss, loss_value, max_over_ranks, rank,
                               return_large_frees, setup_distributed, sum_over_ranks, teardown_distributed,
                               world_size)
from train.engine.optim import Schedule, parameter_groups, set_lr_scale, warmup_cosine  # noqa: E402
from train.engine.zero import (LaunchConflict, ModelSize, check_launcher_settings, deepspeed_config,  # noqa: E402
                               merge_user_deepspeed_config, zero_settings)

__all__ = ["build_engine", "construct", "grads_finite", "step_skipped", "warm_ops", "all_gather_objects", "all_ranks",
           "barrier", "domain_means", "exit_now_if_distributed", "gather_arrays", "global_domain_loss", "loss_value",
           "max_over_ranks", "rank", "return_large_frees", "setup_distributed", "sum_over_ranks",
           "teardown_distributed", "world_size", "Schedule", "parameter_groups", "set_lr_scale", "warmup_cosine",
           "LaunchConflict", "ModelSize", "check_launcher_settings", "deepspeed_config", "merge_user_deepspeed_config",
           "zero_settings"]
