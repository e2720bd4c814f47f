"""``step`` (the DeepSpeed path vs a plain PyTorch loop) and ``zero`` (ZeRO-2/3 vs ZeRO-0 step time)."""
from __future__ import annotations


import torch

from train.data.stream import train_batches
from tools.bench.common import _median_time, goal, median_step, run_steps


def _plain_step(model, opt, batch: dict, clip: float) -> None:
    from model.losses import weighted_domain_mean

    sums, counts = model(batch["items"], targets=batch["targets"])
    weighted_domain_mean(sums, counts, [1.0, 1.0]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_step(args) -> dict:
    """One process, the demo experiment's model and one batch: DeepSpeed (ZeRO-0) vs plain AdamW."""
    from train.config import load_config
    from train.data.prepare import ensure_prepared
    from train.engine import build_engine, setup_distributed, teardown_distributed
    from train.loop import train_step
    from train.stages import build_model

    cfg = load_config("configs/experiment/demo.yaml", [f"data.out_dir={args.data}"])
    _, device = setup_distributed()
    manifest = ensure_prepared(cfg.data, log=lambda *_: None)[0]
    t = cfg.train.for_stage("source")
    batch = next(iter(train_batches(manifest, cfg.data.prepared_dir(), "A", batch_size=t.micro_batch_size,
                                    max_len=cfg.model.max_len, seed=0, epoch=0, buffer=100)))
    model = build_model(cfg, manifest).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.source.lr, weight_decay=t.weight_decay)
    plain = _median_time(lambda: _plain_step(model, opt, batch, t.grad_clip), args.steps)
    _, engine = build_engine(lambda: build_model(cfg, manifest), train=t, stage=t.source, total_steps=10 ** 6,
                             world_size=1)
    ds = _median_time(lambda: float(train_step(engine, batch, [1.0, 1.0], device).value), args.steps)
    teardown_distributed()
    return {"plain_step_s": plain, "deepspeed_step_s": ds, "goals": [
        goal("DeepSpeed ZeRO-0 / plain AdamW step time, 1 process", ds / plain, "<= 1.15", ds / plain <= 1.15)]}


def bench_zero(args) -> dict:
    """2 ranks: median step time of ZeRO-2 and ZeRO-3 over ZeRO-0, for base and large."""
    out, goals = {}, []
    models = {"base": ("configs/experiment/demo.yaml", []),
              "large": ("configs/experiment/large.yaml", ["train.precision=fp32", "train.micro_batch_size=2",
                                                          "model.max_len=10"])}
    for name, (config, over) in models.items():
        over = [*over, f"data.out_dir={args.data}"]
        t = {z: median_step(run_steps(config, z, over, steps=args.steps)) for z in (0, 2, 3)}
        out[name] = {f"zero{z}_step_s": v for z, v in t.items()}
        for z in (2, 3):
            goals.append(goal(f"{name}: ZeRO-{z} / ZeRO-0 step time, 2 ranks", t[z] / t[0], "<= 1.5", t[z] / t[0] <= 1.5))
    return {**out, "goals": goals}
