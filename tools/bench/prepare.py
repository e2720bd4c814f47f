"""``prepare``: ``xdrec prepare`` with each engine (``--engines``) on generated Parquet tables of
``--events`` events (a list: 1M, 10M, 50M), 1M events a file: wall time, events/s, the peak RSS
of the driver (VmHWM) and the largest private memory of a Ray worker (RssAnon, sampled every
0.2 s: a worker's RSS also counts the object store's shared pages it maps), and whether both
engines gave the same samples (samples_sha256 of every domain and split)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from train.data.prepare import load_manifest
from tools.bench.common import goal

PER_FILE = 1_000_000


def write_events_parquet(folder: Path, n_events: int, n_users: int, seed: int = 0) -> list[Path]:
    """``n_events`` events of ``n_users`` users in two domains (70/30), Pareto item popularity,
    ``PER_FILE`` events a file; files already there are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(-(-n_events // PER_FILE)):
        path = folder / f"events-{k:05d}.parquet"
        files.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng([seed, k])
        n = min(PER_FILE, n_events - k * PER_FILE)
        dom = np.where(rng.random(n) < 0.7, "A", "B")
        item = (rng.pareto(1.2, n) + 1).astype(np.int64) % 200_000
        pq.write_table(pa.table({"user": np.char.add("U", rng.integers(0, n_users, n).astype(str)),
                                 "item": np.char.add(dom, item.astype(str)),
                                 "timestamp": 1_300_000_000 + rng.integers(0, 10**8, n), "domain": dom}),
                       path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
    return files


def _status(pid: int, key: str) -> int:
    """A byte count of a live process's /proc status (VmHWM: its peak RSS; RssAnon: its private
    resident memory now, without the object store's shared pages), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_watched(cmd: list[str], workers: bool) -> dict:
    """Run ``cmd``; its wall time, its peak RSS and the largest Ray worker's private memory."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = worker = 0
    while p.poll() is None:
        driver = max(driver, _status(p.pid, "VmHWM"))
        for proc in psutil.process_iter(["name", "cmdline"]) if workers else ():
            if (proc.info["cmdline"] or [""])[0].startswith("ray::") or "default_worker.py" in " ".join(
                    proc.info["cmdline"] or []):
                worker = max(worker, _status(proc.pid, "RssAnon"))
        time.sleep(0.2)
    out = p.stdout.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"wall_s": round(time.time() - t0, 1), "driver_peak_rss_mib": round(driver / 2**20),
            "largest_worker_private_mib": round(worker / 2**20) if worker else None, "log": out.strip()[-300:]}


def _one(work: Path, files: list[Path], n_events: int, engine: str) -> dict:
    exp = work / f"prepare-{engine}.yaml"
    exp.write_text(json.dumps({"name": "bench-prepare", "data": {
        "name": f"bench-{n_events}", "format": "table", "path": str(files[0].parent / "events-*.parquet"),
        "out_dir": str(work / f"prepared-{engine}"), "shard_samples": 5000}}))
    res = _run_watched([sys.executable, "-m", "train.cli", "prepare", str(exp), "--engine", engine], engine == "ray")
    m = load_manifest(work / f"prepared-{engine}" / f"bench-{n_events}", verify=False)
    return {**res, "events_read": m["read"]["events"], "users_kept": m["n_users"],
            "events_per_s": round(m["read"]["events"] / res["wall_s"]), "counts": m["counts"]}


def bench_prepare(args) -> dict:
    work = Path(args.dir or tempfile.mkdtemp(prefix="xdrec-bench-"))
    sizes = [int(float(x)) for x in str(args.events).split(",")]
    engines = args.engines.split(",")
    rows, goals = [], []
    for n in sizes:
        files = write_events_parquet(work / f"events-{n}", n, max(1, n // 10))
        got = {e: _one(work, files, n, e) for e in engines}
        for e, r in got.items():
            print(f"  prepare {n:,} events, {e}: {r['wall_s']} s, driver {r['driver_peak_rss_mib']} MiB, "
                  f"largest worker {r['largest_worker_private_mib']} MiB private", flush=True)
            rows.append({"events": n, "engine": e, **{k: v for k, v in r.items() if k != "counts"}})
            goals.append(goal(f"prepare {n:,} events, {e}: events per s (recorded)", r["events_per_s"], "recorded", True))
        if len(got) > 1:
            same = all(r["counts"] == next(iter(got.values()))["counts"] for r in got.values())
            goals.append(goal(f"prepare {n:,} events: every engine the same samples_sha256", float(same), "1", same))
    ray = [r for r in rows if r["engine"] == "ray"]
    if len(ray) > 1:
        growth = ray[-1]["driver_peak_rss_mib"] / ray[0]["driver_peak_rss_mib"]
        goals.append(goal(f"ray driver peak RSS, {ray[-1]['events']:,} / {ray[0]['events']:,} events", growth,
                          "<= 1.5", growth <= 1.5))
    return {"rows": rows, "goals": goals}
