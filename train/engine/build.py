"""The model built as the engine holds it (partitioned from the start under ZeRO-3) and wrapped in
a DeepSpeed engine with torch's AdamW and the schedule; what a step's outcome tells about skipped
steps and finite gradients."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from train.config import StageConfig, TrainConfig
from train.engine.dist import _rank0_print, setup_distributed, teardown_distributed
from train.engine.optim import Schedule, parameter_groups
from train.engine.zero import ModelSize, deepspeed_config
from train.ops import clear_stale_build_locks, op_build_message


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
    # What the model exposes (a Recommender does; a bare module, e.g. warm_ops's, has nothing to set)
    if train.activation_checkpointing:
        getattr(model, "set_activation_checkpointing", lambda on: None)(True)
    if train.zero_stage == 3:
        for p in getattr(model, "external_parameters", list)():
            deepspeed.zero.register_external_parameter(model, p)
    return model, engine


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
