"""Benchmarks behind ``make bench``: every performance goal measured as a ratio, in one run.

    python -m tools.bench all [--out runs/bench]       every part; JSON in runs/bench/, a table beside the goals
    python -m tools.bench step | dropout | zero | memory | xl | eval | vocab | stream | prepare

- ``step``: one process, the DeepSpeed path (ZeRO-0) vs a plain PyTorch AdamW loop of the same
  model and batch: median step time ratio.
- ``dropout``: xdrec's CPU dropout (``model.dropout``) vs ``nn.Dropout``: median step time ratio of
  the Amazon joint-stage model (forward and backward, bf16 autocast), and the layer alone (recorded).
- ``zero``: 2 ranks, ZeRO-2 and ZeRO-3 vs ZeRO-0 median step time (base and large models).
- ``memory``: 2 ranks, ``tools.memory`` (each stage in fresh processes) for base, mid (60M),
  large (156M) in fp32 and bf16 and xl (ZeRO-3, bf16); ZeRO-k / ZeRO-0 live bytes, fp32 bytes
  per parameter against ``tools.plan``'s counts, ``xdrec plan``'s prediction against the measure.
- ``xl``: the 1.02B model trains a few optimizer steps at ZeRO-3 on 2 ranks (loss, peak RSS per
  rank) where ``xdrec plan`` says ZeRO-0 cannot fit; ZeRO-0 under a per-process memory cap
  (``RLIMIT_AS``: this machine's RAM less 2 GiB, halved, a rank) fails with one out-of-memory line.
- ``eval``: full-ranking users/s of the chunked ranking vs a per-user loop; its time at 10k,
  100k and 1M items with the fitted exponent.
- ``vocab``: the 1M-item preset prepared, trained (sampled softmax) and evaluated; memory and
  step time at ZeRO-0/2/3 with the tied item table (gathered every forward under ZeRO-3).
- ``stream``: samples/s of the training stream vs raw tar iteration; ``prepare``: time and
  peak RSS (driver, largest Ray worker) of ``xdrec prepare`` per engine on generated Parquet tables.

Timings are medians over steps after a warm-up; nothing here is a unit test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from tools.bench.common import steps_worker, verdict
from tools.bench.eval import bench_eval, bench_vocab
from tools.bench.gpu import bench_gpu
from tools.bench.memory import bench_memory, bench_xl
from tools.bench.prepare import bench_prepare
from tools.bench.step import bench_dropout, bench_step, bench_zero
from tools.bench.stream import bench_stream


PARTS = {"step": bench_step, "dropout": bench_dropout, "zero": bench_zero, "memory": bench_memory, "xl": bench_xl,
         "eval": bench_eval, "vocab": bench_vocab}


def bench_all(args) -> dict:
    out = {}
    for name in args.parts.split(","):
        t0 = time.time()
        print(f"== bench {name} ==", flush=True)
        res = {"stream": bench_stream, "prepare": bench_prepare, **PARTS}[name](args)
        res["wall_s"] = time.time() - t0
        out[name] = res
        for g in res.get("goals", []):
            print(f"  {verdict(g):<8} {g['goal']}: {g['value']} (goal {g['target']})", flush=True)
    return out


def table(results: dict) -> str:
    rows = [g for r in results.values() for g in r.get("goals", [])]
    w = max(len(g["goal"]) for g in rows) if rows else 10
    lines = [f"{'goal':<{w}}  {'value':>10}  {'target':<12} met", "-" * (w + 30)]
    lines += [f"{g['goal']:<{w}}  {g['value']:>10.4g}  {g['target']:<12} {verdict(g)}" for g in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["_steps"]:
        from train.engine import exit_now_if_distributed

        steps_worker(sys.argv[2:])
        return exit_now_if_distributed(0)
    ap = argparse.ArgumentParser(prog="python -m tools.bench")
    ap.add_argument("what", choices=["all", "stream", "prepare", "gpu", *PARTS])
    ap.add_argument("--dry-run", action="store_true", help="gpu: tiny sizes on the CPU, 1 process (checks the script)")
    ap.add_argument("--parts", default="step,dropout,zero,eval,memory,xl,vocab,stream,prepare", help="with all: which parts")
    ap.add_argument("--out", default="runs/bench", help="JSON results go here")
    ap.add_argument("--data", default="data/bench", help="prepared data of the benchmarks")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per timing")
    ap.add_argument("--xl-steps", type=int, default=3)
    ap.add_argument("--users", type=int, default=20000, help="stream: synthetic users")
    ap.add_argument("--workers", default="0,2", help="stream: DataLoader workers to try")
    ap.add_argument("--repeat", type=int, default=3, help="stream: repetitions")
    ap.add_argument("--events", default="1000000,10000000,50000000",
                    help="prepare: events of the generated Parquet tables, a comma list (users: a tenth)")
    ap.add_argument("--engines", default="local,ray", help="prepare: the engines to run, a comma list")
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
