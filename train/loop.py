"""The training loop of one stage: step, log, evaluate on valid, keep the best, stop early.

Nothing is read back from the device at every step: every rank's batch count of an epoch is
known up front (``StagePlan.steps``, from the manifest), so no per-batch agreement is needed; the
loss statistics stay on the device and are read every ``log_every`` steps; the stop flags
(preemption signal) and the finite check are settled at those sync points and before every
checkpoint and evaluation. Exceptions: ``train.on_nonfinite=skip`` reads each step's finiteness
(to skip the batch before it is applied), and streams whose batch counts are not known
(``data.on_error=skip`` may drop samples) agree on each batch as before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from launch.signals import requested
from train.checkpoint import LoopState, load_weights, save_best, save_resume
from train.engine import (all_ranks, domain_means, global_domain_loss, grads_finite, loss_value, max_over_ranks,
                          set_lr_scale, step_skipped, sum_over_ranks, world_size)
from train.files import fault_point
from train.progress import bar
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
    log_every: int = 20  # also the sync interval: loss read, stop signal and finite check settled
    checkpoint_every: int = 0  # steps between resume checkpoints (0: epoch ends only)
    grad_accum: int = 1  # stop and checkpoint only where accumulated gradients have been applied
    domain_names: list[str] = field(default_factory=list)
    plateau_decay: float = 1.0  # LR factor after each evaluation without gain (1.0: off)
    min_epochs: int = 0  # patience stops the stage only once this many epochs have run
    keep_checkpoints: int = 2  # resume checkpoints kept
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" training, or "skip" the batch
    max_nonfinite_skips: int = 10  # skip: stop once more batches than this were skipped in the stage
    # epoch -> (batches every rank trains, batches other ranks have beyond those); None: agree per batch
    steps: Callable[[int], tuple[int, int] | None] = lambda epoch: None
    select_label: str = "valid"  # how epoch lines name the selection metric
    rows_per_batch: int = 0  # rows of one micro batch over every rank (for the samples/s of plain progress lines)
    # (items, targets) -> a teacher's model.SoftTargets for the batch (train.joint.distill); None: none
    teacher: Callable | None = None


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm (``train.on_nonfinite``); the message
    names the stage, step, batch and domains."""


@dataclass
class Step:
    """One training batch's outcome, the same on every rank (its statistics are all-reduced), on
    the device."""

    stats: torch.Tensor  # [2, n_domains]: global CE sums and target counts
    value: torch.Tensor  # 0-dim float64: the global-batch L = sum_d w_d * mean CE_d
    finite: torch.Tensor  # 0-dim bool: loss and (at an optimizer step) gradients finite
    skipped_by_deepspeed: bool = False  # ZeRO 1-3 skipped the step for a non-finite gradient norm


def train_step(engine, batch: dict, weights: list[float], device, *, skip: bool = False,
               teacher: Callable | None = None) -> Step:
    """Forward, backward, optimizer step (DeepSpeed applies accumulation and clipping).

    Nothing is read on the host here unless ``skip`` (``train.on_nonfinite=skip``): then a
    non-finite loss is not backpropagated (the step returns before backward), and a non-finite
    gradient norm leaves the weights as they were (ZeRO-0 steps with zero gradients at LR 0;
    ZeRO 1-3 skip on their own). Otherwise a non-finite step shows in ``Step.finite`` and is
    settled at the next sync point, before anything is saved. ``teacher``: see ``StagePlan.teacher``.
    """
    items, targets = batch["items"].to(device), batch["targets"].to(device)
    extra = {} if teacher is None else {"soft": teacher(items, targets)}
    sums, counts = engine(items, targets=targets, **extra)
    if fault_point("train.loss"):  # the fault tests' NaN batch
        sums = [s * float("nan") for s in sums]
    loss, stats = global_domain_loss(sums, counts, weights)
    value = loss_value(stats, weights)
    finite = torch.isfinite(value)
    if skip and not bool(finite):
        return Step(stats, value, finite)
    if fault_point("train.grad"):  # the fault tests' non-finite gradient (the loss value stays finite)
        loss = loss * float("inf")
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary:
        finite = finite & grads_finite(engine)
        if skip and not bool(finite):
            for group in engine.optimizer.param_groups:  # the scheduler sets the LR again after the step
                group["lr"] = 0.0
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
    engine.step()
    if step_skipped(engine, boundary):  # DeepSpeed read the norm already: this costs no sync
        finite = torch.zeros_like(finite)
    return Step(stats, value, finite)


