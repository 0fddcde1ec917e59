"""Slurm: render the sbatch template, submit it, and report how a submitted run is doing.

The template (``slurm/binaryduo.sbatch``, installed as ``binaryduo.slurm``) is a working batch script
on its own (``RECIPE=... RUN_DIR=... sbatch slurm/binaryduo.sbatch``). Rendering fills in its two
marked places: the ``#SBATCH`` lines (options given here replace the template's defaults) and the
environment (the frozen recipe, the run directory, the ``binaryduo`` executable).

A submitted run directory holds, besides what ``binaryduo train`` writes::

    slurm/recipe.yaml        the resolved recipe, frozen at submit time (the job trains this file)
    slurm/job.sbatch         the rendered script that was submitted
    slurm/submission.json    the command, working directory, options and job id
    slurm/attempts.log       one line per attempt start/end, written by the batch script
    slurm-<jobid>.out/.err   the job's output, appended to by requeued attempts

Everything here except :func:`submit` and :func:`query_job` is a pure function of its arguments or
of files, so it is tested without Slurm.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

TEMPLATE = "binaryduo.sbatch"
OPTIONS_MARKER = "#BINARYDUO-SBATCH-OPTIONS"
ENV_MARKER = "#BINARYDUO-ENVIRONMENT"

SLURM_SUBDIR = "slurm"
FROZEN_RECIPE = f"{SLURM_SUBDIR}/recipe.yaml"
JOB_SCRIPT = f"{SLURM_SUBDIR}/job.sbatch"
SUBMISSION = f"{SLURM_SUBDIR}/submission.json"
ATTEMPTS_LOG = f"{SLURM_SUBDIR}/attempts.log"
#: Runs submitted from a directory, one JSON line each (``binaryduo slurm status`` without RUN_DIR).
INDEX = Path("runs") / "slurm-jobs.jsonl"

DEFAULT_SIGNAL_LEAD = 300
#: The trainer's exit status after a preemption checkpoint (``trainer.preemption.EXIT_PREEMPTED``).
EXIT_PREEMPTED = 75

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}
#: Unsafe in an ``#SBATCH --output=`` path (``%`` starts a Slurm file-name pattern).
_BAD_PATH_CHARS = re.compile(r"[\s%\"'\\$`]")


class SlurmError(RuntimeError):
    """A Slurm command failed (sbatch refused the job, the controller is down, ...)."""


# -- the template ----------------------------------------------------------------------------------


def template_text(name: str = TEMPLATE) -> str:
    """The template from the installed ``binaryduo.slurm`` package (or the source tree's ``slurm/``)."""
    try:
        from importlib.resources import files

        return files("binaryduo.slurm").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        # an editable install made before slurm/ became a package: the source tree has it
        return (Path(__file__).resolve().parent.parent / "slurm" / name).read_text()


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions:
    """What ``binaryduo slurm submit`` asks of the allocation."""

    nodes: int = 1
    #: GPUs per node; one task per GPU. 0: a CPU job with ``tasks_per_node`` tasks.
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    #: Seconds before the time limit at which the batch shell gets SIGUSR1 (checkpoint + requeue).
    signal_lead: int = DEFAULT_SIGNAL_LEAD
    job_name: str | None = None
    #: Further sbatch options, verbatim (``--constraint=a100``, ``--qos=high``, ...).
    extra: tuple[str, ...] = ()

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def time_limit_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``);
    None for ``UNLIMITED``/``INFINITE``; ValueError for anything else."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.match(text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: not a Slurm time limit (MINUTES, MM:SS, HH:MM:SS, "
                         f"D-HH, D-HH:MM or D-HH:MM:SS)")
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "d" in g:
        return ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    if "c" in g:  # HH:MM:SS
        return (g["a"] * 60 + g["b"]) * 60 + g["c"]
    if "b" in g:  # MM:SS
        return g["a"] * 60 + g["b"]
    return g["a"] * 60  # MM


def option_problems(options: JobOptions) -> list[str]:
    """Everything wrong with ``options``, one line each (empty: fine)."""
    problems = []
    if options.nodes < 1:
        problems.append(f"--nodes {options.nodes}: must be >= 1")
    if options.gpus_per_node < 0:
        problems.append(f"--gpus-per-node {options.gpus_per_node}: must be >= 0")
    if options.tasks_per_node is not None:
        if options.tasks_per_node < 1:
            problems.append(f"--tasks-per-node {options.tasks_per_node}: must be >= 1")
        elif options.gpus_per_node and options.tasks_per_node != options.gpus_per_node:
            problems.append(f"--tasks-per-node {options.tasks_per_node} with --gpus-per-node "
                            f"{options.gpus_per_node}: GPU jobs run one task per GPU (leave "
                            f"--tasks-per-node out)")
    if options.cpus_per_task is not None and options.cpus_per_task < 1:
        problems.append(f"--cpus-per-task {options.cpus_per_task}: must be >= 1")
    if not 1 <= options.signal_lead <= 65535:
        problems.append(f"--signal-lead {options.signal_lead}: must be 1..65535 seconds")
    if options.time is not None:
        try:
            limit = time_limit_seconds(options.time)
        except ValueError as error:
            problems.append(str(error))
        else:
            if limit is not None and limit <= options.signal_lead:
                problems.append(f"--time {options.time} is not longer than --signal-lead "
                                f"{options.signal_lead} s: the job would be told to stop as it "
                                f"starts")
    for name, value in (("--partition", options.partition), ("--account", options.account),
                        ("--job-name", options.job_name)):
        if value is not None and (not value or re.search(r"[\s\"'\\]", value)):
            problems.append(f"{name} {value!r}: must be a non-empty word")
    for item in options.extra:
        if not item.startswith("-") or "\n" in item:
            problems.append(f"--sbatch-option {item!r}: give one sbatch option, e.g. "
                            f"--sbatch-option=--constraint=a100")
    return problems


