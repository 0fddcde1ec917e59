"""The small-image shard format: decoded uint8 pixels in ``.npy`` arrays plus a ``manifest.json``.

Layout of a shard dataset directory::

    manifest.json          written last: its presence means the dataset is complete
    train_images.npy       uint8 (N, H, W, C)
    train_labels.npy       int64 (N,)
    val_images.npy         uint8 (M, H, W, C)
    val_labels.npy         int64 (M,)

``manifest.json`` records the format tag and version, the class names (index = position), per split
the image count, the array file names and the per-image shape, and the train-set pixel mean/std
(0..1 scale, one value per stored channel) used as the default normalization of the ``small``
preset. See :mod:`.prepare` for why this format was chosen over a PNG ImageFolder tree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_TAG = "binaryduo-shard"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard directory is missing, incomplete or inconsistent with its manifest."""


@dataclass(frozen=True)
class SplitInfo:
    count: int
    images: str                    # file name of the (N, H, W, C) uint8 array
    labels: str                    # file name of the (N,) int64 array
    shape: tuple[int, int, int]    # (H, W, C) of every image


@dataclass(frozen=True)
class ShardManifest:
    root: Path
    name: str
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {split: info.count for split, info in self.splits.items()}

    def to_json(self) -> dict:
        return {
            "format": FORMAT_TAG, "version": FORMAT_VERSION, "name": self.name,
            "classes": list(self.classes),
            "splits": {s: {"count": i.count, "images": i.images, "labels": i.labels,
                           "shape": list(i.shape)} for s, i in self.splits.items()},
            "mean": list(self.mean), "std": list(self.std), **self.extra,
        }

    def load_split(self, split: str, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 (N,H,W,C), labels int64 (N,))`` of one split (images memory-mapped)."""
        if split not in self.splits:
            raise ShardError(f"{self.root}: no split {split!r} (has {', '.join(self.splits)})")
        info = self.splits[split]
        images = np.load(self.root / info.images, mmap_mode="r" if mmap else None)
        labels = np.load(self.root / info.labels)
        return images, labels


def is_shard_dir(root: str | Path) -> bool:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT_TAG
    except (OSError, ValueError):
        return False


def read_manifest(root: str | Path, *, verify: bool = True) -> ShardManifest:
    """Reads ``root/manifest.json``; with ``verify`` also checks every array's header against it
    (cheap: only the ``.npy`` headers are read)."""
    root = Path(root)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{root}: no {MANIFEST} (not a prepared dataset, or an unfinished one)") \
            from None
    except (OSError, ValueError) as error:
        raise ShardError(f"{path}: unreadable manifest ({error})") from None
    if raw.get("format") != FORMAT_TAG or raw.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: not a {FORMAT_TAG} v{FORMAT_VERSION} manifest")
    try:
        splits = {s: SplitInfo(int(v["count"]), str(v["images"]), str(v["labels"]),
                               tuple(int(d) for d in v["shape"]))
                  for s, v in raw["splits"].items()}
        known = {"format", "version", "name", "classes", "splits", "mean", "std"}
        manifest = ShardManifest(root=root, name=str(raw["name"]), classes=tuple(raw["classes"]),
                                 splits=splits, mean=tuple(float(m) for m in raw["mean"]),
                                 std=tuple(float(s) for s in raw["std"]),
                                 extra={k: v for k, v in raw.items() if k not in known})
    except (KeyError, TypeError, ValueError) as error:
        raise ShardError(f"{path}: malformed manifest ({error!r})") from None
    if verify:
        for problem in verify_arrays(manifest):
            raise ShardError(problem)
    return manifest


def verify_arrays(manifest: ShardManifest) -> list[str]:
    """Problems (one sentence each) where the arrays on disk disagree with the manifest."""
    problems = []
    for split, info in manifest.splits.items():
        for name, want_shape, want_dtype in (
                (info.images, (info.count, *info.shape), np.uint8),
                (info.labels, (info.count,), np.int64)):
            path = manifest.root / name
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                problems.append(f"{path}: cannot read {split} array ({error})")
                continue
            if array.shape != want_shape or array.dtype != want_dtype:
                problems.append(f"{path}: {split} array is {array.dtype}{list(array.shape)}, "
                                f"manifest says {np.dtype(want_dtype)}{list(want_shape)}")
    return problems


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> SplitInfo:
    """Writes one split's two arrays into ``root`` (the caller makes the directory appear
    atomically) and returns its manifest entry."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images {images.shape} / labels {np.shape(labels)}: expected "
                         "(N,H,W[,C]) and (N,)")
    info = SplitInfo(len(images), f"{split}_images.npy", f"{split}_labels.npy",
                     tuple(int(d) for d in images.shape[1:]))
    np.save(root / info.images, images)
    np.save(root / info.labels, np.asarray(labels, dtype=np.int64))
    return info
