"""``binaryduo sweep``: one recipe run per (recipe, seed), one after another, on this machine.

    binaryduo sweep RECIPE [RECIPE ...] --seeds 0-4 [--set K=V ...] [--output DIR]
                    [--tracking-uri URI] [--smoke]

Why a sweep and not a shell loop: BinaryDuo's claim is a 1-2 point difference between two
methods, about the size of seed noise, so a result is several seeds of each recipe, and a loop
that dies halfway must be restartable without duplicates. Each run is a normal
``binaryduo train`` in a process of its own (its own memory, signals and exit status), in
``DIR/<recipe name>/seed-<N>``, with the MLflow tags ``sweep_id``, ``seed`` and
``recipe_hash_without_seed`` (the last two are on every recipe run; ``compare --by-seed`` groups
by them).

Running the same command again continues the sweep: a finished run (``run_state.json`` says so)
is skipped, an interrupted one is resumed (``--resume``: same MLflow runs, same stage, epoch and
step), a missing one is started, so a sweep killed and restarted ends with exactly one finished
run per (recipe, seed). The sweep id is a hash of the recipes as resolved (seed left out) and
the ``--smoke`` flag, not of the seeds: ``--seeds 0-9`` after ``--seeds 0-4`` adds five runs to
the same sweep.

The recipes are resolved once and frozen into ``DIR/recipes/<name>.yaml``; every run trains its
frozen file, so an edit to the original mid-sweep cannot make seeds of one "recipe" differ.
Everything is checked before the first run starts (seed list, every recipe at every seed, names,
an existing DIR's sweep, the tracking server): one ``binaryduo: error:`` line per problem, exit 2.

Signals: SIGTERM and SIGUSR1 are passed to the running ``train``, SIGINT (Ctrl-C) as SIGTERM;
the run checkpoints and exits as preempted (USR1: and requeues the Slurm job), and the sweep
stops after it with the same status, 75 (also for a signal between two runs; on USR1 it asks
Slurm to requeue the job itself). One sweep at a time per directory (a lock file). The run has a session of its own, so a Ctrl-C reaches it
once, through the sweep. A sweep killed outright takes its run with it (the kernel sends the run
SIGTERM, ``PR_SET_PDEATHSIG``), which then checkpoints as for any preemption.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from binaryduo.trainer.cli.errors import EXIT_CHECK_FAILED, UsageError, one_line_errors
from binaryduo.trainer.cli.seeds import parse_seeds, refuse_seed_override
from binaryduo.trainer.runtime.console import stderr_line
from binaryduo.trainer.runtime.preemption import EXIT_PREEMPTED

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
#: signal the sweep receives -> the one it passes to the run in progress (``train`` checkpoints
#: and stops on TERM, and also requeues the Slurm job on USR1; INT would be a KeyboardInterrupt)
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM,
             signal.SIGUSR1: signal.SIGUSR1}
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class PlannedRun:
    recipe_name: str
    frozen_recipe: Path
    seed: int
    run_dir: Path


@dataclass(frozen=True)
class Sweep:
    sweep_id: str
    directory: Path
    runs: list[PlannedRun]
    record: dict          # what sweep.json holds
    tracking_uris: tuple[str | None, ...] = ()   # the recipes' own logging.tracking_uri


def _frozen_text(resolved: dict, source: str, overrides: list[str]) -> str:
    import yaml

    # the overrides as JSON: a value holding a line break cannot leave the comment
    head = (f"# frozen by `binaryduo sweep` from {json.dumps(source)}"
            + (f" with --set {json.dumps(overrides)}" if overrides else "")
            + "\n# every seed of the sweep trains this file (its own seed set by --set seed=N)\n")
    return head + yaml.safe_dump(resolved, sort_keys=False)


def plan_sweep(recipe_files: list[str], seeds: list[int], overrides: list[str], *,
               output: str | None, smoke: bool) -> tuple[Sweep, dict[str, str]]:
    """Validates everything and returns the sweep plus each frozen recipe's text (by name).
    Nothing is written here."""
    from binaryduo.trainer.recipe import RecipeError, load_recipe
    from binaryduo.trainer.run.train import smoke_recipe
    from binaryduo.trainer.tracking.provenance import recipe_hash

    refuse_seed_override(overrides)
    problems: list[str] = []
    by_name: dict[str, tuple[str, dict, str]] = {}   # name -> (file, resolved, seedless hash)
    uris: list[str | None] = []
    for path in recipe_files:
        hashes = set()
        for seed in seeds:
            try:
                recipe = load_recipe(path, [*overrides, f"seed={seed}"])
            except RecipeError as error:
                problems.extend(p for p in error.problems if p not in problems)
                break
            hashes.add(recipe_hash((smoke_recipe(recipe) if smoke else recipe)
                                   .identity_without_seed()))
        else:
            if recipe.name in by_name:
                problems.append(f"{path}: recipe name {recipe.name!r} is also the name of "
                                f"{by_name[recipe.name][0]}; a sweep keeps runs by recipe name")
                continue
            assert len(hashes) == 1, "the seed is the only thing --set seed=N changes"
            resolved = recipe.model_dump(mode="json")
            del resolved["seed"]
            by_name[recipe.name] = (path, resolved, hashes.pop())
            uris.append(recipe.logging.tracking_uri)
    if problems:
        from binaryduo.trainer.recipe import RecipeError

        raise RecipeError(problems)
    identity = {"recipes": sorted(h for _, _, h in by_name.values()), "smoke": smoke}
    sweep_id = "sweep-" + recipe_hash(identity)[:12]
    directory = Path(output) if output else Path("runs") / "sweeps" / sweep_id
    # seed by seed (every recipe at the first seed, then the next): a sweep cut short still
    # compares the recipes on the seeds it reached
    runs = [PlannedRun(name, directory / "recipes" / f"{name}.yaml", seed,
                       directory / name / f"seed-{seed}")
            for seed in seeds for name in by_name]
    record = {"sweep_id": sweep_id, "smoke": smoke, "overrides": list(overrides),
              "recipes": {name: {"file": file, "recipe_hash_without_seed": digest}
                          for name, (file, _, digest) in by_name.items()}}
    texts = {name: _frozen_text(resolved, file, overrides)
             for name, (file, resolved, _) in by_name.items()}
    return Sweep(sweep_id, directory, runs, record, tuple(uris)), texts


def read_sweep_record(path: Path) -> dict | str:
    """``sweep.json`` as a dict, or why it cannot be read (one line)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path}: unreadable ({error})"
    return record if isinstance(record, dict) else f"{path}: not a sweep record (not an object)"


