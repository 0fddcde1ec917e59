"""Preemption and time limits: signals set a flag; the training loop acts at a step boundary.

Slurm sends ``SIGUSR1`` ahead of a job's time limit (``#SBATCH --signal=B:USR1@<lead>``, forwarded
to the tasks by the batch script) and ``SIGTERM`` when it cancels or preempts a job. A handler
must not do I/O or collectives (it runs between two bytecodes of whatever the process was doing),
so it only records the signal. At the next step boundary every rank asks
:meth:`Preemption.requested`, which all-reduces the flag so all ranks stop at the *same* step;
the stage runner then writes a mid-epoch checkpoint and raises :class:`Preempted`.

- ``SIGUSR1``: checkpoint, then requeue the Slurm job (``scontrol requeue``, rank 0) so it resumes
  where it stopped; exit status 75 (``EX_TEMPFAIL``).
- ``SIGTERM``: checkpoint and exit 75 without requeueing -- a user's ``scancel`` means stop, and a
  preemption with ``PreemptMode=REQUEUE`` is requeued by Slurm itself.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from binaryduo.slurm.status import EXIT_PREEMPTED  # noqa: F401 - the trainer's exit status

REQUEUE_SIGNAL = signal.SIGUSR1
STOP_SIGNAL = signal.SIGTERM


class Preempted(Exception):
    """A signal asked the run to stop; a checkpoint of the current position has been written."""

    def __init__(self, message: str, *, requeue: bool):
        super().__init__(message)
        self.requeue = requeue


class Preemption:
    """Installs the handlers on construction (main thread); :meth:`restore` puts back the old."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        for signum in (REQUEUE_SIGNAL, STOP_SIGNAL):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        # only a flag: the loop checks it at the next step boundary
        if self.signal != REQUEUE_SIGNAL:  # USR1 (requeue) wins over TERM when both arrive
            self.signal = signum

    def local_code(self) -> int:
        """This rank's request, no collective: 0 none, 1 stop (TERM), 2 stop and requeue (USR1).
        The training loop agrees it with the other ranks in its per-step all-reduce."""
        return {None: 0, STOP_SIGNAL: 1, REQUEUE_SIGNAL: 2}[self.signal]

    def agree(self, code: int) -> None:
        """Adopts the ranks' agreed request (the highest code), so every rank stops alike."""
        if code:
            self.signal = REQUEUE_SIGNAL if code == 2 else STOP_SIGNAL

    def requested(self, device) -> bool:
        """Whether any rank received a signal (every rank gets the same answer; one all-reduce)."""
        import torch  # here, not at import: the handlers are installed before torch loads
        import torch.distributed as dist

        code = self.local_code()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        self.agree(code)
        return code > 0

    @property
    def wants_requeue(self) -> bool:
        return self.signal == REQUEUE_SIGNAL

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def slurm_job_id(environ=os.environ) -> str | None:
    """The id to requeue this Slurm job by: ``ARRAYJOB_TASK`` in an array task (the array job's
    own id names every task of the array, and the last task to start even has it as its
    ``SLURM_JOB_ID``: requeueing that would end the attempts of every running seed), else
    ``SLURM_JOB_ID``."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> str:
    """Requeues this Slurm job, or this task of a job array (rank 0 only); returns what was
    done, for the log line."""
    job = slurm_job_id()
    if not job:
        return "not a Slurm job: resume with `binaryduo train ... --resume RUN_DIR`"
    if os.environ.get("BINARYDUO_NO_REQUEUE") == "1":
        return f"Slurm job {job} not requeued (BINARYDUO_NO_REQUEUE=1)"
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True,
                       timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        print(f"binaryduo: could not requeue Slurm job {job}: {detail.strip()}", file=sys.stderr)
        return f"Slurm job {job} NOT requeued; resubmit it or resume by hand"
    return f"Slurm job {job} requeued"
