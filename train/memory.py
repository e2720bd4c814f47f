"""Per-rank memory of the training state under ZeRO 0-3, measured (not derived).

    torchrun --standalone --nproc_per_node 2 -m train.memory configs/experiment/amazon-food-kitchen.yaml \\
        --zero 0,1,2,3 [--out report.json] [a.b=value ...]

For each ZeRO stage it builds the experiment's model over the prepared data's vocabulary, wraps it
in the DeepSpeed engine, takes one training step on a batch of the real training stream, and
reports per rank: parameter elements the module holds (``ds_tensor`` under ZeRO-3), optimizer
state bytes (the AdamW moments, plus the fp32 partitions the base optimizer steps where they are
not the module's own parameters and are attached at the time of measuring), gradient bytes (live
tensor storage after backward minus before forward: gradients and reduce buckets), and all live tensor
storage of the process (every CPU/GPU tensor reachable by the garbage collector, deduplicated by
storage), which is what the rank really holds.
"""
from __future__ import annotations

import argparse
import gc
import json
import warnings

import torch

from train.config import load_config
from train.data.prepare import ensure_prepared
from train.data.stream import train_batches
from train.engine import barrier, build_engine, global_domain_loss, setup_distributed, teardown_distributed


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
    model = build_model(cfg, manifest)
    n_params = sum(p.numel() for p in model.parameters())
    train = cfg.train.for_stage("source")  # the measured step is a source-stage step
    engine = build_engine(model, train=train, stage=cfg.train.source, total_steps=10,
                          world_size=env.world_size)
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
    out = {
        "zero_stage": zero_stage, "rank": env.rank, "world_size": env.world_size, "model_elements": n_params,
        "param_elements_held": sum(t.numel() for t in held),
        "param_bytes": _storage_bytes(held),
        "optimizer_bytes": _storage_bytes(opt_state + [p for p in opt_params if p.numel() > 0]),
        "grad_bytes": grad_bytes,
        "live_tensor_bytes": _live_bytes(),
    }
    del engine, model, base, opt_state, opt_params, params, held
    gc.collect()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.memory")
    ap.add_argument("config")
    ap.add_argument("--zero", default="0,1,2,3", help="comma-separated ZeRO stages")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    env, _ = setup_distributed()
    manifest = ensure_prepared(cfg.data, log=lambda *a: None) if env.is_main else None
    barrier()
    if manifest is None:
        manifest = ensure_prepared(cfg.data, log=lambda *a: None)
    rows = []
    for z in [int(x) for x in args.zero.split(",")]:
        r = measure(cfg, z, manifest)
        parts = [None] * env.world_size
        torch.distributed.all_gather_object(parts, r)
        rows += parts
    if env.is_main:
        mib = 1 / 2 ** 20
        print(f"{'zero':>4} {'rank':>4} {'params held':>12} {'param MiB':>10} {'grad MiB':>9} "
              f"{'optim MiB':>10} {'live MiB':>9}   (model: {rows[0]['model_elements']} elements)")
        for r in rows:
            print(f"{r['zero_stage']:>4} {r['rank']:>4} {r['param_elements_held']:>12} "
                  f"{r['param_bytes'] * mib:>10.2f} {r['grad_bytes'] * mib:>9.2f} "
                  f"{r['optimizer_bytes'] * mib:>10.2f} {r['live_tensor_bytes'] * mib:>9.2f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    teardown_distributed()


if __name__ == "__main__":
    main()
    from train.cli import _exit_now_if_distributed

    _exit_now_if_distributed(0)