def existing_sweep_problem(sweep: Sweep) -> str | None:
    """Why ``sweep.directory`` cannot hold this sweep (None: new, or this sweep continued)."""
    directory = sweep.directory
    if directory.exists() and not directory.is_dir():
        return f"--output {directory}: exists and is not a directory"
    path = directory / SWEEP_FILE
    if not path.exists():
        if directory.is_dir() and any(p.name != LOCK_FILE for p in directory.iterdir()):
            return f"--output {directory}: not empty and holds no {SWEEP_FILE}"
        return None
    before = read_sweep_record(path)
    if isinstance(before, str):
        return before
    if before.get("sweep_id") != sweep.sweep_id:
        return (f"--output {directory} holds sweep {before.get('sweep_id')} (other recipes, "
                f"--set values or --smoke); this one is {sweep.sweep_id}: choose another --output")
    return None


def run_state(run_dir: Path) -> str:
    """``finished``, ``interrupted`` (a directory to resume) or ``new``."""
    from binaryduo.trainer.run.state import RUN_STATE

    state = run_dir / RUN_STATE
    if state.exists():
        try:
            if json.loads(state.read_text()).get("finished"):
                return "finished"
        except (OSError, ValueError, AttributeError):
            pass  # written atomically, so unreadable means damaged: `train --resume` says how
    return "interrupted" if run_dir.is_dir() else "new"


