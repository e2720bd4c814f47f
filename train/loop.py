"""The training loop of one stage: step, log, evaluate on valid, keep the best, stop early."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from launch.signals import stop_requested
from train.checkpoint import LoopState, save_best, save_resume
from train.files import fault_point
from train.engine import (all_ranks, global_domain_loss, grads_finite, max_over_ranks, set_lr_scale, step_skipped,
                          sum_over_ranks)
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
    checkpoint_every: int = 0  # steps between resume checkpoints (0: epoch ends only)
    grad_accum: int = 1  # stop and checkpoint only where accumulated gradients have been applied
    domain_names: list[str] = field(default_factory=list)
    plateau_decay: float = 1.0  # LR factor after each evaluation without gain (1.0: off)
    keep_checkpoints: int = 2  # resume checkpoints kept
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" training, or "skip" the batch
    max_nonfinite_skips: int = 10  # skip: stop once more batches than this were skipped in the stage


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm (``train.on_nonfinite``); the message
    names the stage, step, batch and domains."""


@dataclass
class Step:
    """One training batch's outcome, the same on every rank (its statistics are all-reduced)."""

    loss: float  # global-batch L = sum_d w_d * mean CE_d
    means: list[float]  # per-domain mean CE (nan where the batch has no target of the domain)
    counts: list[int]  # per-domain targets in the global batch
    nonfinite: str = ""  # "loss" (not backpropagated) or "gradient norm"; "" when all was finite


def train_step(engine, batch: dict, weights: list[float], device, *, skip: bool = False) -> Step:
    """Forward, backward, optimizer step (DeepSpeed applies accumulation and clipping).

    A non-finite loss is not backpropagated. A non-finite gradient norm at an optimizer step:
    with ``skip`` the step leaves the weights as they were (DeepSpeed's ZeRO 1-3 skip it
    themselves; ZeRO-0 steps with zero gradients at LR 0), else the step is not taken.
    """
    sums, counts = engine(batch["items"].to(device), targets=batch["targets"].to(device))
    if fault_point("train.loss"):  # the fault tests' NaN batch
        sums = [s * float("nan") for s in sums]
    loss, value, means, n = global_domain_loss(sums, counts, weights)
    out = Step(value, means, n)
    if any(c and not math.isfinite(m) for m, c in zip(means, n)):
        out.nonfinite = "loss"
        return out
    if fault_point("train.grad"):  # the fault tests' non-finite gradient (the loss value stays finite)
        loss = loss * float("inf")
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and not grads_finite(engine):
        out.nonfinite = "gradient norm"
        if not skip:
            return out
        for group in engine.optimizer.param_groups:  # the scheduler sets the LR again after the step
            group["lr"] = 0.0
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
    engine.step()
    if step_skipped(engine, boundary):
        out.nonfinite = "gradient norm"
    return out


def nonfinite_message(plan: StagePlan, st: LoopState, step: Step) -> str:
    ce = ", ".join(f"{n} {m:.4g}" for n, m, c in zip(plan.domain_names, step.means, step.counts) if c)
    return (f"stage {plan.name}, step {st.step + 1} (epoch {st.epoch + 1}, batch {st.batch_in_epoch + 1}): "
            f"non-finite {step.nonfinite} (mean CE per domain of the batch: {ce})")


def _on_nonfinite(plan: StagePlan, st: LoopState, step: Step, log) -> None:
    """Stop (NonFiniteError) or count the skip, as ``train.on_nonfinite`` says."""
    msg = nonfinite_message(plan, st, step)
    if plan.on_nonfinite != "skip" or st.skipped >= plan.max_nonfinite_skips:
        more = (f"; {st.skipped} batch(es) skipped before, train.max_nonfinite_skips={plan.max_nonfinite_skips}"
                if plan.on_nonfinite == "skip" else "")
        raise NonFiniteError(msg + more + "; training stopped (train.on_nonfinite), nothing saved after the "
                             "last checkpoint: lower the learning rate, or set train.on_nonfinite=skip")
    st.skipped += 1
    log(f"[{plan.name}] skipped: {msg} ({st.skipped} skipped in this stage, at most {plan.max_nonfinite_skips})")


