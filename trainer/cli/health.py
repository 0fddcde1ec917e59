"""``binaryduo analyze health RUN_DIR``: a run's per-layer health metrics from its MLflow record.

    binaryduo analyze health RUN_DIR [--stage NAME] [--plot OUT.png] [--json]
        [--tracking-uri URI] [--log-artifact]

The run directory names its MLflow runs (``run_state.json``: the parent and one run per stage)
and its tracking journal names the store they went to (``--tracking-uri`` overrides it). Prints a
table (stage, epoch, layer, metrics; the decoupling check's values at a decoupled stage's start)
or ``--json``; ``--plot`` writes the multi-panel PNG (one panel per metric, one line per layer,
stage boundaries marked). ``binaryduo train`` logs the same PNG as ``health.png`` on the parent
run when it ends; ``--log-artifact`` logs this one there too (a run trained before, or again).
Metric names and healthy values: docs/health.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binaryduo.trainer.cli.errors import UsageError


def _run_records(run_dir: Path, uri: str | None) -> tuple[str, str | None, list[tuple[str, str]]]:
    """(tracking URI, parent run id, [(stage, run id)] in stage order) of ``run_dir``."""
    import yaml

    from binaryduo.trainer.run.state import RUN_STATE, RunState
    from binaryduo.trainer.tracking.journal import Journal

    recipe_path = run_dir / "recipe.resolved.yaml"
    if not (run_dir / RUN_STATE).is_file() or not recipe_path.is_file():
        raise UsageError(f"{run_dir}: not a run directory of `binaryduo train` (no "
                         f"{RUN_STATE} / recipe.resolved.yaml)")
    state = RunState.load(run_dir)
    journal = Journal(run_dir) if Journal.exists(run_dir) else None
    if uri is None:
        uri = ((journal.last_session() or {}).get("uri") if journal else None)
    if not uri:
        raise UsageError(f"{run_dir}: its journal names no tracking URI; pass --tracking-uri")
    real = (lambda run_id: journal.run_ids.get(run_id, run_id)) if journal else (lambda r: r)
    order = [s["name"] for s in yaml.safe_load(recipe_path.read_text()).get("stages", [])]
    ids = state.stage_run_ids
    stages = [(name, real(ids[name])) for name in order if name in ids]
    if not stages:
        raise UsageError(f"{run_dir}: no stage has an MLflow run yet")
    parent = state.parent_run_id
    return uri, real(parent) if parent else None, stages


def cmd_health(args: argparse.Namespace) -> int:
    from binaryduo.trainer.analysis import health_report as report
    from binaryduo.trainer.tracking.compare import CompareError, open_store

    run_dir = Path(args.run_dir).expanduser()
    if args.plot and not Path(args.plot).expanduser().resolve().parent.is_dir():
        raise UsageError(f"--plot {args.plot}: its directory does not exist")
    uri, parent, stages = _run_records(run_dir, args.tracking_uri)
    if args.stage is not None:
        names = [name for name, _ in stages]
        if args.stage not in names:
            raise UsageError(f"--stage {args.stage}: not a stage of {run_dir} "
                             f"({', '.join(names)})")
        stages = [(n, r) for n, r in stages if n == args.stage]
    try:
        client = open_store(uri)
        record = report.read_health(client, stages)
    except CompareError as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # an unreachable server, a run the store does not know
        raise UsageError(f"{run_dir}: cannot read its MLflow record at {uri} "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not any(s.history or s.transition for s in record):
        print(f"binaryduo: {run_dir}: no health metrics in its record (health.enabled was off, "
              f"or the run predates them)", file=sys.stderr)
        return 1
    print(report.to_json(record) if args.json else report.format_table(record))
    if args.plot:
        report.plot_health(record, Path(args.plot).expanduser(), title=run_dir.name)
    if args.log_artifact:
        if parent is None:
            raise UsageError(f"{run_dir}: no parent MLflow run to log the plot to")
        import tempfile

        from mlflow.tracking import MlflowClient

        with tempfile.TemporaryDirectory() as tmp:
            path = report.plot_health(record, Path(tmp) / "health.png", title=run_dir.name)
            MlflowClient(tracking_uri=uri).log_artifact(parent, str(path))
        if not args.json:
            print(f"logged health.png to MLflow run {parent} at {uri}")
    return 0


def register(analyses) -> argparse.ArgumentParser:
    """Adds ``health`` to the ``analyze`` subparsers."""
    parser = analyses.add_parser(
        "health", help="per-layer health of a run: weight flips, STE coverage, levels, ...",
        description="Per-layer binary-network health of a run (weight flip ratio, STE coverage, "
                    "activation level occupancy, alpha, gradient norm) per epoch and stage, read "
                    "from the run's MLflow record (docs/health.md).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of binaryduo train")
    parser.add_argument("--stage", help="only this stage (default: all)")
    parser.add_argument("--plot", metavar="OUT.png", help="write the multi-panel plot here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the run's journal's)")
    parser.add_argument("--log-artifact", action="store_true",
                        help="log the plot as health.png on the run's parent MLflow run")
    parser.set_defaults(handler=cmd_health)
    return parser