def path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a run directory in an ``#SBATCH`` line (None: it can)."""
    if _BAD_PATH_CHARS.search(str(path)):
        return (f"run directory {str(path)!r}: whitespace, quotes, '$', '\\' and '%' cannot appear "
                f"in #SBATCH --output paths; choose another --output")
    return None


# -- rendering -------------------------------------------------------------------------------------


def sbatch_directives(options: JobOptions, *, run_dir: Path, workdir: Path,
                      job_name: str) -> list[str]:
    """The ``#SBATCH`` options of a job (absolute ``run_dir`` and ``workdir``)."""
    lines = [f"--job-name={options.job_name or job_name}",
             f"--nodes={options.nodes}",
             f"--ntasks-per-node={options.ntasks_per_node}"]
    if options.gpus_per_node:
        lines.append(f"--gpus-per-node={options.gpus_per_node}")
    if options.cpus_per_task:
        lines.append(f"--cpus-per-task={options.cpus_per_task}")
    if options.partition:
        lines.append(f"--partition={options.partition}")
    if options.account:
        lines.append(f"--account={options.account}")
    if options.time:
        lines.append(f"--time={options.time}")
    lines += [f"--signal=B:USR1@{options.signal_lead}",
              "--requeue",
              "--open-mode=append",
              f"--output={run_dir}/slurm-%j.out",
              f"--error={run_dir}/slurm-%j.err",
              f"--chdir={workdir}"]
    lines += list(options.extra)
    return lines


def _option_name(directive: str) -> str:
    return directive.split("=", 1)[0].split()[0]


def render_script(template: str, directives: list[str], environment: dict[str, str]) -> str:
    """The template with ``directives`` as its ``#SBATCH`` lines (a template default for the same
    option is dropped) and ``environment`` assigned (and exported) at the environment marker."""
    if OPTIONS_MARKER not in template or ENV_MARKER not in template:
        raise ValueError(f"the sbatch template lacks {OPTIONS_MARKER} or {ENV_MARKER}")
    given = {_option_name(d) for d in directives}
    out = []
    for line in template.splitlines():
        if line.startswith("#SBATCH ") and _option_name(line[len("#SBATCH "):]) in given:
            continue
        if line.startswith(OPTIONS_MARKER):
            out.append("# rendered by `binaryduo slurm submit`:")
            out.extend(f"#SBATCH {d}" for d in directives)
        elif line.startswith(ENV_MARKER):
            out.append("# rendered by `binaryduo slurm submit`:")
            out.extend(f"export {k}={shlex.quote(v)}" for k, v in environment.items())
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def job_environment(*, run_dir: Path, binaryduo: str, smoke: bool,
                    tracking_uri: str | None) -> dict[str, str]:
    env = {"RECIPE": str(run_dir / FROZEN_RECIPE), "RUN_DIR": str(run_dir), "BINARYDUO": binaryduo}
    if smoke:
        env["SMOKE"] = "1"
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def frozen_recipe_text(resolved: dict[str, Any], *, source: str, overrides: list[str]) -> str:
    """The resolved recipe as YAML, with a comment saying where it came from."""
    head = (f"# frozen by `binaryduo slurm submit` at {time.strftime('%Y-%m-%d %H:%M:%S %z')} from "
            f"{source}" + (f" with --set {' --set '.join(overrides)}" if overrides else "") +
            "\n# the job trains this file: edits to the original do not reach a requeued job\n")
    return head + yaml.safe_dump(resolved, sort_keys=False)


# -- submission ------------------------------------------------------------------------------------


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


# -- job state -------------------------------------------------------------------------------------


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


def state_from_scontrol(job_id: str, text: str) -> JobState | None:
    fields = parse_scontrol_job(text)
    if fields.get("JobId") != job_id or "JobState" not in fields:
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
    a requeued job has one per attempt with ``--duplicates``)."""
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if len(r) >= 5 and r[0].split("_")[0] == job_id]
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


# -- a run directory's progress --------------------------------------------------------------------


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


def run_progress(run_dir: Path) -> RunProgress:
    """Stages, epochs and top-1 from ``run_state.json`` and each stage's ``manifest.json``."""
    run_dir = Path(run_dir)
    recipe = None
    for name in (FROZEN_RECIPE, "recipe.resolved.yaml"):
        try:
            recipe = yaml.safe_load((run_dir / name).read_text())
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


# -- errors ----------------------------------------------------------------------------------------


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
    path = stderr_file(progress.run_dir, job, job.job_id if job else progress.job_id)
    if path is not None:
        try:
            messages, tail = error_report(path.read_text(errors="replace"))
        except OSError:
            messages, tail = [], []
        if failed:
            out.append(f"  error ({path}):")
            out.extend(f"    {m}" for m in messages)
            out.append(f"  last lines of {path.name}:")
            out.extend(f"    | {t}" for t in tail)
        elif messages:
            out.append(f"  trainer messages ({path.name}):")
            out.extend(f"    {m}" for m in messages[-5:])
    return "\n".join(out), failed


def submission_record(*, argv: list[str], cwd: Path, recipe: str, overrides: list[str],
                      options: JobOptions, run_dir: Path, smoke: bool,
                      tracking_uri: str | None) -> dict[str, Any]:
    return {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(argv),
            "cwd": str(cwd), "recipe_file": recipe, "overrides": list(overrides),
            "options": {**asdict(options), "extra": list(options.extra)},
            "run_dir": str(run_dir), "smoke": smoke, "tracking_uri": tracking_uri,
            "script": str(run_dir / JOB_SCRIPT), "frozen_recipe": str(run_dir / FROZEN_RECIPE),
            "job_id": None}
