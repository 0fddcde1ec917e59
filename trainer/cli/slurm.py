"""``binaryduo slurm ...``: submit a recipe as a Slurm job and follow it.

    binaryduo slurm submit RECIPE --nodes N --gpus-per-node G [--tasks-per-node T] [--partition P]
                           [--time T] [--account A] [--signal-lead S] [--set K=V ...]
                           [--seeds 0-4 [--array-throttle K]]
                           [--output RUN_DIR] [--smoke] [--dry-run]
    binaryduo slurm status [RUN_DIR]

``--seeds`` submits one Slurm job array, one task per seed, the task id being the seed (see
``binaryduo.slurm.array``); the seeds that already finished in RUN_DIR are left out.

``register(subparsers)`` adds the ``slurm`` command to the CLI's subparsers. A bad recipe or bad
options give one ``binaryduo: error: ...`` line per problem and exit status 2 before anything is
written or submitted; ``status`` exits 1 when the job failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from binaryduo.slurm.array import (array_summary, array_tasks, format_array_status, is_array,
                                   overall_state)
from binaryduo.slurm.progress import format_status, run_progress
from binaryduo.slurm.render import (DEFAULT_SIGNAL_LEAD, JobOptions, array_problems, array_spec,
                                    job_environment, option_problems, path_problem,
                                    render_script, sbatch_directives, seed_ranges, template_text)
from binaryduo.slurm.run_files import ATTEMPTS_LOG, FROZEN_RECIPE, INDEX, SUBMISSION, seed_dir
from binaryduo.slurm.status import EXIT_PREEMPTED, query_job
from binaryduo.slurm.submit import (SlurmError, frozen_recipe_text, max_array_size, read_index,
                                    submission_record, submit_run, sweep_record)
from binaryduo.trainer.cli.errors import EXIT_CHECK_FAILED as EXIT_FAILED
from binaryduo.trainer.cli.errors import UsageError, print_problems
from binaryduo.trainer.cli.sweep import SWEEP_FILE, read_sweep_record
from binaryduo.trainer.run.state import RUN_STATE


def _binaryduo_executable() -> str:
    """The ``binaryduo`` of this installation (the job may not have the venv on its PATH)."""
    beside = Path(sys.executable).with_name("binaryduo")
    if beside.exists():
        return str(beside)
    return shutil.which("binaryduo") or "binaryduo"


def _recorded_hash_problem(run_dir: Path, recipe, *, smoke: bool) -> str | None:
    """Why ``run_dir``'s ``run_state.json`` is of another recipe than ``recipe`` (None: same)."""
    from binaryduo.trainer.run.train import smoke_recipe
    from binaryduo.trainer.tracking.provenance import recipe_hash

    state = run_dir / RUN_STATE
    if not state.exists():
        return None
    digest = recipe_hash((smoke_recipe(recipe) if smoke else recipe).identity())
    try:
        recorded = json.loads(state.read_text()).get("recipe_hash")
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded not in (None, digest):
        return (f"--output {run_dir} holds a run of a different recipe (hash {recorded}, "
                f"this one {digest}{', with --smoke' if smoke else ''}); choose a new --output")
    return None


def _existing_run_problem(run_dir: Path, resolved: dict, *, smoke: bool,
                          seeds: list[int] | None = None,
                          sweep_id: str | None = None) -> str | None:
    """Why ``run_dir`` cannot take this submission (None: new, or the same run continued).
    ``seeds`` and ``sweep_id``: a job array's (``resolved`` is then the recipe less its seed)."""
    import yaml

    if run_dir.exists() and not run_dir.is_dir():
        return f"--output {run_dir}: exists and is not a directory"
    if not run_dir.is_dir():
        return None
    if seeds and not is_array(run_dir) and ((run_dir / FROZEN_RECIPE).exists()
                                            or (run_dir / RUN_STATE).exists()):
        return (f"--output {run_dir} holds a single job's run, not a job array of seeds; "
                f"choose a new --output for --seeds")
    if not seeds and is_array(run_dir):
        return (f"--output {run_dir} holds a job array of seeds; continue it with --seeds, or "
                f"choose a new --output")
    if seeds:
        for task in array_tasks(run_dir):
            if task.job is not None and task.job.active:
                return (f"--output {run_dir}: task {task.job_id} (seed {task.seed}) of this "
                        f"array is still {task.state}; wait for it or `scancel "
                        f"{task.job_id.split('_')[0]}` first")
    else:
        progress = run_progress(run_dir)
        if progress.job_id:
            job = query_job(progress.job_id, attempts=progress.attempts)
            if job.active:
                return (f"--output {run_dir}: job {job.job_id} of this run is still "
                        f"{job.state}; wait for it or `scancel {job.job_id}` first")
    frozen = run_dir / FROZEN_RECIPE
    if frozen.exists():
        try:
            before = yaml.safe_load(frozen.read_text())
        except yaml.YAMLError:
            before = None
        if before != resolved:
            return (f"--output {run_dir} holds a run of a different recipe ({frozen}); continue "
                    f"it with the same recipe and --set values, or choose a new --output")
    from binaryduo.trainer.recipe import Recipe

    before = _previous_sweep(run_dir).get("sweep_id")
    if seeds and before not in (None, sweep_id):  # the same recipe: --smoke differs
        return (f"--output {run_dir} holds the seeds of sweep {before}, this is {sweep_id} "
                f"(with{'' if smoke else 'out'} --smoke); choose a new --output")
    if not seeds:
        return _recorded_hash_problem(run_dir, Recipe.model_validate(resolved), smoke=smoke)
    for seed in seeds:
        problem = _recorded_hash_problem(seed_dir(run_dir, seed),
                                         Recipe.model_validate({**resolved, "seed": seed}),
                                         smoke=smoke)
        if problem:
            return problem
    return None


