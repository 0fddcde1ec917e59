"""One training epoch and one distributed evaluation, readable top to bottom."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from binaryduo.models import clip_latent_weights_

from binaryduo.trainer.run.health import NO_HEALTH, StageHealth
from binaryduo.trainer.run.precision import compute_precision, to_device
from binaryduo.trainer.runtime.distributed import DistributedContext, all_reduce_sum
from binaryduo.trainer.runtime.faults import NO_FAULTS, EpochFaults


@dataclass(frozen=True)
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_wait_fraction: float
    lr: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class EpochProgress:
    """This rank's running sums within an epoch; saved with a mid-epoch checkpoint so a resumed
    epoch reports the same loss, bit for bit, as an uninterrupted one."""

    loss_sum: float = 0.0
    images: int = 0
    steps: int = 0
    waited: float = 0.0
    seconds: float = 0.0
    lr: float = float("nan")
    stopped: bool = False  # the epoch was interrupted (preemption) after `steps` steps


@dataclass(frozen=True)
class EvalStats:
    top1: float
    top5: float
    loss: float
    images: int


def _split(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels[, valid mask]) from a loader batch."""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    return batch[0], batch[1], None


def gradients(engine) -> list[torch.Tensor]:
    """The gradients the optimizer is about to apply, on this rank, after the backward pass.

    ZeRO 0: the parameters' ``.grad``, already all-reduced (the same on every rank). ZeRO 1:
    DeepSpeed has moved them into its optimizer's ``averaged_gradients`` (this rank's partition,
    reduced) and cleared ``.grad``; the other partitions are checked by their ranks."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    partitions = getattr(engine.optimizer, "averaged_gradients", None)
    if isinstance(partitions, dict):
        grads += [t for group in partitions.values() for t in (group or []) if t is not None]
    return grads


def _all_finite(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """A device-side boolean (no host sync): the loss and every gradient are finite. The total
    norm is inf or NaN exactly when an element is (or when a finite norm overflows float32,
    ~1e19, which is divergence too)."""
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
    return finite


class StopSignal(Protocol):
    """What the loop asks at every step (:class:`binaryduo.trainer.runtime.preemption.Preemption`):
    this rank's request (0 none, 1 stop, 2 stop and requeue; no collective) and, once the ranks
    agreed, the agreed one."""

    def local_code(self) -> int: ...

    def agree(self, code: int) -> None: ...


@dataclass(frozen=True)
class StepVerdict:
    """The one decision of a step, agreed by every rank, with the rank-mean loss for display."""

    diverged: bool   # the loss or a gradient was not finite on some rank
    stop_code: int   # a preemption request reached some rank: 2 requeue, 1 stop, 0 none
    mean_loss: float


def agree_on_step(finite: torch.Tensor, loss: torch.Tensor, stop_code: int,
                  ctx: DistributedContext) -> StepVerdict:
    """One small all-reduce and one device-to-host read per step: the stop decision (divergence
    on any rank, preemption on any rank) and the mean loss (the progress bar's, for free).

    Built with device ops only (``fill_`` takes the Python scalar as a kernel argument), so
    nothing waits for the device before the read itself. Sums: a flag is set when its sum is
    positive; requeue (2) wins over stop (1) as in :class:`Preemption`."""
    votes = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    votes[0] = (~finite).to(torch.float64)
    votes[1].fill_(float(stop_code == 1))
    votes[2].fill_(float(stop_code == 2))
    votes[3] = loss.detach().to(torch.float64)
    diverged, stop, requeue, loss_sum = all_reduce_sum(votes, ctx.device)  # the one host sync
    return StepVerdict(diverged=diverged > 0, stop_code=2 if requeue > 0 else int(stop > 0),
                       mean_loss=loss_sum / ctx.world_size)


def _divergence(loss: torch.Tensor, finite_here: bool, step_in_epoch: int,
                global_step: int) -> str:
    """Why this rank stops (the stop decision was agreed; this is only its reason)."""
    value = loss.item()
    if not math.isfinite(value):
        why = f"training loss is {value}"
    elif not finite_here:
        why = f"the gradients are not finite (loss {value:.4g})"
    else:
        why = "the loss or the gradients are not finite on another rank"
    return f"{why} at step {step_in_epoch} of the epoch (global step {global_step})"


def train_epoch(engine, loader: Iterable, *, ctx: DistributedContext, dtype: torch.dtype,
                lr_at: Callable[[int], float], first_step: int, log_every: int,
                on_log: Callable[[int, dict[str, float]], None], progress=None,
                resumed: EpochProgress | None = None, stop: StopSignal | None = None,
                faults: EpochFaults = NO_FAULTS.at_epoch("", 0),
                health: StageHealth = NO_HEALTH, distill=None) -> EpochProgress:
    """Trains ``engine`` over ``loader`` (the rest of an epoch); returns this rank's sums, with
    ``stopped`` set when a preemption request (``stop``, asked at every step) reached any rank.

    ``first_step`` is the global step of the loader's first batch and ``resumed`` the sums of
    the steps an interrupted attempt already did. The LR is set from ``lr_at(global step)``
    before every step (a pure function: resuming needs no scheduler state). Latent weight
    clipping, where the model asks for it, acts on the parameters DeepSpeed steps (the fp32
    masters at ZeRO 0 / fp32).

    ``dtype`` bf16 runs the forward pass under bf16 autocast (:func:`compute_precision`); the
    weights, gradients and optimizer stay float32.

    One host-device synchronisation per step (:func:`agree_on_step`): whether the loss and
    every gradient were finite (computed before the optimizer step, on the gradients it
    applies), whether a preemption signal arrived, and the loss to display, in one all-reduce
    after the optimizer step, so the device never waits for the host in between. A non-finite
    loss or gradient on any rank raises ``FloatingPointError`` on every rank at that step; the
    step was applied to this engine's weights, which are therefore never checkpointed (the run
    stops; the last checkpoint holds the last good weights). ``faults`` is called at its named
    points (after the backward pass, after the step; see :mod:`binaryduo.trainer.runtime.faults`);
    so is ``health`` (before the forward pass, after the backward pass, after the step; device
    work only: :mod:`binaryduo.trainer.run.health`). ``distill`` (a
    :class:`~binaryduo.trainer.run.distill.Distiller`) replaces the cross-entropy with the
    distillation loss against its teacher's logits for the same batch.
    """
    engine.train()
    sums = EpochProgress(**(resumed.__dict__ if resumed else {}))
    sums.stopped = False
    step = first_step
    loss_sum = torch.tensor(sums.loss_sum, dtype=torch.float64, device=ctx.device)
    started = time.perf_counter()
    fetch_started = started
    images_before = sums.images
    for batch in loader:
        inputs, labels, _ = _split(batch)
        sums.waited += time.perf_counter() - fetch_started
        sums.lr = lr_at(step)
        for group in engine.optimizer.param_groups:  # each role's multiple (deepspeed_engine)
            group["lr"] = sums.lr * group.get("lr_mult", 1.0)
        health.step_started(step)
        device_inputs = to_device(inputs, ctx.device)
        with compute_precision(dtype, ctx.device):
            logits = engine(device_inputs)
        loss = (F.cross_entropy(logits.float(), labels.to(ctx.device)) if distill is None
                else distill.loss(logits, labels.to(ctx.device), device_inputs))
        engine.backward(loss)
        grads = gradients(engine)
        health.after_backward()
        faults.after_backward(engine.module, grads, sums.steps + 1)
        finite = _all_finite(loss, grads)  # before the step: ZeRO 1 frees its partitions in it
        engine.step()
        clip_latent_weights_(engine.module)
        health.after_step()
        loss_sum += loss.detach().to(torch.float64)
        sums.images += labels.shape[0]
        sums.steps += 1
        step += 1
        faults.after_step(sums.steps)
        # every rank takes the same decision (a rank that stopped alone would leave the others
        # waiting in the next collective)
        verdict = agree_on_step(finite, loss, stop.local_code() if stop else 0, ctx)
        if verdict.diverged:
            raise FloatingPointError(_divergence(loss, bool(finite), sums.steps, step))
        if progress is not None:
            progress.update(1)
            elapsed = time.perf_counter() - started
            progress.set_postfix(
                loss=f"{verdict.mean_loss:.3f}",
                img_s=f"{(sums.images - images_before) * ctx.world_size / max(elapsed, 1e-9):.0f}",
                refresh=False)
        if log_every and step % log_every == 0:
            on_log(step, {"train_loss_step": verdict.mean_loss, "lr": sums.lr,
                          **health.step_metrics()})  # a collective: every rank logs here
        fetch_started = time.perf_counter()
        if verdict.stop_code:
            stop.agree(verdict.stop_code)
            sums.stopped = True
            break
    sums.seconds += time.perf_counter() - started
    sums.loss_sum = float(loss_sum)
    return sums


def epoch_stats(sums: EpochProgress, ctx: DistributedContext) -> EpochStats:
    """Rank-averaged statistics of a finished epoch (a collective: every rank calls it)."""
    total_loss, total_images, total_steps = all_reduce_sum(
        [sums.loss_sum, float(sums.images), float(sums.steps)], ctx.device)
    return EpochStats(loss=total_loss / max(total_steps, 1), images=int(total_images),
                      seconds=sums.seconds, data_wait_fraction=sums.waited / max(sums.seconds, 1e-9),
                      lr=sums.lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, *, ctx: DistributedContext,
             dtype: torch.dtype, after_first_batch: Callable[[], None] | None = None) -> EvalStats:
    """Top-1/top-5 over every validation image exactly once across ranks (padding masked out).
    ``after_first_batch`` is a fault-injection point (see :mod:`binaryduo.trainer.runtime.faults`)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for batch in loader:
        inputs, labels, valid = _split(batch)
        labels = labels.to(ctx.device)
        with compute_precision(dtype, ctx.device):
            logits = model(to_device(inputs, ctx.device)).float()
        if valid is not None:
            keep = valid.to(ctx.device).bool()
            logits, labels = logits[keep], labels[keep]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels.unsqueeze(1))
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum")) if labels.numel() else 0.0
        count += labels.numel()
        if after_first_batch is not None:
            after_first_batch()
            after_first_batch = None
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count],
                                                         ctx.device)
    model.train(was_training)
    if count == 0:
        raise RuntimeError("evaluation saw no images")
    return EvalStats(top1=100.0 * correct1 / count, top5=100.0 * correct5 / count,
                     loss=loss_sum / count, images=int(count))
