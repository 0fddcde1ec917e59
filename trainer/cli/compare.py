"""``binaryduo compare``: a paper-style table (and plots) of the runs in an MLflow store.

    binaryduo compare [--experiment E] [--filter EXPR ...] [--sweep ID] [--format md|csv|json]
                      [--plot OUT.png] [--tracking-uri URI] [--include-smoke] [--latest]
                      [--no-paper] [--by-seed [--baseline RECIPE]]

``register(subparsers)`` adds the command to the CLI. Bad input (no store, unknown experiment,
a filter MLflow rejects, an unwritable plot path, --baseline without --by-seed or naming no
recipe) is one ``binaryduo: error: ...`` line, exit status 2, and nothing is written: the
options and the plot path are checked before the store is read, the table is built before
anything is printed, and the store must exist (a missing sqlite file is not created).
``--by-seed``: one row per recipe (less its seed) and stage, statistics over the seeds
(``tracking/seed_groups.py``, ``tracking/seed_stats.py``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from binaryduo.trainer.cli.errors import UsageError, one_line_errors


def _sweep_id(value: str) -> str:
    """``--sweep``: an id, or a sweep directory (``binaryduo sweep --output DIR``), read from its
    sweep.json, so a script need not know the id's hash."""
    from binaryduo.trainer.cli.sweep import SWEEP_FILE

    record = Path(value) / SWEEP_FILE
    if not Path(value).is_dir():
        return value
    try:
        return str(json.loads(record.read_text())["sweep_id"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--sweep {value}: a directory, but not a sweep's: {record} "
                         f"unreadable ({type(error).__name__}: {error})") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from binaryduo.trainer.tracking import compare, compare_data
    from binaryduo.trainer.tracking.server import resolve_tracking_uri

    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise UsageError(f"--plot {plot}: expected a .png file name")
        if not plot.parent.is_dir():
            raise UsageError(f"--plot {plot}: directory {plot.parent} does not exist")
        if plot.is_dir():
            raise UsageError(f"--plot {plot}: is a directory")
    if args.baseline is not None and not args.by_seed:
        raise UsageError("--baseline compares groups of seeds: it needs --by-seed")
    if args.by_seed and args.latest:
        raise UsageError("--latest keeps one run per recipe, --by-seed every seed's: "
                         "give one of them")
    filters = list(args.filter)
    if args.sweep is not None:
        args.sweep = _sweep_id(args.sweep)
        if not _SWEEP_ID.fullmatch(args.sweep):
            raise UsageError(f"--sweep {args.sweep!r}: expected a sweep id (letters, digits, "
                             f"_ . : -)")
        filters.append(f"tags.sweep_id = '{args.sweep}'")
    uri = resolve_tracking_uri(args.tracking_uri, None)
    notes: list[str] = []
    try:
        client = compare.open_store(uri)
        experiment = compare.experiment_id(client, args.experiment)
        records = compare.read_records(client, experiment, filters,
                                       include_smoke=args.include_smoke, latest=args.latest)
        if args.by_seed:
            from binaryduo.trainer.tracking import seed_groups

            groups, notes = seed_groups.group_records(records, client)
            rows = seed_groups.seed_rows(groups, paper=not args.paper_off)
            if args.baseline is not None:
                rows, more = seed_groups.with_baseline(rows, groups, args.baseline)
                notes += more
            table = seed_groups.format_seed_rows(rows, args.format)
        else:
            rows = compare.compare_rows(records, client, paper=not args.paper_off)
            table = compare.format_rows(rows, args.format)
            notes += compare_data.data_notes(rows)
    except compare.CompareError as error:
        raise UsageError(str(error)) from None
    print(table)
    for note in notes:
        print(f"binaryduo: note: {note}", file=sys.stderr)
    if not records:
        print(f"binaryduo: note: no {'' if args.include_smoke else 'non-smoke '}runs match in "
              f"experiment {args.experiment!r} at {uri}"
              + ("" if args.include_smoke else " (--include-smoke shows smoke runs)"),
              file=sys.stderr)
    if plot is not None:
        if args.by_seed:
            seed_groups.plot_seed_groups(groups, rows, plot)
        else:
            compare.plot_comparison(records, rows, plot)
        print(f"plot: {plot}", file=sys.stderr)
    return 0


_SWEEP_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``compare`` to the CLI's subparsers."""
    from binaryduo.trainer.tracking.compare import FORMATS

    parser = one_line_errors(subparsers.add_parser(
        "compare", help="paper-style table and plots of the runs in MLflow",
        description="Reads every recipe run (parent run + stage runs) of an MLflow experiment and "
                    "prints one row per stage: dataset, model, method, weight bits, stage, top-1, "
                    "top-5, best top-1, Mbit, MFLOPs, epochs, wall time, images/s, world size and "
                    "hardware, code version; the paper's numbers (Kim et al., ICLR 2020) are "
                    "added as reference rows. Smoke runs are left out unless --include-smoke. "
                    "--by-seed: one row per recipe (less its seed) and stage over its FINISHED "
                    "runs (the latest per seed): n, the seeds, mean ± sample std (n-1) and "
                    "min-max of final top-1/top-5 and best top-1; --baseline RECIPE adds each "
                    "other recipe of that dataset's final top-1 minus the baseline's, with a 95% "
                    "t interval and p-value (paired by seed when both ran the same seeds, else "
                    "Welch)."))
    parser.add_argument("--experiment", default="binaryduo",
                        help="MLflow experiment (default: binaryduo, the recipes' default)")
    parser.add_argument("--filter", action="append", default=[], metavar="EXPR",
                        help="MLflow search filter on the recipe runs, e.g. \"tags.recipe LIKE "
                             "'imagenet_%%'\" or \"params.`model.name` = 'alexnet'\" (repeatable: "
                             "all must hold)")
    parser.add_argument("--sweep", metavar="ID|DIR",
                        help="only the runs of one `binaryduo sweep`, by id or by its --output "
                             "directory (tag sweep_id; the same as "
                             "--filter \"tags.sweep_id = 'ID'\")")
    parser.add_argument("--by-seed", action="store_true",
                        help="aggregate over seeds: one row per recipe less its seed "
                             "(tag recipe_hash_without_seed) and stage, FINISHED runs only")
    parser.add_argument("--baseline", metavar="RECIPE",
                        help="with --by-seed: compare the final stage of every other recipe of "
                             "the same dataset with this recipe's (final top-1 difference, 95%% "
                             "CI, test, p-value); RECIPE is a recipe name (tags.recipe) or a "
                             "recipe_hash_without_seed")
    parser.add_argument("--format", default="md", choices=FORMATS,
                        help="md (default: a Markdown table), csv or json")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="also draw validation top-1 per epoch of every run (stage boundaries "
                             "marked) and top-1 vs Mbit (paper rows as stars); with --by-seed "
                             "the mean over seeds with a ± std band and error bars")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                               "or sqlite ./mlflow.db)")
    parser.add_argument("--include-smoke", action="store_true", help="include --smoke runs")
    parser.add_argument("--latest", action="store_true",
                        help="only the most recent run of each recipe")
    parser.add_argument("--no-paper", dest="paper_off", action="store_true",
                        help="leave out the paper's reference rows")
    parser.set_defaults(handler=cmd_compare)
    return parser