class Monitor:
    """A stage's step statistics on the device: the epoch's summed loss and the first
    non-finite step (step, epoch, batch, whether the loss itself was finite, per-domain CE),
    read on the host at sync points only. Progress: a bar at a terminal, else (``log``: rank 0's)
    a plain line at each sync point (Slurm logs and pipes see training move)."""

    def __init__(self, plan: StagePlan, st: LoopState, device, log=None):
        self.plan, self.st = plan, st
        self.ep_loss = torch.tensor(st.ep_loss, dtype=torch.float64, device=device)
        self.bad_at = torch.full((4,), -1, dtype=torch.long, device=device)  # step, epoch, batch, loss finite
        self.bad_stats = torch.zeros(2, max(len(plan.domain_names), 1), device=device)
        self.bar = progress_bar(plan, st)
        self.plain = log if self.bar is None and plan_lines_wanted() else None
        self.t0, self.first = time.time(), st.batch_in_epoch
        self.shown = st.batch_in_epoch  # the batch count of the last plain line

    def add(self, step: Step) -> None:
        st = self.st
        if self.bar is not None:
            self.bar.update(1)
        self.ep_loss = self.ep_loss + step.value
        first = ~step.finite & (self.bad_at[0] < 0)
        where = torch.stack([torch.tensor(x, device=self.bad_at.device) for x in
                             (st.step + 1, st.epoch + 1, st.batch_in_epoch + 1)] + [torch.isfinite(step.value).long()])
        self.bad_at = torch.where(first, where, self.bad_at)
        self.bad_stats = torch.where(first, step.stats, self.bad_stats)

    def sync(self) -> None:
        """Settle the epoch loss into the loop state; NonFiniteError at the first non-finite step."""
        self.st.ep_loss = float(self.ep_loss)
        if self.bar is not None and self.st.ep_n:
            self.bar.set_postfix_str(f"loss {self.st.ep_loss / self.st.ep_n:.4f}")
        known = self.plan.steps(self.st.epoch)
        if (self.plain is not None and self.st.ep_n and self.st.batch_in_epoch > self.shown
                and (known is None or self.st.batch_in_epoch < known[0])):  # the epoch's end has its own line
            self.shown = self.st.batch_in_epoch
            self.plain(plain_progress(self.plan, self.st, done=self.st.batch_in_epoch - self.first,
                                      seconds=time.time() - self.t0))
        step, epoch, batch, loss_finite = (int(x) for x in self.bad_at.tolist())
        if step >= 0:
            what = "gradient norm" if loss_finite else "loss"
            raise NonFiniteError(_nonfinite_message(self.plan, step, epoch, batch, self.bad_stats, what)
                                 + "; training stopped (train.on_nonfinite), nothing saved after the last checkpoint:"
                                 " lower the learning rate, or set train.on_nonfinite=skip")


    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plan_lines_wanted() -> bool:
    """Plain progress lines unless ``XDREC_PROGRESS=0`` (which also turns the bars off)."""
    import os

    return os.environ.get("XDREC_PROGRESS") != "0"


def plain_progress(plan: StagePlan, st: LoopState, *, done: int, seconds: float) -> str:
    """``[stage] epoch e/E step k/K  loss x  N samples/s  ETA m:ss`` (K, ETA where the epoch's
    length is known)."""
    known = plan.steps(st.epoch)
    total = f"/{known[0]}" if known else ""
    rate = done / seconds if seconds > 0 else 0.0
    line = (f"[{plan.name}] epoch {st.epoch + 1}/{plan.epochs} step {st.batch_in_epoch}{total}  "
            f"loss {st.ep_loss / st.ep_n:.4f}  {rate * plan.rows_per_batch:,.0f} samples/s")
    if known and rate > 0:
        left = (known[0] - st.batch_in_epoch) / rate
        line += f"  ETA {int(left // 60)}:{int(left % 60):02d}"
    return line


def progress_bar(plan: StagePlan, st: LoopState):
    """A bar over the epoch's optimizer steps (steps/s, ETA, the epoch's mean loss at each sync
    point): :func:`train.progress.bar`."""
    known = plan.steps(st.epoch)
    return bar(f"[{plan.name}] epoch {st.epoch + 1}/{plan.epochs}", known[0] if known else None, "step",
               initial=st.batch_in_epoch)


