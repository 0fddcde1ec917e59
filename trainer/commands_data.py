"""``binaryduo data ...``: prepare and check datasets.

    binaryduo data prepare fashion-mnist OUT [--source DIR] [--force]
    binaryduo data check DIR [--no-decode] [--workers N] [--json]

``register(subparsers)`` adds the ``data`` command to the CLI's subparsers. Handlers return the
exit status: 0 on success, 1 when ``data check`` finds problems; bad paths raise the CLI's
``UsageError`` (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json

EXIT_CHECK_FAILED = 1


def _usage_error(message: str) -> Exception:
    from binaryduo.trainer.cli import UsageError  # lazy: cli imports this module
    return UsageError(message)


def cmd_prepare_fashion_mnist(args: argparse.Namespace) -> int:
    from binaryduo.data.prepare import (DatasetExistsError, SourceMissingError,
                                        prepare_fashion_mnist)
    try:
        result = prepare_fashion_mnist(args.out, source_dir=args.source, force=args.force)
    except (SourceMissingError, DatasetExistsError) as error:
        raise _usage_error(str(error)) from None
    except (NotADirectoryError, PermissionError) as error:
        raise _usage_error(f"{args.out}: {error.strerror or error}") from None
    print(result.format())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from binaryduo.data.check import check_dataset
    if args.workers is not None and args.workers < 1:
        raise _usage_error(f"--workers {args.workers}: must be >= 1")
    try:
        report = check_dataset(args.dir, decode=not args.no_decode, workers=args.workers)
    except NotADirectoryError:
        raise _usage_error(f"data check: {args.dir}: not a directory") from None
    if args.json:
        print(json.dumps({"root": str(report.root), "layout": report.layout, "ok": report.ok,
                          "images": report.images, "classes": report.classes,
                          "ignored": report.ignored,
                          "problems": [vars(p) for p in report.problems]}, indent=2))
    else:
        print(report.format())
    return 0 if report.ok else EXIT_CHECK_FAILED


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``data prepare fashion-mnist OUT`` and ``data check DIR`` to ``subparsers``."""
    from binaryduo.data.prepare import FASHION_MNIST_DIR  # numpy only: cheap

    data = subparsers.add_parser("data", help="prepare and check datasets",
                                 description="Prepare the demo dataset or check a dataset tree.")
    actions = data.add_subparsers(dest="data_action", required=True, metavar="ACTION")

    prepare = actions.add_parser("prepare", help="write a dataset in the pipeline's format")
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    fashion = datasets.add_parser(
        "fashion-mnist", help="Fashion-MNIST from the Debian package dataset-fashion-mnist",
        description="Writes Fashion-MNIST (60,000 train / 10,000 val, 28x28 grey, 10 classes) "
                    "as a numpy shard dataset in OUT; a no-op when OUT is already complete.")
    fashion.add_argument("out", metavar="OUT", help="output directory (created atomically)")
    fashion.add_argument("--source", default=FASHION_MNIST_DIR,
                         help=f"folder of the idx .gz files (default {FASHION_MNIST_DIR})")
    fashion.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    fashion.set_defaults(handler=cmd_prepare_fashion_mnist)

    check = actions.add_parser(
        "check", help="find empty classes, missing splits, broken or truncated images",
        description="Checks an ImageFolder tree, a file-list dataset or a shard; prints one line "
                    "per problem and a summary; exit status 1 when problems are found.")
    check.add_argument("dir", metavar="DIR")
    check.add_argument("--no-decode", action="store_true",
                       help="only identify file headers (fast; misses truncated files)")
    check.add_argument("--workers", type=int, default=None, help="decoding threads")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.set_defaults(handler=cmd_check)
    return data
