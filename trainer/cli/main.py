"""The one ``binaryduo`` command.

Every failure the user can cause (unknown model, bad option, …) ends as a single
``binaryduo: error: …`` line on stderr and exit status 2, before any compute is spent.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from binaryduo import models

from binaryduo.trainer.analysis.model_report import (cost_summary_table, decoupling_table,
                                                     verify_decoupling)
from binaryduo.trainer.cli.errors import (EXIT_CHECK_FAILED, EXIT_USAGE, UsageError,
                                          parse_model_options, print_problems)
from binaryduo.trainer.runtime.console import stderr_line

def _check_model_args(names: list[str], variants: list[str], options: dict) -> None:
    """Resolves every requested config up front so bad input fails before any model is built."""
    for name in names:
        for variant in variants:
            try:
                models.registry.resolve_config(name, variant, **options)
            except ValueError as error:
                raise UsageError(str(error)) from None


def cmd_report(args: argparse.Namespace) -> int:
    options = parse_model_options(args.option)
    if args.all:
        if args.model:
            raise UsageError("report: give a MODEL or --all, not both")
        names, variants = models.names(), list(models.variants())
        _check_model_args(names, variants, options)
        if args.json:
            reports = [models.cost_report(models.build(n, v, **options)).to_dict()
                       for n in names for v in variants]
            print(json.dumps(reports, indent=2))
        else:
            print(cost_summary_table(names, variants, options))
        return 0
    if not args.model:
        raise UsageError("report: give a MODEL (one of " + ", ".join(models.names()) + ") or --all")
    _check_model_args([args.model], [args.variant], options)
    report = models.cost_report(models.build(args.model, args.variant, **options))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


def cmd_analyze_decoupling(args: argparse.Namespace) -> int:
    options = parse_model_options(args.option)
    names = args.models or models.names()
    _check_model_args(names, ["coupled"], options)
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: must be >= 1")
    results = []
    for name in names:
        results.extend(verify_decoupling(name, seed=args.seed, batch_size=args.batch,
                                         options=options))
    if args.json:
        print(json.dumps([{"model": r.model, "seconds": r.seconds, **r.check.to_dict()}
                          for r in results], indent=2))
    else:
        print(decoupling_table(results, args.tolerance))
    failed = [r for r in results if not r.check.passed(args.tolerance)]
    if failed:
        print(f"binaryduo: decoupling is not exact for "
              f"{', '.join(sorted({r.model for r in failed}))} (float64 tolerance "
              f"{args.tolerance:g})", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from binaryduo.trainer.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.set, schema_only=args.schema_only)
    except RecipeError as error:
        return print_problems(error.problems)
    stages = " -> ".join(f"{s.name} ({s.variant}, {s.epochs} ep"
                         + (", via decouple" if s.transition == "decouple" else "") + ")"
                         for s in recipe.stages)
    scope = "schema" if args.schema_only else "schema, environment and paths"
    print(f"ok: {args.recipe}: recipe {recipe.name!r}, model {recipe.model.name}: {stages} "
          f"[checked {scope}]")
    return 0


_TAG_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}")


def parse_tags(items: list[str]) -> dict[str, str]:
    """``--tag KEY=VALUE`` items as a dict; a bad item is a UsageError naming it."""
    from binaryduo.trainer.run.train import RESERVED_TAGS

    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _TAG_KEY.fullmatch(key) or not value:
            raise UsageError(f"--tag {item!r}: expected KEY=VALUE (KEY: letters, digits, _ . -; "
                             f"VALUE not empty)")
        if key in RESERVED_TAGS or key.startswith("mlflow."):
            raise UsageError(f"--tag {item!r}: {key!r} is set by binaryduo train itself")
        if key in tags:
            raise UsageError(f"--tag {item!r}: {key!r} given twice")
        tags[key] = value
    return tags


def cmd_train(args: argparse.Namespace) -> int:
    from binaryduo.trainer.recipe import RecipeError
    from binaryduo.trainer.run.train import train
    from binaryduo.trainer.run.checkpoint import (CheckpointCorruptError, CheckpointWriteError,
                                                  UntrustedCheckpointError)
    from binaryduo.trainer.run.state import DifferentRecipeError
    from binaryduo.trainer.run.transitions import StageTransitionError
    from binaryduo.trainer.tracking.tracker import TrackingError, TrackingUnavailable

    if args.register is not None:
        from binaryduo.trainer.tracking.models import registered_name_problem

        problem = registered_name_problem(args.register)
        if problem is not None:
            raise UsageError(problem)
    try:
        return train(args.recipe, overrides=args.set, output=args.output,
                     tracking_uri=args.tracking_uri, resume=args.resume, smoke=args.smoke,
                     offline=args.offline, extra_tags=parse_tags(args.tag),
                     register=args.register)
    except TrackingUnavailable as error:  # pre-flight: before any compute or output
        raise UsageError(str(error)) from None
    except TrackingError as error:
        stderr_line(f"binaryduo: run stopped: {error}")
        return EXIT_CHECK_FAILED
    except RecipeError as error:
        return print_problems(error.problems)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    except (StageTransitionError, DifferentRecipeError, FloatingPointError, CheckpointWriteError,
            CheckpointCorruptError, UntrustedCheckpointError) as error:
        stderr_line(f"binaryduo: run stopped: {error}")
        return EXIT_CHECK_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from binaryduo.trainer.cli.demo import run_demo

    return run_demo(output=args.output, tracking_uri=args.tracking_uri)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="binaryduo", description="BinaryDuo binary-activation networks: train, report, analyze.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate", help="check a recipe before spending compute",
        description="Validates a recipe: schema (unknown keys, types), stage chain, model options, "
                    "environment variables and dataset paths. One line per problem, exit 2.")
    validate.add_argument("recipe", help="recipe YAML file")
    validate.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                          help="override a recipe value, e.g. stages.finetune.epochs=3 (repeatable)")
    validate.add_argument("--schema-only", action="store_true",
                          help="do not consult environment variables or the file system")
    validate.set_defaults(handler=cmd_validate)

    train = commands.add_parser(
        "train", help="run a recipe: stages, transitions, checkpoints, MLflow",
        description="Validates RECIPE (nothing runs if it is bad), then trains its stages in order.")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a recipe value (repeatable)")
    train.add_argument("--output", help="run directory (default: runs/<recipe>-<time>)")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                              "the recipe's, or sqlite ./mlflow.db)")
    train.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR (same stage and epoch, same MLflow runs)")
    train.add_argument("--smoke", action="store_true",
                       help="same code path on a tiny subset, one short epoch per stage")
    train.add_argument("--offline", action="store_true",
                       help="do not contact the tracking server: keep every MLflow record in "
                            "RUN_DIR/mlflow-journal; deliver later with `binaryduo tracking "
                            "replay RUN_DIR`")
    train.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                       help="an MLflow tag on every run this command creates, e.g. "
                            "sweep_id=... (repeatable; binaryduo's own tags such as seed are "
                            "refused; with --resume, runs that exist keep their tags)")
    train.add_argument("--register", metavar="NAME",
                       help="register the last stage's final model in the MLflow Model Registry "
                            "as a new version of NAME (needs logging.log_models, the default)")
    train.set_defaults(handler=cmd_train)

    demo = commands.add_parser(
        "demo", help="BNN vs BinaryDuo on Fashion-MNIST, table read back from MLflow",
        description="Prepares Fashion-MNIST, trains recipes/demo/*bnn* and *binaryduo* at equal "
                    "budget, exports the BinaryDuo network to OpenVINO (verified on the whole "
                    "test set), and prints a paper-style table from the MLflow record.")
    demo.add_argument("--output", default="runs/demo", help="parent of the two run directories")
    demo.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite ./mlflow.db)")
    demo.set_defaults(handler=cmd_demo)

    from binaryduo.trainer.cli.data import register as register_data_commands

    register_data_commands(commands)

    from binaryduo.trainer.cli.compare import register as register_compare_commands

    register_compare_commands(commands)

    from binaryduo.trainer.cli.sweep import register as register_sweep_command

    register_sweep_command(commands)

    from binaryduo.trainer.cli.slurm import register as register_slurm_commands

    register_slurm_commands(commands)

    from binaryduo.trainer.cli.tracking import register as register_tracking_commands

    register_tracking_commands(commands)

    from binaryduo.trainer.cli.export import register as register_export_command

    register_export_command(commands)

    report = commands.add_parser(
        "report", help="model size (Mbit) and FLOPs by the paper's counting rules",
        description="Per-layer cost table of a registered model, or a summary of all of them.")
    report.add_argument("model", nargs="?", help=f"one of: {', '.join(models.names())}")
    report.add_argument("--variant", default="decoupled", choices=models.variants())
    report.add_argument("--all", action="store_true", help="summary of every model x variant")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="model option, e.g. width_mult=0.5 or weight_bits=32 (repeatable)")
    report.set_defaults(handler=cmd_report)

    analyze = commands.add_parser("analyze", help="analyses of models")
    analyses = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    decoupling = analyses.add_parser(
        "decoupling", help="verify coupled -> decoupled exactness on random BN state",
        description="Builds each coupled model with random BN statistics, decouples it and "
                    "compares logits in float64 (must be exact) and float32 (flips counted).")
    decoupling.add_argument("models", nargs="*", metavar="MODEL",
                            help=f"default: all of {', '.join(models.names())}")
    decoupling.add_argument("--batch", type=int, default=4, help="images in the random batch")
    decoupling.add_argument("--seed", type=int, default=0)
    decoupling.add_argument("--tolerance", type=float, default=1e-9,
                            help="largest float64 |dlogit| accepted")
    decoupling.add_argument("--json", action="store_true")
    decoupling.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE")
    decoupling.set_defaults(handler=cmd_analyze_decoupling)

    from binaryduo.trainer.cli.analysis import register as register_analysis_commands

    register_analysis_commands(analyses)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        stderr_line(f"binaryduo: error: {error}")
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
