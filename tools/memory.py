"""Per-rank memory of the training state under ZeRO 0-3, measured (not derived).

    python -m tools.memory configs/experiment/demo.yaml --zero 0,1,2,3 --nproc 2 [--out report.json] [a.b=value ...]

Each ZeRO stage is measured in processes of its own (``torchrun --standalone``, ``--nproc``
ranks): a DeepSpeed engine's optimizer hooks keep it reachable after ``del``, so a stage measured
after another in the same process counts the earlier engine too (measured here: ZeRO-3 after
ZeRO-2 at 156M parameters showed 2,684 MiB, alone 1,207). Under torchrun directly (one stage) it
measures in place.

For a stage it builds the experiment's model over the prepared data's vocabulary (through
``build_engine``: partitioned at construction under ZeRO-3), takes one training step on a batch of
the real training stream, and reports per rank: parameter elements the module holds
(``ds_tensor`` under ZeRO-3), optimizer state bytes (the AdamW moments, plus the fp32 partitions
the base optimizer steps where they are not the module's own parameters), gradient bytes (live
tensor storage after backward minus before forward: gradients and reduce buckets), all live tensor
storage of the process after the step (every tensor reachable by the garbage collector,
deduplicated by storage) and the process's peak RSS (``ru_maxrss``: construction, the step's
activations and the allocator's slack included).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings

import torch

from train.config import load_config
from train.data.prepare import ensure_prepared
from train.data.stream import train_batches
from train.engine import all_gather_objects, barrier, build_engine, global_domain_loss, setup_distributed, \
    teardown_distributed


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _live_bytes() -> int:
    gc.collect()
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            try:
                if torch.is_tensor(o) and o.device.type != "meta":
                    found.append(o)
            except Exception:  # objects that fail isinstance checks during interpreter bookkeeping
                continue
    return _storage_bytes(found)


def measure(cfg, zero_stage: int, manifest: dict) -> dict:
    from train.stages import build_model

    cfg.train.zero_stage = zero_stage
    env, device = setup_distributed()
    train = cfg.train.for_stage("source")  # the measured step is a source-stage step
    model, engine = build_engine(lambda: build_model(cfg, manifest), train=train, stage=cfg.train.source,
                                 total_steps=10, world_size=env.world_size)
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    built = _live_bytes()
    batch = next(iter(train_batches(manifest, cfg.data.prepared_dir(), cfg.data.source,
                                    batch_size=train.micro_batch_size, max_len=cfg.model.max_len,
                                    seed=0, epoch=0, buffer=100)))
    before = _live_bytes()
    sums, counts = engine(batch["items"].to(device), targets=batch["targets"].to(device))
    loss, *_ = global_domain_loss(sums, counts, [1.0, 1.0])
    engine.backward(loss)
    del sums, counts, loss
    grad_bytes = _live_bytes() - before  # gradients (and reduce buckets) held between backward and step
    engine.step()
    params = list(engine.module.parameters())
    held = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    opt_state = [t for st in base.state.values() for t in st.values() if torch.is_tensor(t) and t.numel() > 1]
    module_storages = {p.untyped_storage().data_ptr() for p in params}
    # the tensors the base optimizer steps, when they are not the module's own (ZeRO 1/2 fp32 partitions)
    opt_params = [p for g in base.param_groups for p in g["params"]
                  if p.untyped_storage().data_ptr() not in module_storages]
    return {
        "zero_stage": zero_stage, "rank": env.rank, "world_size": env.world_size, "model_elements": n_params,
        "precision": train.precision, "param_elements_held": sum(t.numel() for t in held),
        "param_bytes": _storage_bytes(held),
        "optimizer_bytes": _storage_bytes(opt_state + [p for p in opt_params if p.numel() > 0]),
        "grad_bytes": grad_bytes,
        "built_bytes": built,  # live tensors right after construction (before any step)
        "live_tensor_bytes": _live_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def print_rows(rows: list[dict]) -> None:
    mib = 1 / 2 ** 20
    print(f"{'zero':>4} {'rank':>4} {'params held':>12} {'param MiB':>10} {'grad MiB':>9} {'optim MiB':>10} "
          f"{'live MiB':>9} {'peak RSS MiB':>13}   (model: {rows[0]['model_elements']:,} elements, "
          f"{rows[0]['precision']})")
    for r in rows:
        print(f"{r['zero_stage']:>4} {r['rank']:>4} {r['param_elements_held']:>12} "
              f"{r['param_bytes'] * mib:>10.2f} {r['grad_bytes'] * mib:>9.2f} "
              f"{r['optimizer_bytes'] * mib:>10.2f} {r['live_tensor_bytes'] * mib:>9.2f} "
              f"{r['peak_rss_bytes'] * mib:>13.0f}")


def measure_apart(config: str, stages: list[int], nproc: int, overrides: list[str]) -> list[dict]:
    """Each stage in ``nproc`` fresh processes under torchrun; the rows of every stage."""
    rows = []
    for z in stages:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "tools.memory", config, "--zero", str(z), "--out", out, *overrides]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"measuring ZeRO-{z}: {' '.join(cmd)} exited {done.returncode}:\n"
                                   f"{done.stderr[-3000:]}")
            with open(out) as f:
                rows += json.load(f)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.memory")
    ap.add_argument("config")
    ap.add_argument("--zero", default="0,1,2,3", help="comma-separated ZeRO stages")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per stage (when not started by torchrun)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    stages = [int(x) for x in args.zero.split(",")]
    if "RANK" not in os.environ:
        rows = measure_apart(args.config, stages, args.nproc, args.overrides)
    else:
        if len(stages) != 1:
            raise SystemExit("under torchrun, measure one ZeRO stage (--zero Z): each stage needs fresh processes")
        cfg = load_config(args.config, args.overrides)
        env, _ = setup_distributed()
        manifest = ensure_prepared(cfg.data, log=lambda *a: None)[0] if env.is_main else None
        barrier()
        manifest = manifest or ensure_prepared(cfg.data, log=lambda *a: None)[0]
        rows = all_gather_objects(measure(cfg, stages[0], manifest))
        if not env.is_main:
            rows = []
    if rows:
        print_rows(rows)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    if "RANK" in os.environ:
        teardown_distributed()


if __name__ == "__main__":
    main()
    from train.engine import exit_now_if_distributed

    exit_now_if_distributed(0)
