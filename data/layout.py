"""On-disk dataset layouts: detecting them and listing a split's files, labels and class names.

- ``imagefolder``: ``root/{train,val}/<class>/**/<image>``. Class indices are the positions of the
  class folder names of ``train/`` in sorted order; ``val/`` is labelled with the same mapping (a
  class folder missing from ``val/`` shifts nothing; one that is not in ``train/`` is an error).
- ``filelist``: ``root/{train,val}.txt`` in DALI's ``file_list`` form, one ``<relative path>
  <label>`` per line (paths relative to ``root``); optional ``root/classes.txt`` names the classes
  one per line in index order.
- ``shard``: decoded arrays + ``manifest.json`` (see :mod:`.shard`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shard import is_shard_dir

FORMATS = ("imagefolder", "filelist", "shard")
SPLITS = ("train", "val")
# What DALI's file reader decodes (its default file_filters), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm",
                    ".pbm", ".jp2", ".webp")


class LayoutError(ValueError):
    """The dataset directory does not have the expected layout."""


@dataclass(frozen=True)
class FileSplit:
    """One split of a file-based dataset: absolute paths, int64 labels, class names."""
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    if is_shard_dir(root):
        return "shard"
    if (root / "train.txt").is_file() or (root / "val.txt").is_file():
        return "filelist"
    if (root / "train").is_dir() or (root / "val").is_dir():
        return "imagefolder"
    raise LayoutError(f"{root}: no manifest.json, train.txt/val.txt or train/ val/ folders: "
                      "not a dataset directory")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_names(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir)
                  if entry.is_dir() and not entry.name.startswith("."))


def scan_class_dir(class_dir: Path) -> tuple[list[str], int]:
    """``(image files, count of other files)`` under one class folder (recursively, hidden
    entries skipped; images sorted): one directory walk for the listing and ``data check``."""
    found, others = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if is_image_name(name):
                found.append(os.path.join(dirpath, name))
            else:
                others += 1
    return sorted(found), others


def list_class_files(class_dir: Path) -> list[str]:
    """Image files under one class folder (recursively, hidden entries skipped), sorted."""
    return scan_class_dir(class_dir)[0]


def list_imagefolder(root: str | Path, split: str) -> FileSplit:
    root = Path(root)
    train_dir, split_dir = root / "train", root / split
    if not split_dir.is_dir():
        raise LayoutError(f"{root}: no {split}/ folder")
    classes = class_names(train_dir if train_dir.is_dir() else split_dir)
    if not classes:
        raise LayoutError(f"{train_dir}: no class folders")
    index = {name: i for i, name in enumerate(classes)}
    extra = [c for c in class_names(split_dir) if c not in index]
    if extra:
        raise LayoutError(f"{split_dir}: class folders not in train/: {', '.join(extra[:5])}")
    files, labels = [], []
    for name in class_names(split_dir):
        found = list_class_files(split_dir / name)
        files.extend(os.path.abspath(f) for f in found)
        labels.extend([index[name]] * len(found))
    if not files:
        raise LayoutError(f"{split_dir}: no image files")
    return FileSplit(tuple(classes), tuple(files), np.asarray(labels, dtype=np.int64))


def list_filelist(root: str | Path, split: str) -> FileSplit:
    root = Path(root)
    path = root / f"{split}.txt"
    if not path.is_file():
        raise LayoutError(f"{root}: no {split}.txt")
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        try:
            label = int(parts[1])
        except (IndexError, ValueError):
            raise LayoutError(f"{path}:{number}: expected '<path> <label>'") from None
        if label < 0:
            raise LayoutError(f"{path}:{number}: negative label {label}")
        files.append(os.path.abspath(root / parts[0]))
        labels.append(label)
    if not files:
        raise LayoutError(f"{path}: no entries")
    names_path = root / "classes.txt"
    if names_path.is_file():
        classes = tuple(n.strip() for n in names_path.read_text().splitlines() if n.strip())
        if max(labels) >= len(classes):
            raise LayoutError(f"{path}: label {max(labels)} but classes.txt names "
                              f"{len(classes)} classes")
    else:
        classes = tuple(str(i) for i in range(max(labels) + 1))
    return FileSplit(classes, tuple(files), np.asarray(labels, dtype=np.int64))


def list_split(root: str | Path, split: str, fmt: str) -> FileSplit:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if fmt == "imagefolder":
        return list_imagefolder(root, split)
    if fmt == "filelist":
        return list_filelist(root, split)
    raise ValueError(f"format {fmt!r} has no file list")