def _lock(directory: Path):
    """An exclusive lock on the sweep directory for as long as the returned file stays open:
    two sweeps in one directory would resume the same run twice at once."""
    handle = (directory / LOCK_FILE).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UsageError(f"--output {directory}: another sweep is running in it (it holds "
                         f"{directory / LOCK_FILE}); wait for it, or stop it first") from None
    return handle


def _die_with(parent: int):
    """``preexec_fn`` for a run: SIGTERM when the sweep ``parent`` dies (even by SIGKILL), and
    no start at all if it died before this took effect. ``prctl`` is looked up here, in the
    sweep, so the child between fork and exec only calls it (no dlopen after fork)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_up() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(EXIT_PREEMPTED)
    return set_up


def train_command(run: PlannedRun, sweep: Sweep, *, resume: bool, tracking_uri: str | None,
                  smoke: bool) -> list[str]:
    command = [sys.executable, "-m", "binaryduo.trainer.cli", "train", str(run.frozen_recipe),
               "--set", f"seed={run.seed}", "--tag", f"sweep_id={sweep.sweep_id}"]
    command += ["--resume", str(run.run_dir)] if resume else ["--output", str(run.run_dir)]
    if tracking_uri:
        command += ["--tracking-uri", tracking_uri]
    if smoke:
        command.append("--smoke")
    return command


class _Forwarder:
    """Passes preemption signals to the running child; remembers that one came."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: int | None = None
        self._saved = {sig: signal.signal(sig, self._handle) for sig in FORWARDED}

    def _handle(self, signum, frame):
        if self.received != signal.SIGUSR1:  # USR1 (stop and requeue) wins, as in `train`
            self.received = signum
        self.forward()

    def start(self, command: list[str], preexec) -> subprocess.Popen:
        self.child = subprocess.Popen(command, start_new_session=True, preexec_fn=preexec)
        # a signal that came while Popen forked found no child to pass it to
        self.forward()
        return self.child

    def forward(self) -> None:
        if self.received is not None and self.child is not None and self.child.poll() is None:
            self.child.send_signal(FORWARDED[self.received])

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _stopped(sweep: Sweep, where: str, received: int) -> int:
    """The sweep stops for a signal: the same status as a preempted ``train`` (75), and on
    SIGUSR1 the Slurm job requeued (a run stopped by USR1 has already asked for it; asking
    again is harmless, and a run that had not started yet could not)."""
    from binaryduo.trainer.runtime.preemption import requeue_slurm_job

    action = requeue_slurm_job() if received == signal.SIGUSR1 else \
        "run the same command again to continue"
    stderr_line(f"binaryduo: sweep {sweep.sweep_id} stopped at {where} "
                f"({signal.Signals(received).name}); {action}")
    return EXIT_PREEMPTED


