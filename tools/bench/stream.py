"""``stream``: samples/s of the training stream vs raw tar iteration."""
from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path


from train.config import DataConfig, SyntheticConfig, TrainConfig
from train.data.prepare import load_manifest, prepare
from train.data.stream import ReaderOptions, shard_urls, train_batches
from tools.bench.common import goal


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
