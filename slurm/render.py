"""The job script: the sbatch template filled in with a job's options and environment.

The template (``binaryduo.sbatch``, package data of ``binaryduo.slurm``) is a working batch script
on its own (``RECIPE=... RUN_DIR=... sbatch slurm/binaryduo.sbatch``). Rendering fills in its two
marked places: the ``#SBATCH`` lines (options given here replace the template's defaults) and the
environment (the frozen recipe, the run directory, the ``binaryduo`` executable).

Everything here is a pure function of its arguments (or of the packaged template), so it is tested
without Slurm.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from binaryduo.slurm.run_files import FROZEN_RECIPE, SEED_DIR

TEMPLATE = "binaryduo.sbatch"
OPTIONS_MARKER = "#BINARYDUO-SBATCH-OPTIONS"
ENV_MARKER = "#BINARYDUO-ENVIRONMENT"

DEFAULT_SIGNAL_LEAD = 300
#: Unsafe in an ``#SBATCH --output=`` path (``%`` starts a Slurm file-name pattern).
_BAD_PATH_CHARS = re.compile(r"[\s%\"'\\$`]")


def template_text(name: str = TEMPLATE) -> str:
    """A template of the ``binaryduo.slurm`` package (the source tree's ``slurm/`` in an editable
    install: setup.py maps the package onto that folder)."""
    return files("binaryduo.slurm").joinpath(name).read_text()


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


def seed_ranges(seeds: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``0-3,7`` (Slurm's array index list; ascending)."""
    parts: list[str] = []
    ordered = sorted(set(seeds))
    start = previous = None
    for seed in ordered + [None]:
        if seed is not None and previous is not None and seed == previous + 1:
            previous = seed
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = seed
    return ",".join(parts)


def array_spec(seeds: list[int], throttle: int | None = None) -> str:
    """The ``--array`` value: the task ids are the seeds; ``%K`` runs at most K at once."""
    return seed_ranges(seeds) + (f"%{throttle}" if throttle else "")


def array_problems(seeds: list[int], throttle: int | None,
                   max_array_size: int | None = None) -> list[str]:
    """What is wrong with an array of ``seeds`` (task id = seed) and ``--array-throttle``."""
    problems = []
    if throttle is not None and throttle < 1:
        problems.append(f"--array-throttle {throttle}: must be >= 1")
    if max_array_size is not None and seeds and max(seeds) >= max_array_size:
        problems.append(f"--seeds: seed {max(seeds)} cannot be an array task id on this cluster "
                        f"(MaxArraySize={max_array_size}: task ids 0..{max_array_size - 1}); "
                        f"the task id is the seed, so choose smaller seeds")
    return problems


# -- rendering -------------------------------------------------------------------------------------


def sbatch_directives(options: JobOptions, *, run_dir: Path, workdir: Path,
                      job_name: str, array: str | None = None) -> list[str]:
    """The ``#SBATCH`` options of a job (absolute ``run_dir`` and ``workdir``). ``array``: the
    ``--array`` value of a job array (:func:`array_spec`); each task's output then goes to its
    seed's run directory, ``seed-<task id>/slurm-<array job>_<task id>.out``."""
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
    if array is not None:
        lines.append(f"--array={array}")
    output = f"{run_dir}/{SEED_DIR.format(seed='%a')}/slurm-%A_%a" if array else f"{run_dir}/slurm-%j"
    lines += [f"--signal=B:USR1@{options.signal_lead}",
              "--requeue",
              "--open-mode=append",
              f"--output={output}.out",
              f"--error={output}.err",
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
                    tracking_uri: str | None, sweep_id: str | None = None) -> dict[str, str]:
    """The variables the batch script reads: the job trains the frozen recipe in ``run_dir``
    (an array task: in ``run_dir/seed-<N>``, tagged ``sweep_id``)."""
    env = {"RECIPE": str(run_dir / FROZEN_RECIPE), "RUN_DIR": str(run_dir), "BINARYDUO": binaryduo}
    if sweep_id:
        env["SWEEP_ID"] = sweep_id
    if smoke:
        env["SMOKE"] = "1"
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env