def run_sweep(sweep: Sweep, texts: dict[str, str], *, tracking_uri: str | None,
              smoke: bool) -> int:
    from binaryduo.trainer.run.checkpoint import atomic_write_text

    sweep.directory.mkdir(parents=True, exist_ok=True)
    lock = _lock(sweep.directory)
    seeds = sorted({run.seed for run in sweep.runs})
    path = sweep.directory / SWEEP_FILE
    if path.exists():  # a continued sweep: remember every seed it has been asked for
        before = read_sweep_record(path)
        seeds = sorted(set(seeds) | set(before.get("seeds", []) if isinstance(before, dict)
                                        else []))
    atomic_write_text(path, json.dumps({**sweep.record, "seeds": seeds}, indent=2))
    for name, text in texts.items():
        frozen = sweep.directory / "recipes" / f"{name}.yaml"
        frozen.parent.mkdir(exist_ok=True)
        if not frozen.exists():  # same sweep id: same resolved recipe, so an old copy is kept
            atomic_write_text(frozen, text)

    forwarder = _Forwarder()
    outcomes: list[tuple[PlannedRun, str]] = []
    try:
        for index, run in enumerate(sweep.runs, 1):
            where = f"[{index}/{len(sweep.runs)}] {run.recipe_name} seed {run.seed}"
            state = run_state(run.run_dir)
            if state == "finished":
                print(f"sweep {sweep.sweep_id} {where}: finished earlier, skipped", flush=True)
                outcomes.append((run, "finished earlier"))
                continue
            if forwarder.received is not None:  # between two runs: none to pass it to
                return _stopped(sweep, where, forwarder.received)
            print(f"sweep {sweep.sweep_id} {where}: "
                  f"{'resuming' if state == 'interrupted' else 'starting'} in {run.run_dir}",
                  flush=True)
            started = time.monotonic()
            child = forwarder.start(train_command(run, sweep, resume=state == "interrupted",
                                                  tracking_uri=tracking_uri, smoke=smoke),
                                    _die_with(os.getpid()))
            status = child.wait()
            forwarder.child = None
            if forwarder.received is not None or status == EXIT_PREEMPTED:
                # also a run the signal killed before its handlers were installed (status
                # -15/-10, while it imported torch): it trained nothing since its last checkpoint
                return _stopped(sweep, where, forwarder.received or signal.SIGTERM)
            outcomes.append((run, "done" if status == 0 else f"FAILED (status {status})"))
            print(f"sweep {sweep.sweep_id} {where}: {outcomes[-1][1]} in "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    finally:
        forwarder.restore()
        lock.close()
    failed = [(run, outcome) for run, outcome in outcomes if outcome.startswith("FAILED")]
    print(f"\nsweep {sweep.sweep_id}: {len(outcomes) - len(failed)} of {len(sweep.runs)} runs "
          f"finished in {sweep.directory}")
    for run, outcome in failed:
        print(f"  {run.recipe_name} seed {run.seed}: {outcome}; its log is above, its directory "
              f"{run.run_dir}")
    print(f"  compare the seeds: binaryduo compare --by-seed --sweep {sweep.directory}"
          + (f" --tracking-uri {tracking_uri}" if tracking_uri else "")
          + (" --include-smoke" if smoke else ""), flush=True)
    return EXIT_CHECK_FAILED if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from binaryduo.trainer.cli.errors import print_problems
    from binaryduo.trainer.recipe import RecipeError
    from binaryduo.trainer.tracking.server import check_tracking_server, resolve_tracking_uri
    from binaryduo.trainer.tracking.tracker import TrackingUnavailable

    seeds = parse_seeds(args.seeds)
    try:
        sweep, texts = plan_sweep(args.recipes, seeds, args.set, output=args.output,
                                  smoke=args.smoke)
    except RecipeError as error:
        return print_problems(error.problems)
    problem = existing_sweep_problem(sweep)
    if problem is not None:
        raise UsageError(problem)
    try:
        for uri in sorted({resolve_tracking_uri(args.tracking_uri, own)
                           for own in sweep.tracking_uris}):
            check_tracking_server(uri)
    except TrackingUnavailable as error:
        raise UsageError(str(error)) from None
    return run_sweep(sweep, texts, tracking_uri=args.tracking_uri, smoke=args.smoke)


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``sweep`` to the CLI's subparsers."""
    parser = one_line_errors(subparsers.add_parser(
        "sweep", help="run recipes at several seeds, one after another; restartable",
        description="One `binaryduo train` per (recipe, seed), sequentially, each in "
                    "DIR/<recipe>/seed-<N> and tagged sweep_id, seed and "
                    "recipe_hash_without_seed in MLflow. Running the same command again skips "
                    "finished runs and resumes an interrupted one. Everything is validated "
                    "before the first run starts."))
    parser.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files")
    parser.add_argument("--seeds", required=True,
                        help="seeds: a range 0-4 (inclusive), a list 0,2,7, or both 0-2,10")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a value of every recipe (repeatable; not the seed)")
    parser.add_argument("--output", help="sweep directory (default: runs/sweeps/<sweep id>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for every run (default: "
                                               "MLFLOW_TRACKING_URI, the recipe's, or "
                                               "sqlite ./mlflow.db)")
    parser.add_argument("--smoke", action="store_true",
                        help="each run on the tiny subset, one short epoch per stage")
    parser.set_defaults(handler=cmd_sweep)
    return parser
