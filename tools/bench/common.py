"""What every part shares: goals, subprocess helpers, the 2-rank step-time worker."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from train.data.prepare import load_manifest
from train.data.stream import train_batches


MID = ["model.d_model=768", "model.n_layers=8", "model.n_heads=8"]  # the 60M model


SMALL_BATCH = ["train.micro_batch_size=1", "model.max_len=10"]  # memory: states, not activations


def goal(name: str, value: float, target: str, ok: bool) -> dict:
    """A measured figure against its goal; ``target`` "recorded" is a figure without a threshold,
    shown as recorded (``ok`` None), never as a goal met."""
    return {"goal": name, "value": round(value, 4), "target": target, "ok": None if target == "recorded" else bool(ok)}


def verdict(g: dict) -> str:
    """How a goal reads in a table: yes, NO, or recorded (no threshold)."""
    return "recorded" if g["ok"] is None else "yes" if g["ok"] else "NO"


def _python(*args: str, timeout: int = 3600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "WANDB_MODE": "disabled", **(env or {})}, **kw)
    return p


def _torchrun(*args: str, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args, **kw)


def steps_worker(argv: list[str]) -> None:
    """``python -m tools.bench _steps <experiment> --zero Z --steps N [--same-batch] --out F [overrides]``:
    N measured training steps (after 2 warm-up steps) of the experiment's source stage; rank 0
    writes every rank's step times, losses and peak RSS as JSON."""
    from train.engine import (all_gather_objects, barrier, build_engine, setup_distributed,
                              teardown_distributed)
    from train.loop import train_step
    from train.config import load_config
    from train.data.prepare import ensure_prepared
    from train.stages import build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--same-batch", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(a.config, [*a.overrides, f"train.zero_stage={a.zero}"])
    env, device = setup_distributed()
    manifest = ensure_prepared(cfg.data, log=lambda *_: None)[0] if env.is_main else None
    barrier()
    manifest = manifest or load_manifest(cfg.data.prepared_dir(), verify=False)
    t = cfg.train.for_stage("source")
    _, engine = build_engine(lambda: build_model(cfg, manifest), train=t, stage=cfg.train.source,
                             total_steps=a.steps + a.warmup, world_size=env.world_size)
    stream = iter(train_batches(manifest, cfg.data.prepared_dir(), cfg.data.source, batch_size=t.micro_batch_size,
                                max_len=cfg.model.max_len, seed=0, epoch=0, buffer=100))
    first = next(stream)
    times, losses = [], []
    for k in range(a.warmup + a.steps):
        batch = first if a.same_batch or k == 0 else next(stream, first)
        t0 = time.perf_counter()
        step = train_step(engine, batch, [1.0, 1.0], device)
        losses.append(float(step.value))  # waits for the step to finish (on a GPU) before the clock stops
        if k >= a.warmup:
            times.append(time.perf_counter() - t0)
    row = {"rank": env.rank, "zero": a.zero, "step_s": times, "losses": losses,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rows = all_gather_objects(row)
    if env.is_main:
        Path(a.out).write_text(json.dumps(rows))
    teardown_distributed()


def run_steps(config: str, zero: int, overrides: list[str], *, steps: int = 10, warmup: int = 2, nproc: int = 2,
              same_batch: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        p = _torchrun("-m", "tools.bench", "_steps", config, "--zero", str(zero), "--steps", str(steps), "--warmup",
                      str(warmup), "--out", str(out), *(["--same-batch"] if same_batch else []), *overrides,
                      nproc=nproc)
        if p.returncode:
            raise RuntimeError(f"steps at ZeRO-{zero} failed:\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def median_step(rows: list[dict]) -> float:
    """The slowest rank's median step time (ranks wait for each other)."""
    return max(statistics.median(r["step_s"]) for r in rows)


def _median_time(fn, steps: int, warmup: int = 5) -> float:
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
