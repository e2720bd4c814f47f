"""``prepare``: time and peak RSS of ``xdrec prepare`` on a generated CSV."""
from __future__ import annotations

import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from train.data.prepare import load_manifest
from tools.bench.common import goal


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
