"""``binaryduo tracking status|replay RUN_DIR``: the tracking journal of a run directory.

``replay`` delivers every record still pending (logged while the server was away, or with
``--offline``) to the journal's tracking URI or ``--tracking-uri``; it is idempotent, so running it
twice (or after a replay that was cut off) adds nothing. Exit 0 when nothing is left pending, 1 when
the server is unreachable or rejects a record (what was delivered stays delivered), 2 for a run
directory without a journal.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binaryduo.trainer.cli.errors import UsageError

EXIT_PENDING = 1


def _journal(run_dir: str):
    from binaryduo.trainer.tracking.journal import Journal

    if not Journal.exists(Path(run_dir)):
        raise UsageError(f"{run_dir}: no tracking journal (mlflow-journal/journal.jsonl); is it a "
                         f"run directory of `binaryduo train`?")
    return Journal(Path(run_dir))


def _by_op(records) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[record["op"]] = counts.get(record["op"], 0) + 1
    return ", ".join(f"{n} {op}" for op, n in counts.items()) or "none"


def cmd_status(args: argparse.Namespace) -> int:
    journal = _journal(args.run_dir)
    session = journal.last_session() or {}
    pending = journal.pending()
    print(f"{args.run_dir}: {len(journal.records)} records, {len(pending)} pending "
          f"({_by_op(pending)}); tracking URI {session.get('uri')}")
    for local_id, run_id in journal.run_ids.items():
        print(f"  run {local_id} -> {run_id}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from binaryduo.trainer.tracking.server import check_tracking_server
    from binaryduo.trainer.tracking.tracker import Tracker, TrackingError, TrackingUnavailable
    from binaryduo.trainer.tracking.journal import JournalBusy

    journal = _journal(args.run_dir)
    session = journal.last_session() or {}
    uri = args.tracking_uri or session.get("uri")
    if not uri:
        print(f"binaryduo: error: {args.run_dir}: the journal names no tracking URI; pass "
              f"--tracking-uri", file=sys.stderr)
        return 2
    if args.discard:
        journal.open({"command": "tracking replay --discard", "uri": uri,
                      "experiment": session.get("experiment", "binaryduo")})
        try:
            for seq in args.discard:
                try:
                    record = journal.discard(seq)
                except KeyError as error:
                    print(f"binaryduo: error: {args.run_dir}: {error.args[0]}", file=sys.stderr)
                    return 2
                print(f"discarded record {seq} ({record['op']} for run "
                      f"{record.get('run_id') or record.get('name')}); it stays in the journal")
        finally:
            journal.close()
        journal = _journal(args.run_dir)
    pending = journal.pending()
    if not pending:
        print(f"{args.run_dir}: nothing pending ({len(journal.records)} records, "
              f"{len(journal.discarded)} discarded, the rest delivered)")
        return 0
    try:
        check_tracking_server(uri, hint="start it and replay again")
        tracker = Tracker(uri, session.get("experiment", "binaryduo"), enabled=True,
                          journal_dir=Path(args.run_dir))
    except (TrackingUnavailable, TrackingError, JournalBusy) as error:
        print(f"binaryduo: error: {error}; {len(pending)} records still pending", file=sys.stderr)
        return EXIT_PENDING
    known = dict(tracker.journal.run_ids)
    try:
        counts = tracker.replay()
        failure = None
    except (TrackingUnavailable, TrackingError) as error:
        counts, failure = None, error
    finally:
        tracker.journal.close()
    left = tracker.pending_count()
    delivered = len(pending) - left
    for local_id, run_id in tracker.journal.run_ids.items():
        if local_id not in known:
            print(f"  run {local_id} -> {run_id}")
    if failure is not None:
        print(f"binaryduo: error: {failure}; delivered {delivered} records, {left} still pending",
              file=sys.stderr)
        return EXIT_PENDING
    print(f"delivered {delivered} records to {uri} "
          f"({', '.join(f'{n} {op}' for op, n in counts.items())}); nothing pending")
    return 0


def register(commands) -> None:
    tracking = commands.add_parser(
        "tracking", help="the MLflow journal of a run directory: status, replay",
        description="Every MLflow record of `binaryduo train` is journaled in RUN_DIR/"
                    "mlflow-journal before it is sent; records the server did not take (it was "
                    "down, or --offline) stay pending there until replayed.")
    actions = tracking.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="records and pending records of a run directory")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.set_defaults(handler=cmd_status)
    replay = actions.add_parser(
        "replay", help="deliver the pending records (idempotent)",
        description="Delivers every pending record, in order, to the journal's tracking URI (or "
                    "--tracking-uri). Exit 0 when nothing is left pending, 1 when the server is "
                    "unreachable or rejects a record.")
    replay.add_argument("run_dir", metavar="RUN_DIR")
    replay.add_argument("--tracking-uri", help="deliver here instead of the URI the run used")
    replay.add_argument("--discard", type=int, action="append", default=[], metavar="SEQ",
                        help="give up on pending record SEQ first (one the store rejects, named "
                             "in the error; repeatable)")
    replay.set_defaults(handler=cmd_replay)
