"""``eval`` (chunked full ranking vs a per-user loop, its growth with the catalogue) and ``vocab`` (the 1M-item preset)."""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from train.data.prepare import load_manifest
from tools.bench.common import _python, goal, median_step, run_steps
from tools.bench.memory import _memory_rows


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
