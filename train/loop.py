"""The training loop of one stage: step, log, evaluate on valid, keep the best, stop early."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from train.engine import all_ranks, global_domain_loss, sum_over_ranks
from train.tracking import Tracker


@dataclass
class StagePlan:
    """What a stage trains on and how it is judged; built by ``train.stages``."""

    name: str
    batches: Callable[[int], Iterator[dict]]  # epoch -> training batches
    weights: list[float]  # w_d per domain index
    epochs: int
    patience: int
    select: Callable[[], float]  # valid metric of the current weights; higher is better
    ckpt_dir: Path
    log_every: int = 20
    domain_names: list[str] = field(default_factory=list)


def train_step(engine, batch: dict, weights: list[float], device) -> tuple[float, list[float]]:
    """Forward, backward, optimizer step (DeepSpeed applies accumulation and clipping).

    Returns the global-batch loss value and per-domain mean CE (see ``global_domain_loss``).
    """
    sums, counts = engine(batch["items"].to(device), targets=batch["targets"].to(device))
    loss, value, means = global_domain_loss(sums, counts, weights)
    engine.backward(loss)
    engine.step()
    return value, means


def run_stage(engine, plan: StagePlan, *, device, tracker: Tracker, log=print) -> dict:
    """Train ``plan.epochs`` epochs (or until ``plan.patience`` evaluations bring no gain), saving
    the best-by-valid weights to ``plan.ckpt_dir`` tag ``best`` and loading them back at the end.
    Returns a summary: best epoch and metric, steps, the loss curve, wall time.
    """
    t0 = time.time()
    best, best_epoch, bad, step = float("-inf"), -1, 0, 0
    losses: list[float] = []
    for epoch in range(plan.epochs):
        engine.train()
        ep_loss, ep_n = 0.0, 0
        batches = iter(plan.batches(epoch))
        while True:
            batch = next(batches, None)
            # Every rank runs the same number of steps: stop when any rank has run dry.
            if not all_ranks(batch is not None):
                left = sum_over_ranks((batch is not None) + sum(1 for _ in batches))
                if left:
                    log(f"[{plan.name}] epoch {epoch + 1}: {left} batches left on some ranks after the "
                        f"shortest rank ran dry; skipped to keep ranks in step")
                break
            loss, means = train_step(engine, batch, plan.weights, device)
            step += 1
            ep_loss, ep_n = ep_loss + loss, ep_n + 1
            if step % plan.log_every == 0:
                rec = {"loss": loss, "lr": engine.get_lr()[0], "epoch": epoch}
                for name, m in zip(plan.domain_names, means):
                    if m == m:  # not nan: the domain had targets in this global batch
                        rec[f"ce_{name}"] = m
                tracker.log({plan.name: rec}, step=tracker.step + 1)
        if ep_n == 0:
            raise RuntimeError(f"stage {plan.name}: epoch {epoch} produced no training batch")
        losses.append(ep_loss / ep_n)
        engine.eval()
        score = plan.select()
        improved = score > best
        if improved:
            best, best_epoch, bad = score, epoch, 0
            engine.save_checkpoint(str(plan.ckpt_dir), tag="best", client_state={"epoch": epoch, "step": step})
        else:
            bad += 1
        tracker.log({plan.name: {"epoch_loss": losses[-1], "valid_select": score, "epoch": epoch}})
        log(f"[{plan.name}] epoch {epoch + 1}/{plan.epochs}  loss {losses[-1]:.4f}  valid {score:.4f}"
            f"{'  *' if improved else ''}  ({time.time() - t0:.0f}s)")
        if bad >= plan.patience:
            log(f"[{plan.name}] no better valid metric for {plan.patience} evaluations; stopping")
            break
    engine.load_checkpoint(str(plan.ckpt_dir), tag="best", load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    engine.eval()
    return {"best_epoch": best_epoch, "best_valid_select": best, "steps": step, "epoch_losses": losses,
            "wall_s": time.time() - t0}


def score_fn(engine) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``(items, domain) -> scores`` through the engine (so ZeRO-3 gathers the parameters)."""
    return lambda items, domain: engine(items, domain=domain)
