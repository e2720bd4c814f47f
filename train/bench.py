"""Benchmarks behind ``make bench``: every performance goal measured as a ratio, in one run.

    python -m train.bench all [--out runs/bench]       every part; JSON in runs/bench/, a table beside the goals
    python -m train.bench step | zero | memory | xl | eval | vocab | stream | prepare

- ``step``: one process, the DeepSpeed path (ZeRO-0) vs a plain PyTorch AdamW loop of the same
  model and batch: median step time ratio.
- ``zero``: 2 ranks, ZeRO-2 and ZeRO-3 vs ZeRO-0 median step time (base and large models).
- ``memory``: 2 ranks, ``train.memory`` (each stage in fresh processes) for base, mid (60M),
  large (156M) in fp32 and bf16 and xl (ZeRO-3, bf16); ZeRO-k / ZeRO-0 live bytes, fp32 bytes
  per parameter against ``train.plan``'s counts, ``xdrec plan``'s prediction against the measure.
- ``xl``: the 1.02B model trains a few optimizer steps at ZeRO-3 on 2 ranks (loss, peak RSS per
  rank) where ``xdrec plan`` says ZeRO-0 cannot fit; ZeRO-0 under a per-process memory cap
  (``RLIMIT_AS``: this machine's RAM less 2 GiB, halved, a rank) fails with one out-of-memory line.
- ``eval``: full-ranking users/s of the chunked ranking vs a per-user loop; its time at 10k,
  100k and 1M items with the fitted exponent.
- ``vocab``: the 1M-item preset prepared, trained (sampled softmax) and evaluated; memory and
  step time at ZeRO-0/2/3 with the tied item table (gathered every forward under ZeRO-3).
- ``stream``: samples/s of the training stream vs raw tar iteration; ``prepare``: time and
  peak RSS of ``xdrec prepare`` on a generated CSV.

Timings are medians over steps after a warm-up; nothing here is a unit test.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from model.recommender import training_loss_of
from train.config import DataConfig, SyntheticConfig, TrainConfig
from train.data.prepare import load_manifest, prepare
from train.data.stream import ReaderOptions, shard_urls, train_batches

MID = ["model.d_model=768", "model.n_layers=8", "model.n_heads=8"]  # the 60M model
SMALL_BATCH = ["train.micro_batch_size=1", "model.max_len=10"]  # memory: states, not activations


def goal(name: str, value: float, target: str, ok: bool) -> dict:
    return {"goal": name, "value": round(value, 4), "target": target, "ok": bool(ok)}


def _python(*args: str, timeout: int = 3600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "WANDB_MODE": "disabled", **(env or {})}, **kw)
    return p


def _torchrun(*args: str, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args, **kw)


# -- the step worker (under torchrun) ---------------------------------------------------------


def steps_worker(argv: list[str]) -> None:
    """``python -m train.bench _steps <experiment> --zero Z --steps N [--same-batch] --out F [overrides]``:
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
        p = _torchrun("-m", "train.bench", "_steps", config, "--zero", str(zero), "--steps", str(steps), "--warmup",
                      str(warmup), "--out", str(out), *(["--same-batch"] if same_batch else []), *overrides,
                      nproc=nproc)
        if p.returncode:
            raise RuntimeError(f"steps at ZeRO-{zero} failed:\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def median_step(rows: list[dict]) -> float:
    """The slowest rank's median step time (ranks wait for each other)."""
    return max(statistics.median(r["step_s"]) for r in rows)


def raw_tar_rate(paths: list[str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for p in paths:
        with tarfile.open(p, "r|") as tar:
            for member in tar:
                f = tar.extractfile(member)
                if f is not None:
                    f.read()
                    n += 1
    return n, time.perf_counter() - t0


def wds_tar_rate(paths: list[str]) -> tuple[int, float]:
    """WebDataset's own tar iteration (samples grouped by key, nothing decoded), for reference."""
    import webdataset as wds

    t0 = time.perf_counter()
    n = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples()))
    return n, time.perf_counter() - t0


def stream_rate(manifest: dict, folder: Path, workers: int, buffer: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for b in train_batches(manifest, folder, "A", batch_size=256, max_len=50, seed=0, epoch=0, buffer=buffer,
                           reader=ReaderOptions(num_workers=workers)):
        n += len(b["user"])
    return n, time.perf_counter() - t0


def bench_stream(args) -> dict:
    work = Path(args.dir or tempfile.mkdtemp(prefix="xdrec-bench-"))
    cfg = DataConfig(name=f"bench-{args.users}", out_dir=str(work), shard_samples=2000,
                     synthetic=SyntheticConfig(n_users=args.users, items_per_domain=[5000, 5000],
                                               events_per_domain=[30, 10]))
    if not (cfg.prepared_dir() / "manifest.json").is_file():
        prepare(cfg, log=lambda *_: None)
    m = load_manifest(cfg.prepared_dir())
    paths = shard_urls(m, cfg.prepared_dir(), "A", "train")
    out = {"shards": len(paths), "samples": m["counts"]["A"]["train"]["samples"], "runs": {}}
    raw = max((raw_tar_rate(paths) for _ in range(args.repeat)), key=lambda r: r[0] / r[1])
    out["raw_tar_samples_per_s"] = raw[0] / raw[1]
    wds_raw = max((wds_tar_rate(paths) for _ in range(args.repeat)), key=lambda r: r[0] / r[1])
    out["webdataset_tar_samples_per_s"] = wds_raw[0] / wds_raw[1]
    buffer = TrainConfig().shuffle_buffer
    for w in [int(x) for x in args.workers.split(",")]:
        n, s = max((stream_rate(m, cfg.prepared_dir(), w, buffer) for _ in range(args.repeat)), key=lambda r: r[0] / r[1])
        rate = n / s
        out["runs"][f"workers={w}"] = {"samples_per_s": rate, "ratio_to_raw_tar": rate / out["raw_tar_samples_per_s"],
                                       "examples": n}
    r = max(v["ratio_to_raw_tar"] for v in out["runs"].values())
    out["goals"] = [goal("training stream / raw tar samples per s (best worker count)", r, ">= 0.5", r >= 0.5)]
    return out


def write_events_csv(path: Path, n_events: int, n_users: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp", "domain"])
        for k in range(n_events):
            d = "A" if rng.random() < 0.7 else "B"
            w.writerow([f"U{rng.randrange(n_users)}", f"{d}{int(rng.paretovariate(1.2)) % 200000}",
                        1_300_000_000 + rng.randrange(10**8), d])


def bench_prepare(args) -> dict:
    work = Path(args.dir or tempfile.mkdtemp(prefix="xdrec-bench-"))
    src = work / f"events-{args.events}.csv"
    if not src.is_file():
        t0 = time.time()
        write_events_csv(src, args.events, args.prepare_users)
        print(f"wrote {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.0f}s", flush=True)
    exp = work / "prepare.yaml"
    exp.write_text(json.dumps({"name": "bench-prepare", "data": {
        "name": f"bench-{args.events}", "format": "table", "path": str(src), "out_dir": str(work / "prepared"),
        "shard_samples": 5000}}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "train.cli", "prepare", str(exp)], capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(p.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    m = load_manifest(work / "prepared" / f"bench-{args.events}", verify=False)
    return {"events_read": m["read"]["events"], "events_kept": m["n_events"], "users_kept": m["n_users"],
            "wall_s": round(wall, 1), "peak_rss_mib": round(max(peak, before) / 1024), "log": p.stdout.strip()[-400:],
            "goals": [goal(f"prepare: events per s ({args.events:,} events, recorded)", m["read"]["events"] / wall,
                           "recorded", True)]}




# -- step: DeepSpeed path vs a plain PyTorch loop ---------------------------------------------


def _plain_step(model, opt, batch: dict, clip: float) -> None:
    from model.losses import weighted_domain_mean

    sums, counts = model(batch["items"], targets=batch["targets"])
    weighted_domain_mean(sums, counts, [1.0, 1.0]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _median_time(fn, steps: int, warmup: int = 5) -> float:
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


# -- memory -----------------------------------------------------------------------------------


def _memory_rows(config: str, stages: str, overrides: list[str]) -> dict[int, dict]:
    """``train.memory`` rows by ZeRO stage (rank 0's; the ranks hold the same)."""
    from train.memory import measure_apart

    rows = measure_apart(config, [int(z) for z in stages.split(",")], 2, overrides)
    return {r["zero_stage"]: r for r in rows if r["rank"] == 0}


def _predicted_states(config: str, overrides: list[str], zero: int) -> int:
    from train.config import load_config
    from train.engine import ModelSize
    from train.plan import estimate, vocabulary
    from train.stages import build_model

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        size = ModelSize.of(build_model(cfg, vocabulary(cfg)))
    return estimate(size, zero=zero, precision=cfg.train.precision, world=2, offload=False).states


def bench_memory(args) -> dict:
    """Live tensors per rank after a step, 2 ranks, each stage in fresh processes."""
    from train.plan import STATE_BYTES

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


# -- xl: a model no single process here can train ---------------------------------------------


def _rank_memory() -> int:
    """Each of 2 ranks' share of this machine's RAM, 2 GiB left to the system: the xl part's cap."""
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - 2 * 2 ** 30) // 2


def bench_xl(args) -> dict:
    """The xl preset at ZeRO-3 on 2 ranks (a few steps on one batch: the loss must fall), where
    ``xdrec plan`` says ZeRO-0 does not fit a rank's share of this machine's RAM; ZeRO-0 under that
    cap (RLIMIT_AS on each process) must fail with one out-of-memory line, not a silent kill."""
    from train.config import load_config
    from train.engine import ModelSize
    from train.plan import estimate, vocabulary
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


# -- eval: full ranking at growing vocabularies -----------------------------------------------


def _rank_time(n_items: int, users: int = 256, dim: int = 64, chunk: int = 65536) -> float:
    from model.scoring import Scorer, Scoring
    from train.evaluate import rank_in_chunks

    g = torch.Generator().manual_seed(0)
    table = torch.randn(n_items + 1, dim, generator=g)
    scorer = Scorer(torch.randn(users, dim, generator=g), table, None, 1, n_items + 1, Scoring())
    target = torch.randint(0, n_items, (users,), generator=g)
    negs = torch.randint(0, n_items, (users, 999), generator=g)
    t0 = time.perf_counter()
    rank_in_chunks(scorer, target, negs, None, chunk)
    return time.perf_counter() - t0


def _per_user_time(n_items: int, users: int = 64, dim: int = 64) -> float:
    """A per-user loop: each user's scores over every item, then its rank (the naive evaluator)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(n_items, dim, generator=g)
    q = torch.randn(users, dim, generator=g)
    target = torch.randint(0, n_items, (users,), generator=g)
    t0 = time.perf_counter()
    for u in range(users):
        s = table @ q[u]
        int((s >= s[target[u]]).sum())
    return time.perf_counter() - t0


def bench_eval(args) -> dict:
    sizes = [10_000, 100_000, 1_000_000]
    t = {n: min(_rank_time(n) for _ in range(2)) for n in sizes}
    slope = (math.log(t[sizes[-1]]) - math.log(t[sizes[0]])) / (math.log(sizes[-1]) - math.log(sizes[0]))
    batched = 256 / t[100_000]
    loop = 64 / min(_per_user_time(100_000) for _ in range(2))
    return {"seconds_per_256_users": t, "fitted_exponent": slope, "users_per_s_chunked": batched,
            "users_per_s_per_user_loop": loop, "goals": [
                goal("full ranking time ~ items^k (10k -> 1M items), k", slope, "<= 1.1", slope <= 1.1),
                goal("full ranking users/s: chunked batch / per-user loop (100k items)", batched / loop, ">= 5",
                     batched / loop >= 5)]}


# -- vocab: a million items per domain --------------------------------------------------------


def bench_vocab(args) -> dict:
    """Prepare, train (sampled softmax) and evaluate (chunked full ranking) the 1M-item preset;
    memory and step time at ZeRO-0/2/3 on 2 ranks (ZeRO-3 gathers the tied table every forward)."""
    config = "configs/experiment/vocab-1m.yaml"
    over = [f"data.out_dir={args.data}"]
    out: dict = {}
    t0 = time.time()
    p = _python("-m", "train.cli", "prepare", config, *over)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    out["prepare_s"] = time.time() - t0
    m = load_manifest(Path(args.data) / "synthetic-1m", verify=False)
    out["items_per_domain"] = {d["name"]: d["n_items"] for d in m["domains"]}
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.time()
        p = _python("-m", "train.cli", "train", config, *over, f"runs_dir={runs}", "tracking.wandb=false")
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        out["train_and_evaluate_s"] = time.time() - t0
        metrics = json.loads((Path(runs) / "vocab-1m" / "metrics.json").read_text())
    out["test_A"] = {k: metrics["source"]["test"]["A"][k] for k in ("full", "sampled999")}
    out["steps"] = metrics["_meta"]["source"]["steps"]
    small = [*over, "train.micro_batch_size=64"]
    mem = _memory_rows(config, "0,2,3", small)
    out["memory_mib"] = {f"zero{z}": {"live": r["live_tensor_bytes"] / 2 ** 20, "peak_rss": r["peak_rss_bytes"] / 2 ** 20}
                         for z, r in mem.items()}
    out["step_s"] = {f"zero{z}": median_step(run_steps(config, z, small, steps=args.steps)) for z in (0, 2, 3)}
    fewest = min(out["items_per_domain"].values())
    r3 = out["step_s"]["zero3"] / out["step_s"]["zero0"]
    m3 = out["memory_mib"]["zero3"]["peak_rss"] / out["memory_mib"]["zero0"]["peak_rss"]
    out["goals"] = [goal("1M vocabulary: fewest items of a domain (millions)", fewest / 1e6, ">= 1", fewest >= 1e6),
                    goal("1M vocabulary: full-ranking HR@10 of the trained model > 0", out["test_A"]["full"]["hr@10"],
                         "> 0", out["test_A"]["full"]["hr@10"] > 0),
                    goal("1M vocabulary: ZeRO-3 / ZeRO-0 step time (recorded)", r3, "recorded", True),
                    goal("1M vocabulary: ZeRO-3 / ZeRO-0 peak RSS (recorded)", m3, "recorded", True)]
    return out


# -- gpu: throughput and MFU on CUDA -----------------------------------------------------------

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
    from train.plan import count_parts, vocabulary
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


# -- all --------------------------------------------------------------------------------------

PARTS = {"step": bench_step, "zero": bench_zero, "memory": bench_memory, "xl": bench_xl, "eval": bench_eval,
         "vocab": bench_vocab}


def bench_all(args) -> dict:
    out = {}
    for name in args.parts.split(","):
        t0 = time.time()
        print(f"== bench {name} ==", flush=True)
        res = {"stream": bench_stream, "prepare": bench_prepare, **PARTS}[name](args)
        res["wall_s"] = time.time() - t0
        out[name] = res
        for g in res.get("goals", []):
            print(f"  {'ok ' if g['ok'] else 'MISS'} {g['goal']}: {g['value']} (goal {g['target']})", flush=True)
    return out


def table(results: dict) -> str:
    rows = [g for r in results.values() for g in r.get("goals", [])]
    w = max(len(g["goal"]) for g in rows) if rows else 10
    lines = [f"{'goal':<{w}}  {'value':>10}  {'target':<12} met", "-" * (w + 30)]
    lines += [f"{g['goal']:<{w}}  {g['value']:>10.4g}  {g['target']:<12} {'yes' if g['ok'] else 'NO'}" for g in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["_steps"]:
        from train.engine import exit_now_if_distributed

        steps_worker(sys.argv[2:])
        return exit_now_if_distributed(0)
    ap = argparse.ArgumentParser(prog="python -m train.bench")
    ap.add_argument("what", choices=["all", "stream", "prepare", "gpu", *PARTS])
    ap.add_argument("--dry-run", action="store_true", help="gpu: tiny sizes on the CPU, 1 process (checks the script)")
    ap.add_argument("--parts", default="step,zero,eval,memory,xl,vocab,stream,prepare", help="with all: which parts")
    ap.add_argument("--out", default="runs/bench", help="JSON results go here")
    ap.add_argument("--data", default="data/bench", help="prepared data of the benchmarks")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per timing")
    ap.add_argument("--xl-steps", type=int, default=3)
    ap.add_argument("--users", type=int, default=20000, help="stream: synthetic users")
    ap.add_argument("--workers", default="0,2", help="stream: DataLoader workers to try")
    ap.add_argument("--repeat", type=int, default=3, help="stream: repetitions")
    ap.add_argument("--events", type=int, default=1_000_000, help="prepare: events of the generated CSV")
    ap.add_argument("--prepare-users", type=int, default=100_000, help="prepare: users of the generated CSV")
    ap.add_argument("--dir", default=None, help="stream/prepare: working folder")
    args = ap.parse_args(argv)
    args.dir = args.dir or args.data
    one = {"stream": bench_stream, "prepare": bench_prepare, "gpu": bench_gpu, **PARTS}
    res = bench_all(args) if args.what == "all" else {args.what: one[args.what](args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = "gpu" if args.what == "gpu" else "bench"
    for name in (f"{prefix}-{stamp}.json", f"{prefix}-latest.json" if prefix == "gpu" else "latest.json"):
        (out / name).write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    print(f"results: {out / f'{prefix}-{stamp}.json'}")


if __name__ == "__main__":
    main()
