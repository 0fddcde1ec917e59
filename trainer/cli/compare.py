"""``binaryduo compare``: a paper-style table (and plots) of the runs in an MLflow store.

    binaryduo compare [--experiment E] [--filter EXPR ...] [--format md|csv|json] [--plot OUT.png]
                      [--tracking-uri URI] [--include-smoke] [--latest] [--no-paper]

``register(subparsers)`` adds the command to the CLI. Bad input (no store, unknown experiment,
a filter MLflow rejects, an unwritable plot path) is one ``binaryduo: error: ...`` line, exit
status 2, and nothing is written: the plot path is checked before the store is read, and the
store must exist (a missing sqlite file is not created).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binaryduo.trainer.cli.errors import UsageError, one_line_errors


def cmd_compare(args: argparse.Namespace) -> int:
    from binaryduo.trainer.tracking import compare
    from binaryduo.trainer.tracking.server import resolve_tracking_uri

    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise UsageError(f"--plot {plot}: expected a .png file name")
        if not plot.parent.is_dir():
            raise UsageError(f"--plot {plot}: directory {plot.parent} does not exist")
        if plot.is_dir():
            raise UsageError(f"--plot {plot}: is a directory")
    uri = resolve_tracking_uri(args.tracking_uri, None)
    try:
        client = compare.open_store(uri)
        experiment = compare.experiment_id(client, args.experiment)
        records = compare.read_records(client, experiment, args.filter,
                                       include_smoke=args.include_smoke, latest=args.latest)
        rows = compare.compare_rows(records, client, paper=not args.paper_off)
    except compare.CompareError as error:
        raise UsageError(str(error)) from None
    print(compare.format_rows(rows, args.format))
    if not records:
        print(f"binaryduo: note: no {'' if args.include_smoke else 'non-smoke '}runs match in "
              f"experiment {args.experiment!r} at {uri}"
              + ("" if args.include_smoke else " (--include-smoke shows smoke runs)"),
              file=sys.stderr)
    if plot is not None:
        compare.plot_comparison(records, rows, plot)
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``compare`` to the CLI's subparsers."""
    from binaryduo.trainer.tracking.compare import FORMATS

    parser = one_line_errors(subparsers.add_parser(
        "compare", help="paper-style table and plots of the runs in MLflow",
        description="Reads every recipe run (parent run + stage runs) of an MLflow experiment and "
                    "prints one row per stage: dataset, model, method, weight bits, stage, top-1, "
                    "top-5, best top-1, Mbit, MFLOPs, epochs, wall time, images/s, world size and "
                    "hardware, code version; the paper's numbers (Kim et al., ICLR 2020) are "
                    "added as reference rows. Smoke runs are left out unless --include-smoke."))
    parser.add_argument("--experiment", default="binaryduo",
                        help="MLflow experiment (default: binaryduo, the recipes' default)")
    parser.add_argument("--filter", action="append", default=[], metavar="EXPR",
                        help="MLflow search filter on the recipe runs, e.g. \"tags.recipe LIKE "
                             "'imagenet_%%'\" or \"params.`model.name` = 'alexnet'\" (repeatable: "
                             "all must hold)")
    parser.add_argument("--format", default="md", choices=FORMATS,
                        help="md (default: a Markdown table), csv or json")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="also draw validation top-1 per epoch of every run (stage boundaries "
                             "marked) and top-1 vs Mbit (paper rows as stars)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                               "or sqlite ./mlflow.db)")
    parser.add_argument("--include-smoke", action="store_true", help="include --smoke runs")
    parser.add_argument("--latest", action="store_true",
                        help="only the most recent run of each recipe")
    parser.add_argument("--no-paper", dest="paper_off", action="store_true",
                        help="leave out the paper's reference rows")
    parser.set_defaults(handler=cmd_compare)
    return parser