def _previous_sweep(run_dir: Path) -> dict:
    """An array directory's ``sweep.json`` ({} when there is none)."""
    record = read_sweep_record(run_dir / SWEEP_FILE)
    return record if isinstance(record, dict) else {}


def _array_plan(args: argparse.Namespace) -> tuple[list[int], str] | None:
    """``--seeds``: the seeds and the sweep id (None without --seeds). Bad seeds, ``--set
    seed=...`` beside them, or ``--array-throttle`` without them: UsageError."""
    from binaryduo.trainer.cli.seeds import parse_seeds, refuse_seed_override
    from binaryduo.trainer.cli.sweep import plan_sweep

    if args.seeds is None:
        if args.array_throttle is not None:
            raise UsageError("--array-throttle limits the tasks of a job array: it needs --seeds")
        return None
    seeds = parse_seeds(args.seeds)
    refuse_seed_override(args.set)
    # every seed validated, and the sweep id `binaryduo sweep RECIPE` gives the same recipe
    sweep, _ = plan_sweep([args.recipe], seeds, args.set, output=None, smoke=args.smoke)
    return seeds, sweep.sweep_id


def _prepare_tracking_store(cli_uri: str | None, recipe) -> None:
    """Creates the MLflow store and the experiment now, once: the tasks of an array start
    together, and their first writes would race to create a fresh sqlite store (its schema
    migrations) and the experiment, and all but one fail. A store that cannot be reached from
    here is only a warning (the tasks may still reach it)."""
    from binaryduo.trainer.tracking.delivery import RecordSender
    from binaryduo.trainer.tracking.server import (bound_http_requests, is_remote,
                                                   resolve_tracking_uri, short_reason)

    uri = resolve_tracking_uri(cli_uri, recipe.logging.tracking_uri)
    if is_remote(uri):
        bound_http_requests()
    try:  # the get-or-create the trainer's tracker runs, with its artifact location
        RecordSender(uri, recipe.logging.experiment, None).ensure_experiment()
    except Exception as error:  # noqa: BLE001 - a warning: the job may reach what we cannot
        print(f"binaryduo: warning: could not prepare MLflow experiment "
              f"{recipe.logging.experiment!r} in {uri} ({short_reason(error)}): tasks that "
              f"start together may race to create it", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from binaryduo.trainer.recipe import RecipeError, load_recipe
    from binaryduo.trainer.cli.sweep import run_state

    # 1. The recipe, before anything else: a bad one writes and submits nothing.
    try:
        recipe = load_recipe(args.recipe, args.set)
        array = _array_plan(args)
    except RecipeError as error:
        return print_problems(error.problems)
    options = JobOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
        account=args.account, signal_lead=args.signal_lead, job_name=args.job_name,
        extra=tuple(args.sbatch_option))
    problems = option_problems(options)
    if array is not None:
        problems += array_problems(array[0], args.array_throttle,
                                   None if args.dry_run else max_array_size())
    if problems:
        return print_problems(problems)
    if recipe.data.batch_size % options.world_size:
        return print_problems([f"data.batch_size {recipe.data.batch_size} does not split evenly "
                               f"over {options.world_size} tasks ({options.nodes} node(s) x "
                               f"{options.ntasks_per_node})"])

    # 2. The run directory (a job array's: one seed-<N> run directory per seed) and the script.
    cwd = Path.cwd()
    run_dir = Path(args.output) if args.output else (
        Path("runs") / f"{recipe.name}-{'seeds-' if array else ''}"
                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(os.path.normpath(cwd / run_dir))
    problem = path_problem(run_dir) or path_problem(cwd)
    if problem:
        raise UsageError(problem)
    resolved = recipe.model_dump(mode="json")
    seeds = sweep_id = None
    if array is not None:
        seeds, sweep_id = array
        del resolved["seed"]  # each task sets its own
    problem = _existing_run_problem(run_dir, resolved, smoke=args.smoke, seeds=seeds,
                                    sweep_id=sweep_id)
    if problem:
        raise UsageError(problem)
    if seeds:
        finished = [s for s in seeds if run_state(seed_dir(run_dir, s)) == "finished"]
        seeds = [s for s in seeds if s not in finished]
        if finished:
            print(f"seed{'s' if len(finished) > 1 else ''} {seed_ranges(finished)} finished "
                  f"earlier in {run_dir}: not submitted again", file=sys.stderr)
        if not seeds:
            print(f"nothing to submit: every seed asked for has finished in {run_dir}")
            return 0
    directives = sbatch_directives(
        options, run_dir=run_dir, workdir=cwd, job_name=f"binaryduo-{recipe.name}",
        array=array_spec(seeds, args.array_throttle) if seeds else None)
    environment = job_environment(run_dir=run_dir, binaryduo=_binaryduo_executable(),
                                  smoke=args.smoke, tracking_uri=args.tracking_uri,
                                  sweep_id=sweep_id)
    script = render_script(template_text(), directives, environment)
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found on PATH (is this a Slurm login node?); "
                         "--dry-run prints the script")

    # 3. Record, then submit; a refused submission leaves the run directory as it was.
    frozen = frozen_recipe_text(resolved, source=str(args.recipe), overrides=args.set,
                                array=bool(seeds))
    record = submission_record(argv=sys.argv, cwd=cwd, recipe=str(args.recipe),
                               overrides=args.set, options=options, run_dir=run_dir,
                               smoke=args.smoke, tracking_uri=args.tracking_uri, seeds=seeds,
                               array_throttle=args.array_throttle, sweep_id=sweep_id)
    extra = None
    if seeds:
        every = set(array[0]) | set(_previous_sweep(run_dir).get("seeds") or [])
        extra = {SWEEP_FILE: sweep_record(sweep_id=sweep_id, seeds=sorted(every),
                                            smoke=args.smoke)}
        _prepare_tracking_store(args.tracking_uri, recipe)
    try:
        job_id = submit_run(run_dir, frozen_recipe=frozen, script=script, record=record,
                            index=cwd / INDEX, recipe_name=recipe.name, extra_files=extra,
                            directories=[seed_dir(run_dir, s) for s in seeds or []])
    except SlurmError as error:
        print(f"binaryduo: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if not seeds:
        print(f"submitted job {job_id}")
        print(f"run directory {run_dir}")
        print(f"  follow it: binaryduo slurm status {run_dir}")
        return 0
    print(f"submitted job array {job_id}: {len(seeds)} task{'s' if len(seeds) > 1 else ''}, "
          f"seeds {seed_ranges(seeds)} (task {job_id}_N trains seed N)")
    print(f"run directory {run_dir} (seed N trains in {run_dir}/seed-N)")
    print(f"  follow it: binaryduo slurm status {run_dir}")
    print(f"  compare the seeds: binaryduo compare --by-seed --sweep {sweep_id}"
          + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else "")
          + (" --include-smoke" if args.smoke else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.run_dir is None:
        return _list_runs()
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"slurm status: {run_dir}: no such run directory")
    if is_array(run_dir):
        text, failed = format_array_status(run_dir.resolve(), array_tasks(run_dir.resolve()))
        print(text)
        return EXIT_FAILED if failed else 0
    progress = run_progress(run_dir.resolve())
    if progress.job_id is None:
        raise UsageError(f"slurm status: {run_dir}: no Slurm job recorded (no "
                         f"{SUBMISSION} or {ATTEMPTS_LOG})")
    job = query_job(progress.job_id, attempts=progress.attempts)
    text, failed = format_status(progress, job)
    print(text)
    if failed and job.exit_code and job.exit_code.split(":")[0] == str(EXIT_PREEMPTED):
        print(f"  the trainer stopped with a checkpoint and the job was not requeued: continue "
              f"with `binaryduo slurm submit {progress.run_dir / FROZEN_RECIPE} "
              f"--output {progress.run_dir} ...`")
    return EXIT_FAILED if failed else 0


def _list_runs() -> int:
    index = Path.cwd() / INDEX
    entries = read_index(index)
    if not entries:
        print(f"no runs submitted from {Path.cwd()} (nothing in {INDEX})")
        return 0
    print(f"{'JOB':>8}  {'STATE':<11} {'RUN DIRECTORY':<40} PROGRESS")
    for entry in entries:
        run_dir = Path(entry["run_dir"])
        if not run_dir.is_dir():
            print(f"{entry.get('job_id', '?'):>8}  {'-':<11} {str(run_dir):<40} (removed)")
            continue
        shown = str(run_dir.relative_to(Path.cwd())) if run_dir.is_relative_to(Path.cwd()) \
            else str(run_dir)
        if entry.get("seeds") or is_array(run_dir):  # a job array: one line, its tasks counted
            tasks = array_tasks(run_dir)
            arrays = sorted({t.job_id.split("_")[0] for t in tasks if t.job_id}) or [
                str(entry.get("job_id"))]
            print(f"{','.join(arrays) + '_*':>8}  {overall_state(tasks):<11} {shown:<40} "
                  f"{array_summary(tasks)}")
            continue
        progress = run_progress(run_dir)
        job_id = progress.job_id or str(entry.get("job_id"))
        job = query_job(job_id, attempts=progress.attempts)
        print(f"{job_id:>8}  {job.state:<11} {shown:<40} {progress.summary()}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``slurm submit RECIPE ...`` and ``slurm status [RUN_DIR]`` to ``subparsers``."""
    command = subparsers.add_parser(
        "slurm", help="submit a recipe to Slurm, follow its job",
        description="Renders slurm/binaryduo.sbatch for a recipe and submits it; reports a "
                    "submitted run's job state and progress. See slurm/README.md.")
    actions = command.add_subparsers(dest="slurm_action", required=True, metavar="ACTION")

    submit = actions.add_parser(
        "submit", help="freeze the recipe into a run directory and sbatch it",
        description="Validates RECIPE (with --set), freezes the resolved recipe into "
                    "RUN_DIR/slurm/recipe.yaml, renders the sbatch script (one task per GPU, "
                    "SIGUSR1 --signal-lead seconds before the time limit, requeue, output "
                    "appended in RUN_DIR) and submits it with `sbatch --parsable`.")
    submit.add_argument("recipe", help="recipe YAML file")
    submit.add_argument("--nodes", type=int, required=True, metavar="N")
    submit.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                        help="one training task per GPU; 0 for a CPU job (see --tasks-per-node)")
    submit.add_argument("--tasks-per-node", type=int, metavar="T",
                        help="CPU jobs: training processes per node (default 1)")
    submit.add_argument("--cpus-per-task", type=int, metavar="C",
                        help="CPU cores per task (DALI decoding threads + the training process)")
    submit.add_argument("--partition", metavar="P")
    submit.add_argument("--time", metavar="T", help="time limit, e.g. 2-00:00:00 or 90")
    submit.add_argument("--account", metavar="A")
    submit.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD,
                        metavar="SECONDS",
                        help="SIGUSR1 this long before the time limit: the trainer checkpoints "
                             "and requeues the job (default %(default)s)")
    submit.add_argument("--job-name", metavar="NAME", help="default: binaryduo-<recipe name>")
    submit.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="another sbatch option, verbatim, e.g. "
                             "--sbatch-option=--constraint=a100 (repeatable)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value (repeatable); frozen into the run")
    submit.add_argument("--seeds", metavar="SEEDS",
                        help="one Slurm job array, one task per seed: a range 0-4 (inclusive), "
                             "a list 0,2,7, or both 0-2,10. The task id is the seed: task N "
                             "trains the frozen recipe with --set seed=N in RUN_DIR/seed-N "
                             "(own checkpoints, requeues and MLflow run, tagged sweep_id for "
                             "`compare --by-seed --sweep`); seeds already finished in RUN_DIR "
                             "are left out; not with --set seed=...")
    submit.add_argument("--array-throttle", type=int, metavar="K",
                        help="with --seeds: at most K tasks of the array run at once "
                             "(sbatch --array=...%%K)")
    submit.add_argument("--output", metavar="RUN_DIR",
                        help="run directory (default: runs/<recipe>-<time>); an existing run "
                             "of the same recipe is continued")
    submit.add_argument("--tracking-uri", help="MLflow tracking URI for the job (default: "
                                               "MLFLOW_TRACKING_URI, the recipe's, or sqlite "
                                               "./mlflow.db in this directory)")
    submit.add_argument("--smoke", action="store_true",
                        help="train with --smoke (a few steps per stage)")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the script; write and submit nothing")
    submit.set_defaults(handler=cmd_submit)

    status = actions.add_parser(
        "status", help="job state and training progress of a submitted run",
        description="Job state (scontrol, sacct, or the run directory's records), completed "
                    "stages, latest epoch and top-1, attempts; for a failed job its error. "
                    "For a job array of seeds: one line per seed. Exit status 1 when the job "
                    "(any task of an array) failed. Without RUN_DIR: the runs submitted "
                    "from this directory, an array as one line.")
    status.add_argument("run_dir", nargs="?", metavar="RUN_DIR")
    status.set_defaults(handler=cmd_status)
    return command
