"""``binaryduo train``: a recipe in; trained stages, checkpoints and an MLflow record out."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from binaryduo.trainer.recipe import Recipe, RecipeError, load_recipe
from binaryduo.trainer.run.checkpoint import atomic_write_text
from binaryduo.trainer.runtime.console import stderr_line
from binaryduo.trainer.runtime.preemption import (EXIT_PREEMPTED, Preempted, Preemption,
                                                  requeue_slurm_job)
from binaryduo.trainer.tracking.server import check_tracking_server, resolve_tracking_uri
from binaryduo.trainer.tracking.tracker import Tracker

#: A resume that cannot work as asked: the CLI's usage status (``cli.errors.EXIT_USAGE``, which
#: this layer may not import), reported as its one ``binaryduo: error:`` line
EXIT_REFUSED = 2

#: Tags ``binaryduo train`` sets on its MLflow runs itself; ``--tag`` may not set them.
RESERVED_TAGS = frozenset({"code_version", "world_size", "hardware", "precision", "dist_backend",
                           "recipe", "recipe_hash", "smoke", "seed", "recipe_hash_without_seed",
                           "data_skipped_files", "stage", "variant"})


def _job_refusal(recipe: Recipe, ctx, resumed_dir: Path | None, dtype) -> str | None:
    """Why this recipe cannot run on this job's ranks (the same answer on every rank), or None."""
    from binaryduo.trainer.run.feed import batch_split_problem
    from binaryduo.trainer.run.state import world_size_refusal
    from binaryduo.trainer.runtime.distributed import all_gather_objects, broadcast_object

    problem = batch_split_problem(recipe.data, ctx.world_size)
    if problem is not None:
        return problem
    # one precision for the whole job (`auto` could resolve differently on a rank without GPU)
    precisions = all_gather_objects(str(dtype).removeprefix("torch."))
    if len(set(precisions)) > 1:
        return (f"precision {recipe.precision} resolved to {' / '.join(sorted(set(precisions)))} "
                f"on different ranks (per rank: {', '.join(precisions)}): give every rank a GPU, "
                f"or set precision")
    # optimizer state split per rank (ZeRO >= 1) loads only on as many ranks as wrote it
    if resumed_dir is None:
        return None
    return broadcast_object(world_size_refusal(resumed_dir, [s.name for s in recipe.stages],
                                               ctx.world_size) if ctx.is_main else None)


def smoke_recipe(recipe: Recipe) -> Recipe:
    """The same recipe, one epoch per stage (on the tiny subset ``DataFeed(smoke=True)`` takes)."""
    data = recipe.model_dump()
    for stage in data["stages"]:
        stage["epochs"] = 1
        stage["schedule"]["milestones"] = []
        stage["schedule"]["warmup_epochs"] = 0
    data["name"] = f"{recipe.name}-smoke"
    return Recipe.model_validate(data)


def _dataset_inputs(recipe: Recipe, feed, data_check) -> list[dict[str, str]]:
    """The train and val datasets as MLflow inputs (rank 0); a failure to describe them is a
    warning, never a stop."""
    from binaryduo.trainer.tracking.datasets import describe_datasets

    try:
        return describe_datasets(recipe.data.root, recipe.data.format,
                                 subsets=feed.subsets,
                                 exclude=data_check.skipped)
    except (OSError, ValueError) as error:
        stderr_line(f"binaryduo: warning: datasets not recorded as MLflow inputs: {error}")
        return []


def prepare_data(recipe: Recipe) -> None:
    """Builds demo data where a recipe asks for it (``data.prepare``) and it is missing."""
    if recipe.data.prepare == "fashion-mnist":
        from binaryduo.data.prepare import prepare_fashion_mnist

        result = prepare_fashion_mnist(Path(recipe.data.root))
        if result.created:
            print(f"prepared fashion-mnist at {recipe.data.root} ({result.seconds:.1f} s)",
                  flush=True)


def train(recipe_path: str, *, overrides: list[str], output: str | None, tracking_uri: str | None,
          resume: str | None, smoke: bool, offline: bool = False,
          extra_tags: dict[str, str] | None = None, register: str | None = None) -> int:
    """Validates (before any compute), then runs every stage; returns the exit status.
    ``extra_tags`` (e.g. ``sweep_id``) go on every MLflow run of the recipe run, beside the
    tags set here (none may be one of :data:`RESERVED_TAGS`)."""
    # Signal handlers first: a preemption signal during the slow imports and set-up below must
    # not kill the process (it is acted on at the first step boundary).
    preemption = Preemption()
    try:
        return _train(preemption, recipe_path, overrides=overrides, output=output,
                      tracking_uri=tracking_uri, resume=resume, smoke=smoke, offline=offline,
                      extra_tags=extra_tags or {}, register=register)
    finally:
        # last: a SIGTERM that follows our own `scontrol requeue` only sets the flag
        preemption.restore()


