"""Judging a stage's weights: the valid number an epoch is kept by, a stage's valid and test
metrics (each test user's ranks saved for the paired bootstrap), and the transfer interval."""
from __future__ import annotations

import numpy as np

from train.evaluate import ndcg_at, paired_bootstrap
from train.protocol import PROTOCOLS, protocol_label
from train.loop import score_fn
from train.run import Run
from train.stages import StageData


def select_value(run: Run, engine, data: StageData) -> float:
    """``eval.select_metric`` under ``eval.select_protocol`` on valid of the stage's selection domain
    (``eval.select_domains=all``: the unweighted mean over its evaluation domains), ranked by the
    model's scores alone (no ``eval.prior`` or ``eval.transition``): those terms never change
    the weights kept."""
    ev = run.cfg.eval
    roles = data.spec.evaluates if ev.select_domains == "all" else (data.spec.selects_on,)
    values = [run.evaluator.evaluate(score_fn(engine), data.names[r], "valid", only_domain=data.own_domain_only,
                                     device=run.device, eval_terms=False)[ev.select_protocol][ev.select_metric]
              for r in roles]
    return sum(values) / len(values)


def evaluate_stage(run: Run, engine, data: StageData) -> dict:
    """Valid and test metrics per domain; on test also per history bucket (``cold_start``), and
    each test user's ranks saved to ``<run>/<stage>/test_ranks.npz`` for the paired bootstrap."""
    out: dict = {}
    saved = {}
    for split in ("valid", "test"):
        for name in data.domains:
            r = run.evaluator.ranks(score_fn(engine), name, split, only_domain=data.own_domain_only,
                                    device=run.device)
            res = run.evaluator.metrics(r)
            if split == "test":
                res["cold_start"] = run.evaluator.by_history(r)
                saved.update({f"{name}/{k}": v for k, v in r.items()})
            out.setdefault(split, {})[name] = res
    if run.env.is_main:
        np.savez(run.dir / data.spec.name / "test_ranks.npz", **saved)
    return out


def transfer(run: Run) -> dict:
    """Paired bootstrap over the target's test users: source-then-joint minus target-only
    NDCG@10, per protocol (from the two stages' saved ranks)."""
    t = run.cfg.data.target
    j, o = (np.load(run.dir / s / "test_ranks.npz") for s in ("joint", "target_only"))
    if not np.array_equal(j[f"{t}/user"], o[f"{t}/user"]):
        raise RuntimeError(f"{run.dir}: joint and target-only were tested on different users")
    out = {"metric": "ndcg@10", "domain": t}
    for p in PROTOCOLS:
        out[p] = paired_bootstrap(ndcg_at(j[f"{t}/{p}"], 10), ndcg_at(o[f"{t}/{p}"], 10),
                                  resamples=run.cfg.eval.bootstrap, seed=run.cfg.eval.seed)
    return out


def describe_transfer(tr: dict, num_negatives: int) -> list[str]:
    return [f"transfer on {tr['domain']} test, {protocol_label(p, num_negatives)} NDCG@10: joint - target-only = "
            f"{tr[p]['diff']:+.4f}, 95% CI [{tr[p]['ci95'][0]:+.4f}, {tr[p]['ci95'][1]:+.4f}] ({tr[p]['n_users']} "
            f"users, {tr[p]['resamples']} paired bootstrap resamples)" for p in PROTOCOLS]
