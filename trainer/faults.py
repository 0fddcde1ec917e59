"""Fault injection for the reliability suite (tests/reliability/): real faults at named points.

Off unless ``BINARYDUO_FAULT`` is set; every hook is a string comparison, so production runs pay
nothing. One fault per process, ``KIND:ARGS`` (epochs and steps 1-based, STAGE a stage name):

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
  (preemption, through the real handler; see stages._stop_check);
- ``disk_full:STAGE:EPOCH``: writing EPOCH's checkpoint fails part-way with ENOSPC, as a full
  disk does (the model file is left cut short);
- ``nan:STAGE:EPOCH:STEP[:RANK]``: after step STEP's backward pass the weights are poisoned
  with NaN (divergence), on every rank or on RANK only.
"""
from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "BINARYDUO_FAULT"


def _fault() -> list[str]:
    value = os.environ.get(FAULT_ENV)
    return value.split(":") if value else []


def kill_point(point: str, stage: str, epoch: int, step: int | None = None) -> None:
    """``kill:POINT:STAGE:EPOCH[:STEP]``: SIGKILL this process here."""
    fault = _fault()
    want = ["kill", point, stage, str(epoch)] + ([str(step)] if step is not None else [])
    if fault == want:
        os.kill(os.getpid(), signal.SIGKILL)


def rank_error(stage: str, epoch: int, rank: int) -> None:
    """``error:RANK:STAGE:EPOCH``: this rank raises (the job must fail promptly, not hang)."""
    if _fault() == ["error", str(rank), stage, str(epoch)]:
        raise RuntimeError(f"injected fault on rank {rank} in stage {stage!r} epoch {epoch}")


def signal_after(stage: str, epoch: int, rank: int) -> tuple[int, int] | None:
    """``signal:SIG:RANK:STAGE:EPOCH:STEP`` -> (signal number, step) for this rank, or None."""
    fault = _fault()
    if len(fault) == 6 and fault[0] == "signal" and fault[2] == str(rank) and \
            fault[3] == stage and fault[4] == str(epoch):
        return getattr(signal, f"SIG{fault[1]}"), int(fault[5])
    return None


def disk_full(stage: str, epoch: int) -> bool:
    """``disk_full:STAGE:EPOCH``: the checkpoint writer of that epoch fails."""
    return _fault() == ["disk_full", stage, str(epoch)]


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


def poison_step(stage: str, epoch: int, rank: int) -> int | None:
    """``nan:STAGE:EPOCH:STEP[:RANK]`` -> STEP for this stage, epoch and rank, or None."""
    fault = _fault()
    if len(fault) in (4, 5) and fault[0] == "nan" and fault[1] == stage and \
            fault[2] == str(epoch) and (len(fault) == 4 or fault[4] == str(rank)):
        return int(fault[3])
    return None
