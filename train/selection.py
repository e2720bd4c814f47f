"""Judging a stage's weights: the valid number an epoch is kept by, a stage's valid and test
metrics (each test user's ranks saved for the paired bootstrap), and the transfer interval."""
from __future__ import annotations

import numpy as np

from train.evaluate import ndcg_at, paired_bootstrap
from train.protocol import PROTOCOLS, protocol_label
from train.loop import score_fn
from train.record import transfer_entries
from train.run import Run
from train.stages import StageData


def select_value(run: Run, engine, data: StageData) -> float:
    """``eval.select_metric`` under ``eval.select_protocol`` on valid of the unit's selection domains
    (their unweighted mean; ``eval.select_domains=all``: over its evaluation domains), ranked by
    the model's scores alone (no ``eval.prior`` or ``eval.transition``): those terms never change
    the weights kept."""
    ev = run.cfg.eval
    values = [run.evaluator.evaluate(score_fn(engine), d, "valid", only_domain=data.own_domain_only,
                                     device=run.device, eval_terms=False)[ev.select_protocol][ev.select_metric]
              for d in data.selection_domains()]
    return sum(values) / len(values)


def evaluate_stage(run: Run, engine, data: StageData) -> dict:
    """Valid and test metrics per domain; on test also per history bucket (``cold_start``) and per
    domain of the user's latest input event (``last_input``), and
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
                res["last_input"] = run.evaluator.by_last_input(r)
                saved.update({f"{name}/{k}": v for k, v in r.items()})
            out.setdefault(split, {})[name] = res
    if run.env.is_main:
        np.savez(run.dir / data.unit / "test_ranks.npz", **saved)
    return out


def transfer(run: Run) -> dict:
    """Paired bootstrap over each target domain's test users: source-then-joint minus that
    domain's target-only baseline, NDCG@10, per protocol (from the units' saved ranks). One
    target: its entry; several: ``{domain: entry}`` (:func:`train.record.transfer_entries`)."""
    targets = run.cfg.data.targets()
    out = {t: _transfer_of(run, t) for t in targets}
    return out[targets[0]] if len(targets) == 1 else out


def _transfer_of(run: Run, t: str) -> dict:
    j, o = (np.load(run.dir / u / "test_ranks.npz") for u in ("joint", run.cfg.baseline_unit(t)))
    if not np.array_equal(j[f"{t}/user"], o[f"{t}/user"]):
        raise RuntimeError(f"{run.dir}: joint and target-only were tested on different users of {t}")
    out = {"metric": "ndcg@10", "domain": t}
    for p in PROTOCOLS:
        out[p] = paired_bootstrap(ndcg_at(j[f"{t}/{p}"], 10), ndcg_at(o[f"{t}/{p}"], 10),
                                  resamples=run.cfg.eval.bootstrap, seed=run.cfg.eval.seed)
    return out


def describe_transfer(tr: dict, num_negatives: int) -> list[str]:
    return [f"transfer on {t['domain']} test, {protocol_label(p, num_negatives)} NDCG@10: joint - target-only = "
            f"{t[p]['diff']:+.4f}, 95% CI [{t[p]['ci95'][0]:+.4f}, {t[p]['ci95'][1]:+.4f}] ({t[p]['n_users']} "
            f"users, {t[p]['resamples']} paired bootstrap resamples)" for t in transfer_entries(tr) for p in PROTOCOLS]
