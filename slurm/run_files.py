"""Where a submitted run directory keeps its Slurm files (paths relative to the run directory).

Besides what ``binaryduo train`` writes, a submitted run directory holds::

    slurm/recipe.yaml        the resolved recipe, frozen at submit time (the job trains this file)
    slurm/job.sbatch         the rendered script that was submitted
    slurm/submission.json    the command, working directory, options and job id
    slurm/submissions.jsonl  one line per submission into this run directory
    slurm/attempts.log       one line per attempt start/end, written by the batch script
    slurm-<jobid>.out/.err   the job's output, appended to by requeued attempts

A job array (``binaryduo slurm submit --seeds``, one array task per seed, the task id is the seed)
keeps the first four in the array's directory and gives each seed a run directory of its own,
``seed-<N>/``, holding that seed's ``slurm/attempts.log``, ``slurm-<arrayjob>_<N>.out/.err`` and
everything ``binaryduo train`` writes.

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
#: A seed's run directory in an array's directory (the batch script spells it too: seed-$TASK_ID).
SEED_DIR = "seed-{seed}"


def seed_dir(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / SEED_DIR.format(seed=seed)


#: Runs submitted from a directory, one JSON line each (``binaryduo slurm status`` without RUN_DIR);
#: relative to the directory submitted from, not to a run directory.
INDEX = Path("runs") / "slurm-jobs.jsonl"
