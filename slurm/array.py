"""Job arrays of seeds: what is in an array's directory, and its ``binaryduo slurm status``.

``binaryduo slurm submit RECIPE --seeds 3,4`` submits one job array whose task ids ARE the seeds
(``--array=3-4``); every task trains the array's frozen recipe with ``--set seed=<task id>`` into
``RUN_DIR/seed-<task id>`` (a run directory like any other: its own checkpoints, attempts.log,
output files and requeues) and tags its MLflow runs ``sweep_id``. Slurm calls task N of array job
A ``A_N``: that is the id in the seed's ``attempts.log``, and what ``scontrol``/``sacct`` answer to.

An array's directory is resubmitted like a run directory (the seeds that finished are left out),
so the seeds of one directory may belong to several array jobs: each seed's job is the one of the
latest submission that included it (``slurm/submissions.jsonl``), or, for an array submitted by
hand, the one its ``attempts.log`` names.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from binaryduo.slurm.progress import RunProgress, StageProgress, job_messages, run_progress
from binaryduo.slurm.render import seed_ranges
from binaryduo.slurm.run_files import (ATTEMPTS_LOG, FROZEN_RECIPE, SUBMISSION,
                                       SUBMISSION_HISTORY, seed_dir)
from binaryduo.slurm.status import EXIT_PREEMPTED, JobState, query_job

_SEED_DIR = re.compile(r"seed-(\d+)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_array(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a job array's directory (submitted with --seeds, or by hand with
    ``sbatch --array``: seed folders with attempts, none of its own)."""
    submission = _read_json(Path(run_dir) / SUBMISSION)
    if isinstance(submission, dict):
        return bool(submission.get("seeds"))
    return (not (Path(run_dir) / ATTEMPTS_LOG).exists()
            and any(Path(run_dir).glob(f"seed-*/{ATTEMPTS_LOG}")))


def array_jobs(run_dir: Path) -> dict[int, str | None]:
    """Every seed of the array directory -> its task's job id ``A_N`` (None: not known)."""
    run_dir = Path(run_dir)
    jobs: dict[int, str | None] = {}
    records = []
    try:
        for line in (run_dir / SUBMISSION_HISTORY).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    except OSError:
        pass
    records.append(_read_json(run_dir / SUBMISSION))
    for record in records:  # oldest first: the latest submission of a seed wins
        if isinstance(record, dict) and record.get("job_id"):
            for seed in record.get("seeds") or []:
                jobs[int(seed)] = f"{record['job_id']}_{int(seed)}"
    for path in run_dir.glob("seed-*"):  # by hand: the seed folders' own records
        match = _SEED_DIR.fullmatch(path.name)
        if match and path.is_dir() and int(match[1]) not in jobs:
            progress = run_progress(path)
            jobs[int(match[1])] = progress.job_id
    return dict(sorted(jobs.items()))


@dataclass
class ArrayTask:
    seed: int
    job_id: str | None
    progress: RunProgress
    job: JobState | None

    @property
    def state(self) -> str:
        return self.job.state if self.job is not None else "UNKNOWN"

    @property
    def failed(self) -> bool:
        return self.job is None or self.job.failed

    @property
    def attempts(self) -> int:
        return sum(1 for a in self.progress.attempts if a.job_id == self.job_id)


def array_tasks(run_dir: Path, *, query: Callable = query_job) -> list[ArrayTask]:
    """Each seed's run progress and job state (``query``: :func:`query_job`)."""
    run_dir = Path(run_dir)
    tasks = []
    for seed, job_id in array_jobs(run_dir).items():
        progress = run_progress(seed_dir(run_dir, seed), recipe_file=run_dir / FROZEN_RECIPE)
        job = query(job_id, attempts=progress.attempts) if job_id else None
        tasks.append(ArrayTask(seed, job_id, progress, job))
    return tasks


def current_stage(progress: RunProgress) -> StageProgress | None:
    """The first stage not completed (the last one when all are)."""
    return next((s for s in progress.stages if not s.completed),
                progress.stages[-1] if progress.stages else None)


