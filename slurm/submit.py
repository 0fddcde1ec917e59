"""Submitting a job: the run directory's records, the ``sbatch`` call, and the submit index.

:func:`submit_run` writes the frozen recipe, the rendered script and the submission record into the
run directory, calls ``sbatch --parsable``, and on success records the job id (in
``submission.json``, ``submissions.jsonl`` and the submit directory's index). A refused submission
leaves the run directory as it was. The caller hands over plain data: the frozen recipe's text
(:func:`frozen_recipe_text` of the resolved recipe), the rendered script and the record.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import yaml

from binaryduo.slurm.render import JobOptions
from binaryduo.slurm.run_files import FROZEN_RECIPE, JOB_SCRIPT, SUBMISSION, SUBMISSION_HISTORY


class SlurmError(RuntimeError):
    """A Slurm command failed (sbatch refused the job, the controller is down, ...)."""


def frozen_recipe_text(resolved: dict[str, Any], *, source: str, overrides: list[str],
                       array: bool = False) -> str:
    """The resolved recipe as YAML, with a comment saying where it came from (``array``: the
    seedless recipe of a job array)."""
    head = (f"# frozen by `binaryduo slurm submit` at {time.strftime('%Y-%m-%d %H:%M:%S %z')} from "
            f"{source}" + (f" with --set {' --set '.join(overrides)}" if overrides else "") +
            "\n# the job trains this file: edits to the original do not reach a requeued job\n"
            + ("# a job array: task N trains it with --set seed=N into seed-N/\n" if array else ""))
    return head + yaml.safe_dump(resolved, sort_keys=False)


def submission_record(*, argv: list[str], cwd: Path, recipe: str, overrides: list[str],
                      options: JobOptions, run_dir: Path, smoke: bool,
                      tracking_uri: str | None, seeds: list[int] | None = None,
                      array_throttle: int | None = None,
                      sweep_id: str | None = None) -> dict[str, Any]:
    """``submission.json`` before sbatch answered (``job_id`` None until it has; for a job array
    the array's job id, with the ``seeds`` of its tasks)."""
    record = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(argv),
              "cwd": str(cwd), "recipe_file": recipe, "overrides": list(overrides),
              "options": {**asdict(options), "extra": list(options.extra)},
              "run_dir": str(run_dir), "smoke": smoke, "tracking_uri": tracking_uri,
              "script": str(run_dir / JOB_SCRIPT), "frozen_recipe": str(run_dir / FROZEN_RECIPE),
              "job_id": None}
    if seeds:
        record.update(seeds=list(seeds), array_throttle=array_throttle, sweep_id=sweep_id)
    return record


def sweep_record(*, sweep_id: str, seeds: list[int], smoke: bool) -> str:
    """An array's ``sweep.json``: ``binaryduo compare --sweep RUN_DIR`` reads the id there."""
    return json.dumps({"sweep_id": sweep_id, "seeds": sorted(seeds), "smoke": smoke,
                       "made_by": "binaryduo slurm submit --seeds (a job array)"}, indent=2) + "\n"


# -- sbatch ----------------------------------------------------------------------------------------


def parse_job_id(stdout: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job = text.split(";", 1)[0].strip()
    if not job.isdigit():
        raise SlurmError(f"sbatch --parsable printed {stdout.strip()!r}, not a job id")
    return job


def submit(script: Path, *, runner: Callable = subprocess.run) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    try:
        done = runner(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                      timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch not found on PATH (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError("sbatch did not answer within 120 s") from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise SlurmError(f"sbatch refused the job: {detail}")
    return parse_job_id(done.stdout)


def submit_run(run_dir: Path, *, frozen_recipe: str, script: str, record: dict[str, Any],
               index: Path, recipe_name: str, runner: Callable = subprocess.run,
               extra_files: dict[str, str] | None = None,
               directories: list[Path] = ()) -> str:
    """Writes the run directory's records, submits its script and returns the job id.
    ``extra_files`` (relative to ``run_dir``) are written too; ``directories`` are made first (a
    job array's seed folders: Slurm opens each task's output file there, it makes no folder).

    SlurmError when sbatch refuses: a run directory made for this submission (and any parents made
    for it) is removed again, an existing one gets its previous files back (and loses the folders
    made for it), so a refused submission cannot make a continued run look like a different one."""
    files = {run_dir / FROZEN_RECIPE: frozen_recipe, run_dir / JOB_SCRIPT: script,
             run_dir / SUBMISSION: json.dumps(record, indent=2) + "\n",
             **{run_dir / name: text for name, text in (extra_files or {}).items()}}
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    previous = {path: path.read_text() for path in files if path.exists()}
    new_directories = [d for d in directories if not d.exists()]
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in new_directories:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        job_id = submit(run_dir / JOB_SCRIPT, runner=runner)
    except SlurmError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for path in files:
                if path in previous:
                    path.write_text(previous[path])
                else:
                    path.unlink(missing_ok=True)
            for directory in new_directories:
                shutil.rmtree(directory, ignore_errors=True)
        raise
    record = {**record, "job_id": job_id}
    (run_dir / SUBMISSION).write_text(json.dumps(record, indent=2) + "\n")
    with open(run_dir / SUBMISSION_HISTORY, "a") as history:
        history.write(json.dumps(record) + "\n")
    entry = {"job_id": job_id, "run_dir": str(run_dir), "recipe": recipe_name,
             "submitted": record["submitted"]}
    if record.get("seeds"):
        entry["seeds"] = record["seeds"]
    append_index(index, entry)
    return job_id


def max_array_size(runner: Callable = subprocess.run) -> int | None:
    """The cluster's ``MaxArraySize`` (array task ids stop one below it); None: not known."""
    try:
        done = runner(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", done.stdout or "", re.M)
    return int(match[1]) if done.returncode == 0 and match else None


# -- the submit directory's index ------------------------------------------------------------------


def append_index(index: Path, entry: dict[str, Any]) -> None:
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_index(index: Path) -> list[dict[str, Any]]:
    """The index's entries, the latest submission per run directory, oldest first."""
    if not index.exists():
        return []
    latest: dict[str, dict] = {}
    for line in index.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "run_dir" in entry:
            latest.pop(entry["run_dir"], None)
            latest[entry["run_dir"]] = entry
    return list(latest.values())
