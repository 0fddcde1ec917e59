"""Dataset checks: find what would make a training run crash or silently mislabel, before it starts.

``check_dataset(root)`` works on the three layouts of :mod:`.layout`:

- imagefolder: a missing ``train/`` or ``val/`` split, a split without class folders, class folders
  with no image file (empty), ``val/`` classes absent from ``train/`` (they would get no index),
  and, for every file with an image extension, zero-byte files, files that cannot be read, and
  files that do not decode completely (not an image, truncated, corrupt). Files are decoded with
  Pillow in full: a PNG or a CMYK/grey JPEG named ``.JPEG`` decodes and is valid (DALI decodes it
  as well, by content). Files without an image extension are skipped by the pipeline and counted
  as ``ignored``, not reported.
- filelist: the same per-file checks for every listed file, plus listed files that do not exist
  and malformed lines.
- shard: manifest and array headers agree, labels lie in ``0..classes-1``.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .layout import (LayoutError, class_names, is_image_name, list_class_files, list_filelist)
from .shard import MANIFEST, ShardError, is_shard_dir, read_manifest, verify_arrays

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Problem:
    kind: str    # missing-split, no-classes, empty-class, unknown-class, missing-file,
    #              zero-byte, unreadable, undecodable, bad-list, shard
    path: str
    detail: str

    def format(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class DatasetReport:
    root: Path
    layout: str                                   # imagefolder, filelist or shard
    problems: list[Problem] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)   # files/images per split (all checked)
    classes: int = 0
    ignored: int = 0                              # files without an image extension

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.images.items()) or "no images"
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        ignored = f", {self.ignored} non-image file(s) ignored" if self.ignored else ""
        return (f"{verdict}: {self.root} ({self.layout}: {splits}; {self.classes} classes"
                f"{ignored})")

    def format(self) -> str:
        """One line per problem, then the summary line."""
        return "\n".join([p.format() for p in self.problems] + [self.summary()])


def check_dataset(root: str | Path, *, decode: bool = True,
                  workers: int | None = None) -> DatasetReport:
    """Checks ``root`` (see the module docstring). ``decode=False`` only identifies each file's
    header (fast; misses truncation). ``workers``: decoding threads (default: CPU count).
    Raises ``NotADirectoryError`` when ``root`` is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    workers = workers or os.cpu_count() or 1
    if is_shard_dir(root):
        return _check_shard(root)
    if (root / "train.txt").is_file() or (root / "val.txt").is_file():
        return _check_filelist(root, decode, workers)
    return _check_imagefolder(root, decode, workers)


def check_image(path: str | Path, *, decode: bool = True) -> Problem | None:
    """The problem with one image file, or None when it is readable and (fully) decodes."""
    from PIL import Image, UnidentifiedImageError

    path = str(path)
    try:
        size = os.path.getsize(path)
        if size == 0:
            return Problem("zero-byte", path, "empty file")
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        return Problem("unreadable", path, error.strerror or str(error))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning and the like
            with Image.open(path) as image:
                if decode:
                    image.load()
                width, height = image.size
        if width < 1 or height < 1:
            return Problem("undecodable", path, f"image is {width}x{height}")
    except UnidentifiedImageError:
        return Problem("undecodable", path, f"not an image ({size} bytes)")
    except Exception as error:  # truncated / corrupt data: OSError, SyntaxError, ValueError...
        return Problem("undecodable", path, f"{type(error).__name__}: {error}")
    return None


def _check_files(files: list[str], decode: bool, workers: int) -> list[Problem]:
    if workers <= 1 or len(files) < 64:
        results = [check_image(f, decode=decode) for f in files]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda f: check_image(f, decode=decode), files,
                                    chunksize=32))
    return [p for p in results if p is not None]


def _check_imagefolder(root: Path, decode: bool, workers: int) -> DatasetReport:
    report = DatasetReport(root, "imagefolder")
    train_classes: list[str] | None = None
    to_decode: list[str] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            report.problems.append(Problem("missing-split", str(split_dir),
                                           f"no {split}/ folder"))
            continue
        classes = class_names(split_dir)
        if not classes:
            report.problems.append(Problem("no-classes", str(split_dir), "no class folders"))
            continue
        if split == "train":
            train_classes = classes
            report.classes = len(classes)
        elif train_classes is not None:
            for name in sorted(set(classes) - set(train_classes)):
                report.problems.append(Problem(
                    "unknown-class", str(split_dir / name),
                    "class folder not in train/: it has no class index"))
        count = 0
        for name in classes:
            images = list_class_files(split_dir / name)
            report.ignored += _count_non_images(split_dir / name)
            if not images:
                report.problems.append(Problem("empty-class", str(split_dir / name),
                                               "no image files"))
            count += len(images)
            to_decode.extend(images)
        report.images[split] = count
    if report.classes == 0 and "val" in report.images:
        report.classes = len(class_names(root / "val"))
    report.problems.extend(_check_files(to_decode, decode, workers))
    return report


def _count_non_images(class_dir: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for f in filenames if not f.startswith(".") and not is_image_name(f))
    return count


def _check_filelist(root: Path, decode: bool, workers: int) -> DatasetReport:
    report = DatasetReport(root, "filelist")
    to_decode: list[str] = []
    for split in SPLITS:
        if not (root / f"{split}.txt").is_file():
            report.problems.append(Problem("missing-split", str(root / f"{split}.txt"),
                                           f"no {split}.txt"))
            continue
        try:
            listing = list_filelist(root, split)
        except LayoutError as error:
            report.problems.append(Problem("bad-list", str(root / f"{split}.txt"), str(error)))
            continue
        report.classes = max(report.classes, len(listing.classes))
        report.images[split] = len(listing)
        for path in listing.files:
            if os.path.exists(path):
                to_decode.append(path)
            else:
                report.problems.append(Problem("missing-file", path,
                                               f"listed in {split}.txt, does not exist"))
    report.problems.extend(_check_files(to_decode, decode, workers))
    return report


def _check_shard(root: Path) -> DatasetReport:
    report = DatasetReport(root, "shard")
    try:
        manifest = read_manifest(root, verify=False)
    except ShardError as error:
        report.problems.append(Problem("shard", str(root / MANIFEST), str(error)))
        return report
    report.classes = len(manifest.classes)
    report.images = manifest.counts
    problems = verify_arrays(manifest)
    report.problems.extend(Problem("shard", str(root), p) for p in problems)
    if problems:
        return report
    for split in SPLITS:
        if split not in manifest.splits:
            report.problems.append(Problem("missing-split", str(root / MANIFEST),
                                           f"manifest has no {split} split"))
            continue
        _, labels = manifest.load_split(split)
        bad = np.flatnonzero((labels < 0) | (labels >= len(manifest.classes)))
        if len(bad):
            report.problems.append(Problem(
                "shard", str(root / manifest.splits[split].labels),
                f"{len(bad)} label(s) outside 0..{len(manifest.classes) - 1} "
                f"(first at index {bad[0]}: {labels[bad[0]]})"))
    return report