def _nonfinite_message(plan: StagePlan, step: int, epoch: int, batch: int, stats: torch.Tensor, what: str) -> str:
    means = domain_means(stats).tolist()
    ce = ", ".join(f"{n} {m:.4g}" for n, m, c in zip(plan.domain_names, means, stats[1].tolist()) if c)
    return (f"stage {plan.name}, step {step} (epoch {epoch}, batch {batch}): non-finite {what} "
            f"(mean CE per domain of the batch: {ce})")


def _skipped(plan: StagePlan, st: LoopState, step: Step, log) -> bool:
    """``train.on_nonfinite=skip``: whether the step was not finite (then counted and logged, or
    NonFiniteError past ``max_nonfinite_skips``)."""
    if bool(step.finite):
        return False
    what = "gradient norm" if bool(torch.isfinite(step.value)) else "loss"
    msg = _nonfinite_message(plan, st.step + 1, st.epoch + 1, st.batch_in_epoch + 1, step.stats, what)
    if st.skipped >= plan.max_nonfinite_skips:
        raise NonFiniteError(f"{msg}; {st.skipped} batch(es) skipped before, train.max_nonfinite_skips="
                             f"{plan.max_nonfinite_skips}; training stopped (train.on_nonfinite), nothing saved after "
                             "the last checkpoint: lower the learning rate")
    st.skipped += 1
    log(f"[{plan.name}] skipped: {msg} ({st.skipped} skipped in this stage, at most {plan.max_nonfinite_skips})")
    return True


def _log_step(plan: StagePlan, st: LoopState, step: Step, engine, tracker: Tracker) -> None:
    rec = {"loss": float(step.value), "lr": engine.get_lr()[0], "epoch": st.epoch + 1, "stage_step": st.step}
    for name, m, c in zip(plan.domain_names, domain_means(step.stats).tolist(), step.stats[1].tolist()):
        if c:  # the domain had targets in this global batch
            rec[f"ce_{name}"] = m
    tracker.log({plan.name: rec}, step=tracker.step + 1)


def _next_batches(plan: StagePlan, st: LoopState, log) -> Iterator[dict]:
    """This epoch's batches from the first not yet trained, as many as every rank has."""
    batches = iter(plan.batches(st.epoch))
    for _ in range(st.batch_in_epoch):  # already trained before the restart
        next(batches, None)
    known = plan.steps(st.epoch)
    if known is not None:
        n, left = known
        for k in range(st.batch_in_epoch, n):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"stage {plan.name} epoch {st.epoch + 1}: this rank's stream ended after {k} of the "
                                   f"{n} batches its manifest counts (a shard changed since it was prepared?)")
            yield batch
        if left:
            log(f"[{plan.name}] epoch {st.epoch + 1}: {left} batches left on some ranks after the shortest rank's "
                f"{n}; skipped to keep ranks in step")
        return
    while True:  # counts not known: agree on each batch
        batch = next(batches, None)
        if not all_ranks(batch is not None):
            left = sum_over_ranks((batch is not None) + sum(1 for _ in batches))
            if left:
                log(f"[{plan.name}] epoch {st.epoch + 1}: {left} batches left on some ranks after the shortest rank "
                    "ran dry; skipped to keep ranks in step")
            return
        yield batch


def run_epoch(engine, plan: StagePlan, st: LoopState, monitor: Monitor, *, device, tracker: Tracker,
              stopper: "Stopper", checkpoint: Callable[[], str], log) -> None:
    """Train the rest of ``st.epoch``; StageInterrupted after a resume checkpoint when asked to stop."""
    skip = plan.on_nonfinite == "skip"
    for batch in _next_batches(plan, st, log):
        step = train_step(engine, batch, plan.weights, device, skip=skip, teacher=plan.teacher)
        if skip and _skipped(plan, st, step, log):
            if not bool(torch.isfinite(step.value)):  # not backpropagated: no step taken
                st.batch_in_epoch += 1
                continue
            step.finite = torch.ones_like(step.finite)  # the weights were left as they were
        monitor.add(step)
        st.step, st.batch_in_epoch, st.ep_n = st.step + 1, st.batch_in_epoch + 1, st.ep_n + 1
        if st.step % plan.log_every == 0:
            _log_step(plan, st, step, engine, tracker)
        if st.step % plan.grad_accum:
            continue  # mid-accumulation: gradients not yet applied are not checkpointed
        sync = st.step % plan.log_every == 0
        if sync:
            monitor.sync()
        if stopper.should_stop(plan.grad_accum, poll=sync):
            monitor.sync()
            raise StageInterrupted(plan.name, st.step, plan.ckpt_dir / checkpoint(), signal=stopper.signal)
        if plan.checkpoint_every and st.step % plan.checkpoint_every == 0:
            monitor.sync()
            checkpoint()
    monitor.sync()


