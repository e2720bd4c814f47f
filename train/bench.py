"""Benchmarks behind ``make bench`` (figures, not pass/fail unit tests).

    python -m train.bench stream  [--users 20000] [--workers 0,2] [--repeat 3]
        samples/s of the training stream (tar read + JSON decode + checks + trim/pad + collate,
        shuffle buffer on) beside raw tar iteration of the same shards (Python's tarfile reading
        every member's bytes), and their ratio (goal >= 0.5); WebDataset's own undecoded tar
        iteration is printed too, for reference.
    python -m train.bench prepare [--events 10000000] [--users 1000000]
        writes a CSV of that many events (2 domains) and times ``xdrec prepare`` on it in a child
        process: wall time and peak RSS.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from train.config import DataConfig, SyntheticConfig, TrainConfig
from train.data.prepare import load_manifest, prepare
from train.data.stream import ReaderOptions, shard_urls, train_batches


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
        write_events_csv(src, args.events, args.users)
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
            "wall_s": round(wall, 1), "peak_rss_mib": round(max(peak, before) / 1024), "log": p.stdout.strip()[-400:]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.bench")
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stream")
    s.add_argument("--users", type=int, default=20000)
    s.add_argument("--workers", default="0,2")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--dir", default=None)
    p = sub.add_parser("prepare")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    res = bench_stream(args) if args.what == "stream" else bench_prepare(args)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
