"""Where a submitted run directory keeps its Slurm files (paths relative to the run directory).

Besides what ``binaryduo train`` writes, a submitted run directory holds::

    slurm/recipe.yaml        the resolved recipe, frozen at submit time (the job trains this file)
    slurm/job.sbatch         the rendered script that was submitted
    slurm/submission.json    the command, working directory, options and job id
    slurm/submissions.jsonl  one line per submission into this run directory
    slurm/attempts.log       one line per attempt start/end, written by the batch script
    slurm-<jobid>.out/.err   the job's output, appended to by requeued attempts

Rendering, submitting and reading a run's status all name these files, so they live here once.
"""
from __future__ import annotations

from pathlib import Path

SLURM_SUBDIR = "slurm"
FROZEN_RECIPE = f"{SLURM_SUBDIR}/recipe.yaml"
JOB_SCRIPT = f"{SLURM_SUBDIR}/job.sbatch"
SUBMISSION = f"{SLURM_SUBDIR}/submission.json"
SUBMISSION_HISTORY = f"{SLURM_SUBDIR}/submissions.jsonl"
ATTEMPTS_LOG = f"{SLURM_SUBDIR}/attempts.log"
#: Runs submitted from a directory, one JSON line each (``binaryduo slurm status`` without RUN_DIR);
#: relative to the directory submitted from, not to a run directory.
INDEX = Path("runs") / "slurm-jobs.jsonl"