def patience_ends(bad: int, patience: int, epochs_run: int, min_epochs: int) -> bool:
    """Early stopping: ``bad`` evaluations in a row without a better valid metric reach
    ``patience``, and at least ``min_epochs`` epochs have run."""
    return bad >= patience and epochs_run >= min_epochs


def end_epoch(engine, plan: StagePlan, st: LoopState, *, tracker: Tracker, elapsed: Callable[[], float],
              log) -> None:
    """Evaluate on valid, keep the best weights, apply patience and the LR plateau decay."""
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
    tracker.log({plan.name: {"epoch_loss": st.losses[-1], "valid_select": score, "epoch": st.epoch + 1,
                             "lr_scale": st.lr_scale, "stage_step": st.step}})
    log(f"[{plan.name}] epoch {st.epoch + 1}/{plan.epochs}  loss {st.losses[-1]:.4f}  {plan.select_label} {score:.4f}"
        f"{'  * best so far, kept' if improved else ''}  ({elapsed():.0f}s)")
    if patience_ends(st.bad, plan.patience, st.epoch + 1, plan.min_epochs):
        log(f"[{plan.name}] no better valid metric for {plan.patience} evaluations; stopping")
        st.done = True
    elif not improved and plan.plateau_decay < 1.0:
        st.lr_scale *= plan.plateau_decay
        set_lr_scale(engine.lr_scheduler, st.lr_scale)
        log(f"[{plan.name}] no gain: LR scaled by {st.lr_scale:.4g} from now on")
    st.epoch, st.batch_in_epoch, st.ep_loss, st.ep_n = st.epoch + 1, 0, 0.0, 0


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
        monitor = Monitor(plan, st, device, log)
        try:
            run_epoch(engine, plan, st, monitor, device=device, tracker=tracker, stopper=stopper,
                      checkpoint=checkpoint, log=log)
        finally:
            monitor.close()
        end_epoch(engine, plan, st, tracker=tracker, elapsed=elapsed, log=log)
        checkpoint()
    load_weights(engine, plan.ckpt_dir)
    engine.eval()
    return {"best_epoch": st.best_epoch, "best_valid_select": st.best, "steps": st.step, "epoch_losses": st.losses,
            "wall_s": elapsed(), "nonfinite_skipped": st.skipped}


class StageInterrupted(Exception):
    """Training stopped on request (signal or step budget) after writing a resume checkpoint.
    ``signal``: the stop signal's number (0: the step budget); SIGUSR1 is a preemption."""

    def __init__(self, stage: str, step: int, path: Path, *, signal: int = 0):
        import signal as sig

        why = "after train.stop_after_steps" if not signal else (
            "on a preemption signal (SIGUSR1)" if signal == sig.SIGUSR1 else f"on {sig.Signals(signal).name}")
        super().__init__(f"stage {stage} stopped at step {step} {why}; resume checkpoint {path}")
        self.stage, self.step, self.path, self.signal = stage, step, path, signal
        self.preempted = signal == sig.SIGUSR1


class Stopper:
    """Asks every rank to stop at the same optimizer-step boundary: once this process has taken
    ``stop_after_steps`` training batches (0 = never; counted at accumulation boundaries, the same
    on every rank, so decided without communication) or on a stop signal (see ``launch.signals``)
    on any rank: polled at every optimizer step in one process, at sync points (one all-reduce)
    with several ranks."""

    def __init__(self, stop_after_steps: int = 0):
        self.budget = stop_after_steps
        self.taken = 0
        self.signal = 0  # the stop signal some rank received (the largest number where they differ)

    def should_stop(self, batches: int = 1, *, poll: bool = True) -> bool:
        """Called at each optimizer step with the batches it consumed; ``poll``: also agree on
        the signal (one all-reduce; always polled without other ranks). True on every rank at once."""
        self.taken += batches
        budget = self.budget > 0 and self.taken >= self.budget
        if poll or world_size() == 1:
            self.signal = int(max_over_ranks([requested()])[0])
        return bool(self.signal or budget)


def score_fn(engine) -> Callable:
    """``(items, domain, consume) -> consume(scorer)`` through the engine (so ZeRO-3 gathers the
    parameters for the whole of the consumer's work)."""
    return lambda items, domain, consume: engine(items, domain=domain, consume=consume)
