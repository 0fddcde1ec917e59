"""A run directory's training progress and the ``binaryduo slurm status`` report.

Progress comes from the files the trainer writes (``run_state.json``, each stage's
``checkpoints/<stage>/manifest.json``) and the frozen recipe; the report adds the job's state
(:mod:`binaryduo.slurm.status`) and, for a failed job, the trainer's error lines from the job's
``slurm-<jobid>.err``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from binaryduo.slurm.run_files import ATTEMPTS_LOG, FROZEN_RECIPE, SUBMISSION
from binaryduo.slurm.status import Attempt, JobState, parse_attempts


@dataclass
class StageProgress:
    name: str
    variant: str
    epochs: int
    done_epochs: int = 0
    last_top1: float | None = None
    best_top1: float | None = None
    completed: bool = False
    mid_epoch: dict | None = None


@dataclass
class RunProgress:
    run_dir: Path
    recipe_name: str | None
    stages: list[StageProgress] = field(default_factory=list)
    parent_run_id: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    submission: dict[str, Any] | None = None

    @property
    def job_id(self) -> str | None:
        if self.submission and self.submission.get("job_id"):
            return str(self.submission["job_id"])
        return self.attempts[-1].job_id if self.attempts else None

    def summary(self) -> str:
        """One line: ``coupled 2/2 (top-1 55.20), finetune 0/1``."""
        parts = []
        for s in self.stages:
            text = f"{s.name} {s.done_epochs}/{s.epochs}"
            if s.last_top1 is not None:
                text += f" (top-1 {s.last_top1:.2f})"
            parts.append(text)
        return ", ".join(parts) or "no stages recorded"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value == value else None


def run_progress(run_dir: Path, *, recipe_file: Path | None = None) -> RunProgress:
    """Stages, epochs and top-1 from ``run_state.json`` and each stage's ``manifest.json``.
    ``recipe_file``: where the stages are read when the run directory has no recipe yet (an
    array task's run directory before it starts: the array's frozen recipe)."""
    run_dir = Path(run_dir)
    recipe = None
    for path in (run_dir / FROZEN_RECIPE, run_dir / "recipe.resolved.yaml", recipe_file):
        if path is None:
            continue
        try:
            recipe = yaml.safe_load(path.read_text())
            break
        except (OSError, yaml.YAMLError):
            continue
    state = _read_json(run_dir / "run_state.json") or {}
    completed = set(state.get("completed") or [])
    attempts_path = run_dir / ATTEMPTS_LOG
    progress = RunProgress(run_dir, recipe.get("name") if isinstance(recipe, dict) else None,
                           parent_run_id=state.get("parent_run_id"),
                           attempts=parse_attempts(attempts_path.read_text())
                           if attempts_path.exists() else [],
                           submission=_read_json(run_dir / SUBMISSION))
    stages = recipe.get("stages", []) if isinstance(recipe, dict) else []
    for stage in stages:
        if not isinstance(stage, dict) or "name" not in stage:
            continue
        item = StageProgress(stage["name"], str(stage.get("variant", "?")),
                             int(stage.get("epochs", 0)), completed=stage["name"] in completed)
        manifest = _read_json(run_dir / "checkpoints" / stage["name"] / "manifest.json") or {}
        epochs = [e for e in manifest.get("epochs") or [] if isinstance(e, dict)]
        if epochs:
            item.done_epochs = max(int(e.get("epoch", 0)) for e in epochs)
            item.last_top1 = _number(max(epochs, key=lambda e: e.get("epoch", 0)).get("top1"))
        if isinstance(manifest.get("best"), dict):
            item.best_top1 = _number(manifest["best"].get("top1"))
        mid = manifest.get("mid_epoch")
        if isinstance(mid, dict) and manifest.get("latest") == mid.get("tag"):
            item.mid_epoch = mid
        progress.stages.append(item)
    return progress


# -- the report ------------------------------------------------------------------------------------


def error_report(stderr_text: str, *, tail: int = 15) -> tuple[list[str], list[str]]:
    """The trainer's ``binaryduo: ...`` lines (each once, in order) and the last ``tail`` lines."""
    lines = stderr_text.splitlines()
    seen: dict[str, None] = {}
    for line in lines:
        if line.startswith("binaryduo: "):
            seen.setdefault(line, None)
    return list(seen), lines[-tail:]


