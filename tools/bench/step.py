"""``step`` (the DeepSpeed path vs a plain PyTorch loop) and ``zero`` (ZeRO-2/3 vs ZeRO-0 step time)."""
from __future__ import annotations


import torch

from train.data.stream import train_batches
from tools.bench.common import _median_time, goal, median_step, run_steps


def _plain_step(model, opt, batch: dict, clip: float) -> None:
    from model.losses import weighted_domain_mean

    sums, counts = model(batch["items"], targets=batch["targets"])
    weighted_domain_mean(sums, counts, [1.0, 1.0]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


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


def _torch_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every ``model.dropout.Dropout`` replaced by ``nn.Dropout`` of the same p."""
    from model.dropout import Dropout

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, torch.nn.Dropout(child.p))
    return model


def bench_dropout(args) -> dict:
    """xdrec's CPU dropout (``model.dropout``) vs torch's ``nn.Dropout``: one training step (forward
    and backward under bf16 autocast) of the model of the Amazon experiments' joint stage (the
    ``amazon`` preset, cosine scoring, both domains' views; Beauty-Electronics' item counts) on a
    128 x 50 batch of random items, median step time; and the layer alone on one such activation."""
    from model import ModelConfig, Vocabulary, build_recommender, weighted_domain_mean
    from model.dropout import Dropout

    vocab = Vocabulary(("beauty", "electronics"), (10379, 14188))
    cfg = ModelConfig(d_model=128, n_layers=2, n_heads=2, ff_mult=4, dropout=0.5, emb_dropout=0.5, max_len=50,
                      temperature=0.1, sequence="dual", view_layers=1, view_domains=[])
    items = torch.randint(1, vocab.n_items + 1, (128, 51), generator=torch.Generator().manual_seed(0))
    steps = {}
    for name, swap in (("torch", _torch_dropout), ("xdrec", lambda m: m)):
        torch.manual_seed(0)
        model = swap(build_recommender(cfg, vocab)).train()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sums, counts = model(items[:, :-1], targets=items[:, 1:])
            weighted_domain_mean(sums, counts, [1.0, 1.0]).backward()
        steps[name] = _median_time(step, args.steps, warmup=3)
    x = torch.randn(128, 50, 128, requires_grad=True)
    layer = {name: _median_time(lambda: d(x).sum().backward(), max(args.steps, 20))
             for name, d in (("torch", torch.nn.Dropout(0.5).train()), ("xdrec", Dropout(0.5).train()))}
    return {"torch_step_s": steps["torch"], "xdrec_step_s": steps["xdrec"], "torch_layer_s": layer["torch"],
            "xdrec_layer_s": layer["xdrec"], "goals": [
                goal("Amazon joint-stage step, xdrec / torch dropout (CPU)", steps["xdrec"] / steps["torch"], "<= 0.95",
                     steps["xdrec"] / steps["torch"] <= 0.95),
                goal("dropout layer alone, xdrec / torch (CPU)", layer["xdrec"] / layer["torch"], "recorded", True)]}
