"""``gpu``: step time, tokens/s and MFU on a CUDA machine (bench/gpu.sh)."""
from __future__ import annotations

import os

import torch

from model.recommender import training_loss_of
from tools.bench.common import goal, median_step, run_steps


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # bf16 dense


def train_flops(cfg, params_encoder: int, n_items_domain: int) -> float:
    """FLOPs of one training step (forward and backward): 6 per weight per token, the attention
    scores (12 x L x d per token and block) and the training softmax's logits."""
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * m.max_len
    candidates = training_loss_of(m, []).columns(n_items_domain, t.micro_batch_size)
    return tokens * (6 * params_encoder + 12 * m.n_layers * m.max_len * m.d_model + 6 * m.d_model * candidates)


def _peak_flops(dry: bool) -> tuple[float, str]:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12, "GPU_PEAK_TFLOPS"
    if dry or not torch.cuda.is_available():
        return 1e12, "nominal 1 TFLOP/s (dry run)"
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        raise SystemExit(f"bench gpu: no bf16 peak known for {name!r}; set GPU_PEAK_TFLOPS")
    return peak * 1e12, name


GPU_CASES = {"base": ("configs/experiment/demo.yaml", ["train.micro_batch_size=256"]),
             "large": ("configs/experiment/large.yaml", ["train.micro_batch_size=64"]),
             "xl": ("configs/experiment/xl.yaml", ["train.micro_batch_size=16"])}


DRY = ["train.precision=fp32", "train.micro_batch_size=2", "model.max_len=8", "model.d_model=32", "model.n_layers=1",
       "model.n_heads=2"]


def bench_gpu(args) -> dict:
    from train.config import load_config
    from tools.plan import count_parts, vocabulary
    from train.stages import build_model

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench gpu: no CUDA device here; bench/gpu.sh --dry-run checks the script on a CPU")
    nproc = 1 if dry else torch.cuda.device_count()
    peak, peak_of = _peak_flops(dry)
    out = {"gpus": nproc, "peak_flops": peak, "peak_of": peak_of, "cases": {}}
    for name, (config, over) in GPU_CASES.items():
        over = [*(DRY if dry else ["train.precision=bf16", *over]), f"data.out_dir={args.data}"]
        cfg = load_config(config, over)
        with torch.device("meta"):
            parts = count_parts(build_model(cfg, vocabulary(cfg)))
        flops = train_flops(cfg, parts["encoder"] + parts["heads"], max(d["n_items"] for d in vocabulary(cfg)["domains"]))
        for zero in (2, 3):
            step = median_step(run_steps(config, zero, over, steps=2 if dry else args.steps, warmup=1, nproc=nproc))
            tokens = cfg.train.micro_batch_size * cfg.model.max_len * nproc
            out["cases"][f"{name} zero{zero}"] = {"step_s": step, "tokens_per_s": tokens / step,
                                                  "mfu": flops * nproc / step / (peak * nproc)}
    out["goals"] = [goal(f"{k}: MFU (recorded)", v["mfu"], "recorded", v["tokens_per_s"] > 0)
                    for k, v in out["cases"].items()]
    return out