def stderr_file(run_dir: Path, job: JobState | None, job_id: str | None) -> Path | None:
    candidates = []
    if job is not None and job.stderr_path:
        candidates.append(Path(job.stderr_path))
    if job_id:
        candidates.append(Path(run_dir) / f"slurm-{job_id}.err")
    candidates += sorted(Path(run_dir).glob("slurm-*.err"), key=lambda p: p.stat().st_mtime,
                         reverse=True)
    return next((p for p in candidates if p.is_file()), None)


def format_status(progress: RunProgress, job: JobState | None) -> tuple[str, bool]:
    """The status report of one run directory and whether the job failed."""
    out = [f"run {progress.run_dir}" + (f" (recipe {progress.recipe_name})"
                                        if progress.recipe_name else "")]
    submission = progress.submission or {}
    if submission.get("submitted"):
        out.append(f"  submitted {submission['submitted']} from {submission.get('cwd', '?')}")
    failed = False
    if job is None:
        out.append("  job: none recorded")
    else:
        line = f"  job {job.job_id}: {job.state}"
        if job.reason and job.reason != "None":
            line += f" ({job.reason})"
        if job.exit_code and not job.active:
            line += f", exit code {job.exit_code}"
        if job.run_time:
            line += f", run time {job.run_time}"
        if job.nodes:
            line += f", nodes {job.nodes}"
        line += f"  [from {job.source}]"
        out.append(line)
        failed = job.failed
    mine = [a for a in progress.attempts if job is None or a.job_id == job.job_id]
    if mine:
        requeues = max(a.attempt for a in mine)
        last = mine[-1]
        ended = (f"ended {last.ended} with status {last.status}" if last.ended
                 else "no end recorded yet")
        out.append(f"  attempts: {len(mine)} started (requeued {requeues} time"
                   f"{'' if requeues == 1 else 's'}); the last one started {last.started}, "
                   f"{ended}")
    for stage in progress.stages:
        if stage.completed:
            status = "done"
        elif stage.mid_epoch:
            status = (f"stopped in epoch {int(stage.mid_epoch.get('epoch', 0)) + 1} at step "
                      f"{stage.mid_epoch.get('step')} (mid-epoch checkpoint)")
        elif stage.done_epochs:
            status = "in progress"
        else:
            status = "not started"
        numbers = ""
        if stage.last_top1 is not None:
            numbers = f"  last top-1 {stage.last_top1:6.2f}"
        if stage.best_top1 is not None:
            numbers += f"  best {stage.best_top1:6.2f}"
        out.append(f"  stage {stage.name:<12} {stage.variant:<10} epoch {stage.done_epochs}/"
                   f"{stage.epochs}{numbers}  {status}")
    if progress.parent_run_id:
        out.append(f"  MLflow parent run {progress.parent_run_id}")
    out.extend(job_messages(progress, job, failed=failed))
    return "\n".join(out), failed


def job_messages(progress: RunProgress, job: JobState | None, *, failed: bool,
                 indent: str = "  ") -> list[str]:
    """From the job's error file: a failed job's ``binaryduo: ...`` lines and last lines, or the
    trainer's latest messages of one that did not fail."""
    path = stderr_file(progress.run_dir, job, job.job_id if job else progress.job_id)
    if path is None:
        return []
    try:
        messages, tail = error_report(path.read_text(errors="replace"))
    except OSError:
        messages, tail = [], []
    out = []
    if failed:
        out.append(f"{indent}error ({path}):")
        out.extend(f"{indent}  {m}" for m in messages)
        out.append(f"{indent}last lines of {path.name}:")
        out.extend(f"{indent}  | {t}" for t in tail)
    elif messages:
        out.append(f"{indent}trainer messages ({path.name}):")
        out.extend(f"{indent}  {m}" for m in messages[-5:])
    return out
