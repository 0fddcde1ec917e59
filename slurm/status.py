"""A submitted job's state: what Slurm says (``scontrol``, then ``sacct``), else what the run
directory's ``slurm/attempts.log`` says (the batch script writes one line per attempt start/end).

The parsers are pure functions of the commands' output, so they are tested without Slurm; only
:func:`query_job` runs the commands.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Callable

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}
#: The exit status of a training task stopped on request with a checkpoint (EX_TEMPFAIL): the
#: trainer exits with it (binaryduo.trainer.runtime.preemption imports it from here) and the job
#: script and ``slurm status`` read it as "preempted, resumable".
EXIT_PREEMPTED = 75


@dataclass
class JobState:
    job_id: str
    #: Slurm's state (RUNNING, COMPLETED, FAILED, ...) or UNKNOWN.
    state: str
    #: Where it came from: scontrol, sacct or files (the run directory's attempts.log).
    source: str
    reason: str | None = None
    exit_code: str | None = None
    restarts: int | None = None
    nodes: str | None = None
    run_time: str | None = None
    stderr_path: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def failed(self) -> bool:
        return not self.active and self.state != "COMPLETED"


def parse_scontrol_job(text: str) -> dict[str, str]:
    """``scontrol show job -o`` (or its multi-line form): ``Key=Value`` pairs.

    Values may contain spaces only in a few keys at the end of a line (``Command``, ``WorkDir``,
    ``StdErr``...), so a token without ``=`` is joined to the previous value."""
    fields: dict[str, str] = {}
    last = None
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and re.match(r"^[A-Za-z][A-Za-z0-9_:/]*$", key):
            fields[key] = value
            last = key
        elif last is not None:
            fields[last] += " " + token
    return fields


def task_ids(text: str) -> set[int]:
    """An array's task index list as Slurm prints it: ``4``, ``3-5,7``, ``[3-5%2]``."""
    ids: set[int] = set()
    for item in text.strip("[]").split("%")[0].split(","):
        first, _, last = item.strip().partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            ids.update(range(int(first), int(last or first) + 1))
    return ids


def split_array_id(job_id: str) -> tuple[str, int] | None:
    """``"81234_3"`` (an array task) -> ``("81234", 3)``; None for a plain job id."""
    array, sep, task = job_id.partition("_")
    return (array, int(task)) if sep and array.isdigit() and task.isdigit() else None


def _is_job(fields: dict[str, str], job_id: str) -> bool:
    """Whether a ``scontrol`` record is ``job_id``; an array task ``A_N`` is the record of array
    A whose ArrayTaskId holds N (a started task has its own record, the pending ones share one)."""
    task = split_array_id(job_id)
    if task is None:
        return fields.get("JobId") == job_id
    return (fields.get("ArrayJobId") == task[0]
            and task[1] in task_ids(fields.get("ArrayTaskId", "")))


def state_from_scontrol(job_id: str, text: str) -> JobState | None:
    """The record of ``job_id`` (a job, or an array task ``A_N``) in ``scontrol show job``."""
    records = re.split(r"\n(?=JobId=)", text.strip())
    fields = next((f for f in map(parse_scontrol_job, records) if _is_job(f, job_id)), {})
    if "JobState" not in fields:
        return None
    restarts = fields.get("Restarts")
    return JobState(job_id, fields["JobState"], "scontrol",
                    reason=None if fields.get("Reason") in (None, "None") else fields["Reason"],
                    exit_code=fields.get("ExitCode"),
                    restarts=int(restarts) if restarts and restarts.isdigit() else None,
                    nodes=None if fields.get("NodeList") in (None, "(null)") else fields["NodeList"],
                    run_time=fields.get("RunTime"), stderr_path=fields.get("StdErr"))


def state_from_sacct(job_id: str, text: str) -> JobState | None:
    """``sacct -n -P -X -j ID -o JobID,State,ExitCode,Elapsed,NodeList`` (the last record wins:
    a requeued job has one per attempt with ``--duplicates``). An array task ``A_N`` matches the
    rows ``A_N`` and a pending ``A_[...]`` that holds N."""
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    task = split_array_id(job_id)
    if task is None:
        rows = [r for r in rows if len(r) >= 5 and r[0].split("_")[0] == job_id]
    else:
        rows = [r for r in rows if len(r) >= 5 and r[0].partition("_")[0] == task[0]
                and task[1] in task_ids(r[0].partition("_")[2])]
    if not rows:
        return None
    _, state, exit_code, elapsed, nodes = rows[-1][:5]
    return JobState(job_id, state.split()[0] if state else "UNKNOWN", "sacct",
                    exit_code=exit_code or None, run_time=elapsed or None,
                    nodes=None if nodes in ("", "None assigned") else nodes,
                    restarts=len(rows) - 1 if len(rows) > 1 else None)


@dataclass
class Attempt:
    job_id: str
    attempt: int
    started: str
    ended: str | None = None
    status: int | None = None
    detail: str = ""


def parse_attempts(text: str) -> list[Attempt]:
    """The batch script's ``attempts.log``: ``TIME job=ID attempt=N start ...`` / ``... end status=S``."""
    attempts: list[Attempt] = []
    pattern = re.compile(r"^(\S+) job=(\S+) attempt=(\d+) (start|end)\b ?(.*)$")
    for line in text.splitlines():
        match = pattern.match(line.strip())
        if not match:
            continue
        stamp, job, number, what, rest = match.groups()
        if what == "start":
            attempts.append(Attempt(job, int(number), stamp, detail=rest))
        else:
            status = re.search(r"status=(-?\d+)", rest)
            for attempt in reversed(attempts):
                if attempt.job_id == job and attempt.attempt == int(number) and attempt.ended is None:
                    attempt.ended = stamp
                    attempt.status = int(status.group(1)) if status else None
                    break
    return attempts


def state_from_files(job_id: str, attempts: list[Attempt]) -> JobState:
    """What the run directory says when Slurm no longer knows the job (accounting off and the
    job older than MinJobAge)."""
    mine = [a for a in attempts if a.job_id == job_id]
    if not mine:
        return JobState(job_id, "UNKNOWN", "files", reason="Slurm does not know the job and it "
                                                           "recorded no attempt")
    last = mine[-1]
    restarts = max(a.attempt for a in mine)
    if last.ended is None:
        return JobState(job_id, "UNKNOWN", "files", restarts=restarts,
                        reason=f"Slurm does not know the job; attempt {last.attempt} started "
                               f"{last.started} and recorded no end (killed?)")
    state = "COMPLETED" if last.status == 0 else "FAILED"
    return JobState(job_id, state, "files", exit_code=f"{last.status}:0", restarts=restarts)


def _run_quietly(runner: Callable, argv: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return runner(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def query_job(job_id: str, *, attempts: list[Attempt] = (),
              runner: Callable = subprocess.run) -> JobState:
    """The job's state: ``scontrol show job`` (pending, running and recently ended jobs), then
    ``sacct`` (when accounting is on), then the run directory's attempt records."""
    done = _run_quietly(runner, ["scontrol", "show", "job", "-o", job_id])
    if done is not None and done.returncode == 0:
        state = state_from_scontrol(job_id, done.stdout)
        if state is not None:
            return state
    done = _run_quietly(runner, ["sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id,
                                 "-o", "JobID,State,ExitCode,Elapsed,NodeList"])
    if done is not None and done.returncode == 0:
        state = state_from_sacct(job_id, done.stdout)
        if state is not None:
            return state
    return state_from_files(job_id, list(attempts))
