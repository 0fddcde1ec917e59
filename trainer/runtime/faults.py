"""Fault injection for the reliability suite (tests/reliability/): real faults at named points.

Production code holds one :class:`FaultHooks` object and calls it at the points named below; it
is built once from ``BINARYDUO_FAULT`` and does nothing when that is unset, so production runs pay
one attribute check per call. One fault per process, ``KIND:ARGS`` (epochs and steps 1-based,
STAGE a stage name):

- ``kill:POINT:STAGE:EPOCH[:STEP]``: the process sends itself SIGKILL (exactly ``kill -9``: no
  handler, no cleanup, no flush) at POINT --
  ``step`` (mid-step: after the backward pass of step STEP of EPOCH, before the optimizer step),
  ``eval`` (after the first validation batch of EPOCH's evaluation),
  ``checkpoint`` (mid-write: DeepSpeed's files of EPOCH's checkpoint written, the rest not yet),
  ``manifest`` (the checkpoint renamed into place, the manifest not yet updated),
  ``after_checkpoint`` (EPOCH's checkpoint complete),
  ``decouple`` (the stage's model decoupled and checked, before its first step);
- ``error:RANK:STAGE:EPOCH``: rank RANK raises at the start of EPOCH (a crashing rank);
- ``signal:SIG:RANK:STAGE:EPOCH:STEP``: rank RANK sends itself SIGUSR1/SIGTERM after STEP
  (preemption, through the real handler);
- ``disk_full:STAGE:EPOCH``: writing EPOCH's checkpoint fails part-way with ENOSPC, as a full
  disk does (the model file is left cut short);
- ``nan:STAGE:EPOCH:STEP[:RANK]``: after step STEP's backward pass the weights are poisoned
  with NaN (divergence), on every rank or on RANK only;
- ``inf_grad:STAGE:EPOCH:STEP[:RANK]``: after step STEP's backward pass one gradient element is
  set to +inf (an overflowing gradient), on every rank or on RANK only;
- ``bad_decouple:RANK:STAGE``: rank RANK's decoupled weights are perturbed right before the
  decoupling check of STAGE (a rank whose weights are not the decoupled ones).
"""
from __future__ import annotations

import errno
import os
import signal

import torch

FAULT_ENV = "BINARYDUO_FAULT"


class FaultHooks:
    """The named points where a fault can be injected; every method is a no-op without one."""

    def __init__(self, spec: str | None, rank: int = 0):
        self.fault = spec.split(":") if spec else []
        self.rank = rank

    @classmethod
    def from_environment(cls, rank: int = 0) -> "FaultHooks":
        return cls(os.environ.get(FAULT_ENV), rank)

    @property
    def active(self) -> bool:
        return bool(self.fault)

    def at_epoch(self, stage: str, epoch: int) -> "EpochFaults":
        """The points inside one epoch (``epoch`` 1-based), for the training loop."""
        return EpochFaults(self, stage, epoch)

    def kill_point(self, point: str, stage: str, epoch: int, step: int | None = None) -> None:
        """``kill:POINT:STAGE:EPOCH[:STEP]``: SIGKILL this process here."""
        if self.fault and self.fault == ["kill", point, stage, str(epoch)] + (
                [str(step)] if step is not None else []):
            os.kill(os.getpid(), signal.SIGKILL)

    def epoch_started(self, stage: str, epoch: int) -> None:
        """``error:RANK:STAGE:EPOCH``: this rank raises (the job must fail promptly, not hang)."""
        if self.fault and self.fault == ["error", str(self.rank), stage, str(epoch)]:
            raise RuntimeError(f"injected fault on rank {self.rank} in stage {stage!r} "
                               f"epoch {epoch}")

    def after_backward(self, module: torch.nn.Module, grads: list[torch.Tensor], stage: str,
                       epoch: int, step_in_epoch: int) -> None:
        """``kill:step``, ``nan`` and ``inf_grad``: after the backward pass of a step (its
        gradients already all-reduced), before the optimizer's."""
        if not self.fault:
            return
        self.kill_point("step", stage, epoch, step_in_epoch)
        if self._poison_step("nan", stage, epoch) == step_in_epoch:
            with torch.no_grad():  # this rank's weights only (its gradients were already sent)
                for parameter in module.parameters():
                    parameter.fill_(float("nan"))
        if self._poison_step("inf_grad", stage, epoch) == step_in_epoch and grads:
            with torch.no_grad():
                grads[0].view(-1)[0] = float("inf")

    def before_decoupling_check(self, module: torch.nn.Module, stage: str) -> None:
        """``bad_decouple:RANK:STAGE``: this rank's decoupled weights drift from the rule's."""
        if self.fault and self.fault == ["bad_decouple", str(self.rank), stage]:
            with torch.no_grad():
                next(module.parameters()).add_(1e-3)

    def after_step(self, stage: str, epoch: int, step_in_epoch: int) -> None:
        """``signal:SIG:RANK:STAGE:EPOCH:STEP``: this rank sends itself a preemption signal, which
        the real handler turns into a stop at the next step boundary."""
        fault = self.fault
        if len(fault) == 6 and fault[0] == "signal" and fault[2] == str(self.rank) and \
                fault[3] == stage and fault[4] == str(epoch) and fault[5] == str(step_in_epoch):
            os.kill(os.getpid(), getattr(signal, f"SIG{fault[1]}"))

    def checkpoint_file(self, handle, stage: str, epoch: int, step: int):
        """The file an epoch-end model file is written to: under ``disk_full:STAGE:EPOCH`` one
        whose disk fills up part-way."""
        if not step and self.fault == ["disk_full", stage, str(epoch)]:
            return FullDisk(handle)
        return handle

    def _poison_step(self, kind: str, stage: str, epoch: int) -> int | None:
        """``KIND:STAGE:EPOCH:STEP[:RANK]`` -> STEP for this stage, epoch and rank, or None."""
        fault = self.fault
        if len(fault) in (4, 5) and fault[0] == kind and fault[1] == stage and \
                fault[2] == str(epoch) and (len(fault) == 4 or fault[4] == str(self.rank)):
            return int(fault[3])
        return None


#: What code outside a training run (and tests) uses: no fault at any point.
NO_FAULTS = FaultHooks(None)


class EpochFaults:
    """:class:`FaultHooks` bound to one stage and epoch: what the training loop calls."""

    def __init__(self, hooks: FaultHooks, stage: str, epoch: int):
        self.hooks, self.stage, self.epoch = hooks, stage, epoch

    def after_backward(self, module: torch.nn.Module, grads: list[torch.Tensor],
                       step_in_epoch: int) -> None:
        self.hooks.after_backward(module, grads, self.stage, self.epoch, step_in_epoch)

    def after_step(self, step_in_epoch: int) -> None:
        self.hooks.after_step(self.stage, self.epoch, step_in_epoch)

    def after_first_eval_batch(self) -> None:
        self.hooks.kill_point("eval", self.stage, self.epoch)


class FullDisk:
    """A file whose disk fills up after ``room`` bytes: the write that overflows writes what
    fits, then raises ENOSPC, as a full disk does (the file is left cut short)."""

    def __init__(self, handle, room: int = 1 << 16):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.handle.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()
