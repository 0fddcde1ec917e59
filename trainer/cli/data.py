"""``binaryduo data ...``: prepare and check datasets.

    binaryduo data prepare fashion-mnist OUT [--source DIR] [--force]
    binaryduo data prepare cifar10 --from DIR OUT [--force]
    binaryduo data prepare imagenet-val --from FLAT_DIR --ground-truth FILE OUT
                                        [--labels auto|ilsvrc2012-id|wnid|index] [--synsets FILE]
                                        [--copy] [--force]
    binaryduo data prepare resized SRC OUT --shorter-side S [--quality Q] [--workers N] [--force]
    binaryduo data check DIR [--full | --no-decode] [--workers N] [--no-cache] [--json]

``register(subparsers)`` adds the ``data`` command to the CLI's subparsers. Handlers return the
exit status: 0 on success, 1 when ``data check`` finds problems; bad paths raise the CLI's
``UsageError`` (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json

from binaryduo.trainer.cli.errors import EXIT_CHECK_FAILED, UsageError, one_line_errors


def cmd_prepare_fashion_mnist(args: argparse.Namespace) -> int:
    from binaryduo.data.prepare import (DatasetExistsError, SourceMissingError,
                                        prepare_fashion_mnist)
    try:
        result = prepare_fashion_mnist(args.out, source_dir=args.source, force=args.force)
    except (SourceMissingError, DatasetExistsError) as error:
        raise UsageError(str(error)) from None
    except (NotADirectoryError, PermissionError) as error:
        raise UsageError(f"{args.out}: {error.strerror or error}") from None
    print(result.format())
    return 0


def _prepare_errors():
    from binaryduo.data.cifar import SourceFormatError
    from binaryduo.data.imagenet import PrepareInputError
    from binaryduo.data.prepare import DatasetExistsError, SourceMissingError
    return (SourceMissingError, DatasetExistsError, SourceFormatError, PrepareInputError)


def _run_prepare(out: str, call):
    """Runs a preparation; its input errors and unusable output paths become one-line usage
    errors (each preparation checks its inputs before writing anything)."""
    try:
        result = call()
    except _prepare_errors() as error:
        raise UsageError(" ".join(str(error).split())) from None
    except (NotADirectoryError, PermissionError) as error:
        raise UsageError(f"{out}: {error.strerror or error}") from None
    print(result.format())
    return 0


def cmd_prepare_cifar10(args: argparse.Namespace) -> int:
    from binaryduo.data.cifar import prepare_cifar10
    return _run_prepare(args.out, lambda: prepare_cifar10(args.source, args.out, force=args.force))


def cmd_prepare_imagenet_val(args: argparse.Namespace) -> int:
    from binaryduo.data.imagenet import prepare_imagenet_val
    return _run_prepare(args.out, lambda: prepare_imagenet_val(
        args.source, args.ground_truth, args.out, labels=args.labels, synsets=args.synsets,
        copy=args.copy, force=args.force))


def cmd_prepare_resized(args: argparse.Namespace) -> int:
    from binaryduo.data.imagenet import prepare_resized
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be >= 1")
    return _run_prepare(args.out, lambda: prepare_resized(
        args.source, args.out, shorter_side=args.shorter_side, quality=args.quality,
        workers=args.workers, force=args.force))


def cmd_check(args: argparse.Namespace) -> int:
    from binaryduo.data.check import check_dataset, default_cache_dir
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be >= 1")
    depth = "full" if args.full else "header" if args.no_decode else "quick"
    try:
        report = check_dataset(args.dir, depth=depth, workers=args.workers,
                               cache_dir=None if args.no_cache else default_cache_dir())
    except NotADirectoryError:
        raise UsageError(f"data check: {args.dir}: not a directory") from None
    if args.json:
        print(json.dumps({"root": str(report.root), "layout": report.layout, "ok": report.ok,
                          "images": report.images, "classes": report.classes,
                          "ignored": report.ignored, "depth": report.depth,
                          "checked": report.checked, "cached": report.cached,
                          "seconds": round(report.seconds, 3),
                          "unreadable": len(report.unreadable),
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

    cifar = one_line_errors(datasets.add_parser(
        "cifar10", help="CIFAR-10 from the cifar-10-batches-py pickles",
        description="Converts the unpacked cifar-10-python.tar.gz (data_batch_1..5, test_batch, "
                    "batches.meta) into a numpy shard dataset in OUT (train 50,000 / val 10,000, "
                    "32x32x3, pixel-exact); a no-op when OUT is already complete."))
    cifar.add_argument("--from", dest="source", required=True, metavar="DIR",
                       help="the cifar-10-batches-py folder")
    cifar.add_argument("out", metavar="OUT", help="output directory (created atomically)")
    cifar.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    cifar.set_defaults(handler=cmd_prepare_cifar10)

    val = one_line_errors(datasets.add_parser(
        "imagenet-val", help="the flat ILSVRC2012 validation folder into wnid class folders",
        description="Hard-links (or copies) ILSVRC2012_val_<k>.JPEG from FLAT_DIR into "
                    "OUT/<wnid>/ by line k of the ground-truth file; use OUT as $IMAGENET_DIR/val. "
                    "Class indices then follow the standard sorted-wnid order. Ground truth: "
                    "ilsvrc2012-id = the devkit's 1-based IDs (needs --synsets meta.mat: the IDs "
                    "are NOT the sorted-wnid index), wnid = one wnid per line, index = 0-based "
                    "standard indices (--synsets: 1000 sorted wnids; default timm's list); auto "
                    "tells wnids from integers (integers = ilsvrc2012-id). Source files are never "
                    "moved or modified."))
    val.add_argument("--from", dest="source", required=True, metavar="FLAT_DIR",
                     help="folder of ILSVRC2012_val_00000001.JPEG ...")
    val.add_argument("--ground-truth", required=True, metavar="FILE",
                     help="one label per line, line k for image k")
    val.add_argument("out", metavar="OUT", help="output directory (created atomically)")
    val.add_argument("--labels", default="auto", choices=("auto", "ilsvrc2012-id", "wnid", "index"),
                     help="what the ground-truth lines are (default: auto)")
    val.add_argument("--synsets", metavar="FILE",
                     help="ilsvrc2012-id: the devkit's data/meta.mat or 1000 wnids in ID order; "
                          "index: 1000 wnids in sorted order (default: timm's "
                          "imagenet_synsets.txt)")
    val.add_argument("--copy", action="store_true",
                     help="copy the images (default: hard links, same file system only)")
    val.add_argument("--force", action="store_true", help="replace OUT if it exists")
    val.set_defaults(handler=cmd_prepare_imagenet_val)

    resized = one_line_errors(datasets.add_parser(
        "resized", help="a copy of an image tree with the shorter side cut to S pixels",
        description="Copies the ImageFolder or file-list tree SRC to OUT with every image whose "
                    "shorter side exceeds S re-encoded at shorter side S (JPEG quality Q; EXIF "
                    "orientation applied, CMYK -> RGB); smaller or undecodable files are copied "
                    "unchanged. Cuts decode time on data-bound clusters; random-resized-crop then "
                    "samples from at most S pixels."))
    resized.add_argument("source", metavar="SRC", help="dataset tree (train/ val/ or *.txt lists)")
    resized.add_argument("out", metavar="OUT", help="output directory (created atomically)")
    resized.add_argument("--shorter-side", type=int, required=True, metavar="S",
                         help="e.g. 256 (the val preset's resize target) or 160")
    resized.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality")
    resized.add_argument("--workers", type=int, default=None, help="threads (default: CPUs)")
    resized.add_argument("--force", action="store_true", help="replace OUT if it exists")
    resized.set_defaults(handler=cmd_prepare_resized)

    check = one_line_errors(actions.add_parser(
        "check", help="find empty classes, missing splits, broken or truncated images",
        description="Checks an ImageFolder tree, a file-list dataset or a shard: missing splits, "
                    "class folders without images, val classes unknown to train, and every image "
                    "file that is empty, unreadable, not an image, in a format DALI cannot "
                    "decode, or truncated (the same check `binaryduo train` runs before it "
                    "starts). PNG, grey and CMYK files named .JPEG are valid. Prints one line per "
                    "problem (kind: path: reason) and a summary; exit status 1 when problems are "
                    "found. Files that passed are remembered by path, size and times in "
                    "$BINARYDUO_CACHE_DIR (default ~/.cache/binaryduo) for datasets of 10,000 "
                    "files or more."))
    check.add_argument("dir", metavar="DIR")
    depth = check.add_mutually_exclusive_group()
    depth.add_argument("--full", action="store_true",
                       help="decode every image completely (also finds corruption inside a file; "
                            "50-200x slower)")
    depth.add_argument("--no-decode", action="store_true",
                       help="only identify file headers (fastest; misses truncated files)")
    check.add_argument("--workers", type=int, default=None,
                       help="reading threads (default: 4 per CPU, at most 32)")
    check.add_argument("--no-cache", action="store_true",
                       help="check every file again, ignoring what earlier checks remembered")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.set_defaults(handler=cmd_check)
    return data
