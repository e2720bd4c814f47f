"""``memory`` (live bytes per ZeRO stage against ``xdrec plan``) and ``xl`` (the 1.02B model at ZeRO-3)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

from tools.bench.common import MID, SMALL_BATCH, goal, run_steps


def _memory_rows(config: str, stages: str, overrides: list[str]) -> dict[int, dict]:
    """``tools.memory`` rows by ZeRO stage (rank 0's; the ranks hold the same)."""
    from tools.memory import measure_apart

    rows = measure_apart(config, [int(z) for z in stages.split(",")], 2, overrides)
    return {r["zero_stage"]: r for r in rows if r["rank"] == 0}


def _predicted_states(config: str, overrides: list[str], zero: int) -> int:
    from train.config import load_config
    from train.engine import ModelSize
    from tools.plan import estimate, vocabulary
    from train.stages import build_model

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        size = ModelSize.of(build_model(cfg, vocabulary(cfg)))
    return estimate(size, zero=zero, precision=cfg.train.precision, world=2, offload=False).states


def bench_memory(args) -> dict:
    """Live tensors per rank after a step, 2 ranks, each stage in fresh processes."""
    from tools.plan import STATE_BYTES

    cases = {"base fp32": ("configs/experiment/demo.yaml", ["train.precision=fp32"], "0,1,2,3"),
             "mid fp32": ("configs/experiment/demo.yaml", [*MID, "train.precision=fp32"], "0,1,2,3"),
             "mid bf16": ("configs/experiment/demo.yaml", [*MID, "train.precision=bf16"], "0,1,2,3"),
             "large fp32": ("configs/experiment/large.yaml", ["train.precision=fp32"], "0,1,2,3"),
             "large bf16": ("configs/experiment/large.yaml", ["train.precision=bf16"], "0,1,2,3"),
             "xl bf16": ("configs/experiment/xl.yaml", ["train.precision=bf16"], "3")}
    table, goals = {}, []
    for name, (config, over, stages) in cases.items():
        over = [*over, *SMALL_BATCH, f"data.out_dir={args.data}"]
        rows = _memory_rows(config, stages, over)
        n = next(iter(rows.values()))["model_elements"]
        table[name] = {f"zero{z}": {"live_mib": r["live_tensor_bytes"] / 2 ** 20, "peak_rss_mib": r["peak_rss_bytes"] / 2 ** 20,
                                    "bytes_per_param": r["live_tensor_bytes"] / n,
                                    "predicted_mib": _predicted_states(config, over, z) / 2 ** 20}
                       for z, r in rows.items()}
        table[name]["params"] = n
        goals += _memory_goals(name, table[name], n, STATE_BYTES)
    return {"table": table, "goals": goals}


def _memory_goals(name: str, t: dict, n: int, state_bytes: dict) -> list[dict]:
    out = []
    stages = [z for z in range(4) if f"zero{z}" in t]
    if 0 in stages and n >= 50e6:
        worst = max(t[f"zero{z}"]["live_mib"] / t["zero0"]["live_mib"] for z in stages if z)
        out.append(goal(f"{name}: largest ZeRO-1/2/3 / ZeRO-0 live bytes ({n / 1e6:.0f}M params)", worst, "<= 1.0",
                        worst <= 1.0))
    if name == "large bf16":
        r = t["zero3"]["live_mib"] / t["zero0"]["live_mib"]
        out.append(goal("large bf16: ZeRO-3 / ZeRO-0 live bytes", r, "<= 0.6", r <= 0.6))
    if name.endswith("fp32") and n >= 50e6:
        for z in stages:
            rep, part = state_bytes[("fp32", z)]
            stated = rep + part / 2
            got = t[f"zero{z}"]["bytes_per_param"]
            out.append(goal(f"{name}: ZeRO-{z} bytes per parameter vs {stated:g} stated", got / stated, "0.9 - 1.1",
                            0.9 <= got / stated <= 1.1))
    if name.startswith(("base", "large")):
        for z in stages:
            r = t[f"zero{z}"]["live_mib"] / t[f"zero{z}"]["predicted_mib"]
            out.append(goal(f"{name}: ZeRO-{z} measured / xdrec plan", r, "0.75 - 1.25", 0.75 <= r <= 1.25))
    return out


def _rank_memory() -> int:
    """Each of 2 ranks' share of this machine's RAM, 2 GiB left to the system: the xl part's cap."""
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - 2 * 2 ** 30) // 2


def bench_xl(args) -> dict:
    """The xl preset at ZeRO-3 on 2 ranks (a few steps on one batch: the loss must fall), where
    ``xdrec plan`` says ZeRO-0 does not fit a rank's share of this machine's RAM; ZeRO-0 under that
    cap (RLIMIT_AS on each process) must fail with one out-of-memory line, not a silent kill."""
    from train.config import load_config
    from train.engine import ModelSize
    from tools.plan import estimate, vocabulary
    from train.stages import build_model

    over = ["train.micro_batch_size=1", "model.max_len=8", "train.source.lr=0.00003", "train.warmup_steps=1",
            f"data.out_dir={args.data}"]
    cfg = load_config("configs/experiment/xl.yaml", over)
    with torch.device("meta"):
        size = ModelSize.of(build_model(cfg, vocabulary(cfg)))
    cap = _rank_memory()
    z0 = estimate(size, zero=0, precision="bf16", world=2, offload=False).device
    rows = run_steps("configs/experiment/xl.yaml", 3, over, steps=args.xl_steps, warmup=0, same_batch=True)
    losses = rows[0]["losses"]
    capped = _capped_zero0(over, cap)
    return {"params": size.params, "memory_per_rank_gib": cap / 2 ** 30, "plan_zero0_per_rank_gib": z0 / 2 ** 30,
            "losses": losses, "step_s": [r["step_s"] for r in rows],
            "peak_rss_gib": [r["peak_rss_bytes"] / 2 ** 30 for r in rows], "zero0_capped": capped, "goals": [
                goal("xl: xdrec plan ZeRO-0 bytes per rank / a rank's RAM (must not fit)", z0 / cap, "> 1", z0 > cap),
                goal("xl ZeRO-3, 2 ranks: last / first loss on one batch", losses[-1] / losses[0], "< 1",
                     losses[-1] < losses[0]),
                goal("xl ZeRO-3: largest peak RSS / a rank's RAM", max(r["peak_rss_bytes"] for r in rows) / cap, "< 1",
                     max(r["peak_rss_bytes"] for r in rows) < cap),
                goal("xl ZeRO-0 under the cap: one out-of-memory line", float(capped["oom_line"]), "1",
                     capped["oom_line"])]}


def _capped_zero0(over: list[str], cap: int) -> dict:
    import resource as rs

    def limit():  # every process of the run (torchrun and its ranks) may map at most ``cap`` bytes
        rs.setrlimit(rs.RLIMIT_AS, (cap, cap))

    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "train.cli", "train", "configs/experiment/xl.yaml", "train.zero_stage=0",
                            f"runs_dir={tmp}", "train.stop_after_steps=1", *over], capture_output=True, text=True,
                           timeout=3600, preexec_fn=limit, env={**os.environ, "WANDB_MODE": "disabled"})
    lines = [x for x in p.stderr.splitlines() if x.startswith("xdrec: error:")]
    return {"returncode": p.returncode, "error_lines": lines,
            "oom_line": bool(lines) and all("ran out of memory" in x for x in lines)}