def state_counts(tasks: list[ArrayTask]) -> str:
    """``1 COMPLETED, 1 RUNNING``."""
    counts = Counter(task.state for task in tasks)
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def overall_state(tasks: list[ArrayTask]) -> str:
    """One state for the index: RUNNING/another active state while any task is, else FAILED
    when any task failed, else COMPLETED."""
    active = [t.state for t in tasks if t.job is not None and t.job.active]
    if active:
        return "RUNNING" if "RUNNING" in active else active[0]
    if not tasks or any(t.failed for t in tasks):
        return "FAILED" if tasks else "UNKNOWN"
    return "COMPLETED"


def array_summary(tasks: list[ArrayTask]) -> str:
    """The index's progress column: ``seeds 3-4: 1 COMPLETED, 1 RUNNING``."""
    return f"seeds {seed_ranges([t.seed for t in tasks])}: {state_counts(tasks)}"


def _task_row(task: ArrayTask) -> str:
    stage = current_stage(task.progress)
    name = stage.name if stage else "-"
    epoch = f"{stage.done_epochs}/{stage.epochs}" if stage else "-"
    top1 = f"{stage.last_top1:.2f}" if stage and stage.last_top1 is not None else "-"
    if task.progress.stages and all(s.completed for s in task.progress.stages):
        note = "done"
    elif stage and stage.mid_epoch:
        note = f"stopped at step {stage.mid_epoch.get('step')} (mid-epoch checkpoint)"
    else:
        note = ""
    if task.job is not None and task.job.active and task.job.reason:
        note = f"({task.job.reason}) {note}".strip()
    return (f"  {task.seed:>6}  {task.job_id or '-':<14} {task.state:<11} {task.attempts:>8}  "
            f"{name:<12} {epoch:>6}  {top1:>6}  {note}").rstrip()


def format_array_status(run_dir: Path, tasks: list[ArrayTask]) -> tuple[str, bool]:
    """The status report of an array's directory: one line per seed, then what went wrong with
    the failed ones; and whether any task failed."""
    run_dir = Path(run_dir)
    submission = _read_json(run_dir / SUBMISSION) or {}
    name = next((t.progress.recipe_name for t in tasks if t.progress.recipe_name), None)
    head = f"array {run_dir}" + (f" (recipe {name})" if name else "")
    head += f": seeds {seed_ranges([t.seed for t in tasks])}" if tasks else ": no seeds recorded"
    if submission.get("sweep_id"):
        head += f", sweep_id {submission['sweep_id']}"
    out = [head]
    if submission.get("submitted"):
        out.append(f"  submitted {submission['submitted']} from {submission.get('cwd', '?')}")
    arrays = sorted({t.job_id.split("_")[0] for t in tasks if t.job_id})
    out.append(f"  job array{'s' if len(arrays) > 1 else ''} {', '.join(arrays) or '?'}: "
               f"{len(tasks)} task{'s' if len(tasks) != 1 else ''}, {state_counts(tasks)}")
    out.append(f"  {'SEED':>6}  {'JOB':<14} {'STATE':<11} {'ATTEMPTS':>8}  {'STAGE':<12} "
               f"{'EPOCH':>6}  {'TOP-1':>6}")
    out.extend(_task_row(task) for task in tasks)
    failed = [task for task in tasks if task.failed]
    for task in failed:
        line = f"  seed {task.seed} (job {task.job_id or '?'}): {task.state}"
        if task.job is not None and task.job.exit_code:
            line += f", exit code {task.job.exit_code}"
        out.append(line)
        out.extend(job_messages(task.progress, task.job, failed=True, indent="    "))
        if task.job is not None and (task.job.exit_code or "").split(":")[0] == str(EXIT_PREEMPTED):
            out.append(f"    the trainer stopped with a checkpoint and the task was not requeued: "
                       f"continue with `binaryduo slurm submit {run_dir / FROZEN_RECIPE} "
                       f"--seeds {task.seed} --output {run_dir} ...`")
    if submission.get("sweep_id"):
        uri = submission.get("tracking_uri")
        out.append(f"  compare the seeds: binaryduo compare --by-seed --sweep "
                   f"{submission['sweep_id']}" + (f" --tracking-uri {uri}" if uri else "")
                   + (" --include-smoke" if submission.get("smoke") else ""))
    return "\n".join(out), bool(failed)