def run_stage(engine, plan: StagePlan, *, device, tracker: Tracker, stopper: "Stopper", resume: LoopState | None = None,
              log=print) -> dict:
    """Train ``plan.epochs`` epochs (or until ``plan.patience`` evaluations bring no gain), saving
    the best-by-valid weights to ``plan.ckpt_dir`` tag ``best`` and loading them back at the end.
    Each evaluation without gain multiplies the LR by ``plan.plateau_decay`` from then on.

    ``resume`` continues from a loaded checkpoint's loop state: the epoch's first
    ``batch_in_epoch`` batches are skipped, so training restarts at the next unseen sample.
    A resume checkpoint is written every ``plan.checkpoint_every`` steps, at every epoch end and
    when ``stopper`` asks to stop (then :class:`StageInterrupted` is raised).
    Returns a summary: best epoch and metric, steps, the loss curve, wall time (``wall_s``: the
    stage's own seconds summed over every process that ran it, up to the checkpoint each resumed
    from; time between a stop and its resume is not counted).
    """
    t0 = time.time()
    st = resume or LoopState()
    before = st.train_s  # seconds run by the processes before this one

    def elapsed() -> float:
        return before + time.time() - t0

    def checkpoint() -> str:
        st.train_s = elapsed()
        return save_resume(engine, plan.ckpt_dir, st, stage=plan.name, keep=plan.keep_checkpoints)

    if resume:
        log(f"[{plan.name}] resuming at epoch {st.epoch + 1}, batch {st.batch_in_epoch}, step {st.step} "
            f"({before:.0f} s trained before)")
        set_lr_scale(engine.lr_scheduler, st.lr_scale)
    while not st.done and st.epoch < plan.epochs:
        engine.train()
        batches = iter(plan.batches(st.epoch))
        for _ in range(st.batch_in_epoch):  # already trained before the restart
            next(batches, None)
        while True:
            batch = next(batches, None)
            # Every rank runs the same number of steps: stop when any rank has run dry.
            if not all_ranks(batch is not None):
                left = sum_over_ranks((batch is not None) + sum(1 for _ in batches))
                if left:
                    log(f"[{plan.name}] epoch {st.epoch + 1}: {left} batches left on some ranks after the "
                        f"shortest rank ran dry; skipped to keep ranks in step")
                break
            step = train_step(engine, batch, plan.weights, device, skip=plan.on_nonfinite == "skip")
            if step.nonfinite:
                _on_nonfinite(plan, st, step, log)
                if step.nonfinite == "loss":  # not backpropagated: no step taken, the next batch takes its place
                    st.batch_in_epoch += 1
                    continue
            loss, means = step.loss, step.means
            st.step, st.batch_in_epoch = st.step + 1, st.batch_in_epoch + 1
            st.ep_loss, st.ep_n = st.ep_loss + loss, st.ep_n + 1
            if st.step % plan.log_every == 0:
                rec = {"loss": loss, "lr": engine.get_lr()[0], "epoch": st.epoch, "stage_step": st.step}
                for name, m, c in zip(plan.domain_names, means, step.counts):
                    if c:  # the domain had targets in this global batch
                        rec[f"ce_{name}"] = m
                tracker.log({plan.name: rec}, step=tracker.step + 1)
            if st.step % plan.grad_accum:
                continue  # mid-accumulation: gradients not yet applied are not checkpointed
            if stopper.should_stop(plan.grad_accum):
                tag = checkpoint()
                raise StageInterrupted(plan.name, st.step, plan.ckpt_dir / tag, preempted=stopper.signalled)
            if plan.checkpoint_every and st.step % plan.checkpoint_every == 0:
                checkpoint()
        if st.ep_n == 0:
            raise RuntimeError(f"stage {plan.name}: epoch {st.epoch} produced no training batch")
        st.losses.append(st.ep_loss / st.ep_n)
        engine.eval()
        score = plan.select()
        improved = score > st.best
        if improved:
            st.best, st.best_epoch, st.bad = score, st.epoch, 0
            save_best(engine, plan.ckpt_dir, stage=plan.name)
        else:
            st.bad += 1
        tracker.log({plan.name: {"epoch_loss": st.losses[-1], "valid_select": score, "epoch": st.epoch,
                                 "lr_scale": st.lr_scale}})
        log(f"[{plan.name}] epoch {st.epoch + 1}/{plan.epochs}  loss {st.losses[-1]:.4f}  valid {score:.4f}"
            f"{'  *' if improved else ''}  ({elapsed():.0f}s)")
        if st.bad >= plan.patience:
            log(f"[{plan.name}] no better valid metric for {plan.patience} evaluations; stopping")
            st.done = True
        elif not improved and plan.plateau_decay < 1.0:
            st.lr_scale *= plan.plateau_decay
            set_lr_scale(engine.lr_scheduler, st.lr_scale)
            log(f"[{plan.name}] no gain: LR scaled by {st.lr_scale:.4g} from now on")
        st.epoch, st.batch_in_epoch, st.ep_loss, st.ep_n = st.epoch + 1, 0, 0.0, 0
        checkpoint()
    engine.load_checkpoint(str(plan.ckpt_dir), tag="best", load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    engine.eval()
    return {"best_epoch": st.best_epoch, "best_valid_select": st.best, "steps": st.step, "epoch_losses": st.losses,
            "wall_s": elapsed(), "nonfinite_skipped": st.skipped}


class StageInterrupted(Exception):
    """Training stopped on request (signal or step budget) after writing a resume checkpoint."""

    def __init__(self, stage: str, step: int, path: Path, *, preempted: bool = False):
        why = "on a preemption signal" if preempted else "after train.stop_after_steps"
        super().__init__(f"stage {stage} stopped at step {step} {why}; resume checkpoint {path}")
        self.stage, self.step, self.path, self.preempted = stage, step, path, preempted


class Stopper:
    """Asks every rank to stop at the same optimizer-step boundary: on SIGUSR1 (see
    ``launch.signals``) or once this process has taken ``stop_after_steps`` training batches
    (0 = never; counted at accumulation boundaries)."""

    def __init__(self, stop_after_steps: int = 0):
        self.budget = stop_after_steps
        self.taken = 0
        self.signalled = False  # the stop came from a signal on some rank (a preemption)

    def should_stop(self, batches: int = 1) -> bool:
        """Called at each optimizer step with the batches it consumed; True on every rank at once."""
        self.taken += batches
        signal, budget = max_over_ranks([int(stop_requested()), int(self.budget > 0 and self.taken >= self.budget)])
        self.signalled = bool(signal)
        return bool(signal or budget)


def score_fn(engine) -> Callable:
    """``(items, domain, consume) -> consume(scorer)`` through the engine (so ZeRO-3 gathers the
    parameters for the whole of the consumer's work)."""
    return lambda items, domain, consume: engine(items, domain=domain, consume=consume)