def _train(preemption: Preemption, recipe_path: str, *, overrides: list[str], output: str | None,
           tracking_uri: str | None, resume: str | None, smoke: bool,
           offline: bool = False, extra_tags: dict[str, str],
           register: str | None = None) -> int:
    # Validation happens in every process before the process group exists: a bad recipe costs
    # nothing, and every rank reports the same problem.
    recipe = load_recipe(recipe_path, overrides)
    if smoke:
        recipe = smoke_recipe(recipe)
    if register is not None and not recipe.logging.log_models:
        raise RecipeError([f"--register {register}: needs the stages' models in MLflow "
                           f"(logging.log_models is false)"])
    if resume is not None and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such run directory")
    uri = resolve_tracking_uri(tracking_uri, recipe.logging.tracking_uri)
    if not offline:  # a server that does not answer is a one-line error, before any compute
        check_tracking_server(uri)

    import torch

    from binaryduo.trainer.run.runner import run_recipe
    from binaryduo.trainer.run.state import RunState
    from binaryduo.trainer.runtime.distributed import broadcast_object, init_distributed, teardown
    from binaryduo.trainer.run.precision import resolve_dtype, tune_kernels
    from binaryduo.trainer.run.feed import DataFeed, check_data
    from binaryduo.trainer.tracking.provenance import (code_version, code_version_tag, hardware,
                                                       mlflow_standard_tags,
                                                       package_versions, recipe_hash)

    ctx = init_distributed()
    tune_kernels(ctx.device)
    clean = False
    try:
        if ctx.is_main:
            prepare_data(recipe)
        # before anything is written: a dataset with unreadable files is refused on every rank
        # (or, with data.skip_unreadable, every rank leaves the same files out)
        data_check = check_data(recipe.data, ctx)
        output_dir = Path(resume or output or broadcast_object(
            f"runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}" if ctx.is_main else None))
        resolved = recipe.model_dump(mode="json")
        digest = recipe_hash(recipe.identity())
        # a resumed directory must hold this recipe: refused before anything in it is rewritten
        state = broadcast_object(RunState.load(output_dir) if ctx.is_main else None)
        state.require_recipe(output_dir, digest)
        dtype = resolve_dtype(recipe.precision, ctx.device)
        refusal = _job_refusal(recipe, ctx, output_dir if resume is not None else None, dtype)
        if refusal is not None:  # the same on every rank, before anything is built or written
            if ctx.is_main:
                stderr_line(f"binaryduo: error: {refusal}")
            clean = True  # every rank returns here: the group closes with a barrier
            return EXIT_REFUSED
        version = code_version()
        # what `auto` resolved to on this machine, so runs from CPU and GPU compare honestly
        # the user's --tag first: binaryduo's own tags below can never be replaced by one
        tags = {**extra_tags, "code_version": code_version_tag(version),
                "world_size": str(ctx.world_size), "hardware": hardware(ctx.world_size)["device"],
                "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
                "dist_backend": str(torch.distributed.get_backend()),
                "recipe": recipe.name, "recipe_hash": digest, "smoke": str(smoke).lower(),
                # runs of one recipe at several seeds: grouped by `compare --by-seed`
                "seed": str(recipe.seed),
                "recipe_hash_without_seed": recipe_hash(recipe.identity_without_seed()),
                **mlflow_standard_tags(version, recipe_path, recipe.description)}
        if recipe.data.skip_unreadable:
            tags["data_skipped_files"] = str(len(data_check.skipped))
        if ctx.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output_dir / "recipe.resolved.yaml",
                              yaml.safe_dump(resolved, sort_keys=False))
            atomic_write_text(output_dir / "provenance.json", json.dumps({
                "code": version, "packages": package_versions(), "hardware": hardware(ctx.world_size),
                "recipe_file": str(recipe_path), "overrides": list(overrides), "smoke": smoke,
                "command": sys.argv, "data_skipped_files": list(data_check.skipped_lines)},
                indent=2))
        tracker = Tracker(uri, recipe.logging.experiment, enabled=ctx.is_main,
                          journal_dir=output_dir, offline=offline)
        feed = DataFeed(recipe.data, ctx, smoke=smoke, exclude=data_check.skipped)
        datasets = _dataset_inputs(recipe, feed, data_check) if tracker.enabled else []
        try:
            results = run_recipe(recipe, ctx=ctx, output_dir=output_dir, tracker=tracker,
                                 loaders=feed, dtype=dtype, tags=tags, recipe_hash=digest,
                                 state=state, preemption=preemption, datasets=datasets,
                                 register=register)
        except Preempted as stop:
            if ctx.is_main:
                action = requeue_slurm_job() if stop.requeue else (
                    f"resume with: binaryduo train {recipe_path} --resume {output_dir}")
                stderr_line(f"binaryduo: preempted: {stop}; {action}")
            tracker.close()
            clean = True
            return EXIT_PREEMPTED
        except BaseException:
            tracker.close()  # says what is still pending in the journal, and how to deliver it
            raise
        if ctx.is_main:
            print(f"\n{recipe.name}: run directory {output_dir}, MLflow {uri}")
            for result in results:
                extra = ""
                if "decouple_decoupled_val_top1" in result.extra:
                    extra = (f"  (decoupled before fine-tune "
                             f"{result.extra['decouple_decoupled_val_top1']:.2f})")
                print(f"  {result.name:<12} {result.variant:<10} best top-1 {result.best_top1:6.2f}"
                      f"  final {result.final_top1:6.2f}{extra}")
            print(f"  open the record: mlflow ui --backend-store-uri {uri}", flush=True)
        tracker.close()  # last try for the backlog; what is still pending is said, with the command
        clean = True
        return 0
    except BaseException as error:
        if ctx.world_size > 1:  # say which rank failed; the launcher's log interleaves them
            stderr_line(f"binaryduo: rank {ctx.rank}/{ctx.world_size} failed: "
                        f"{type(error).__name__}: {error}")
        raise
    finally:
        teardown(clean)
