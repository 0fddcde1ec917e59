"""CIFAR-10 from the standard ``cifar-10-batches-py`` pickles into the small-image shard format.

The source is the Python version of CIFAR-10 as distributed by its authors
(``cifar-10-python.tar.gz`` unpacked): ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch``
(val) and ``batches.meta``. Each batch is a Python 2 pickle of a dict with ``b'data'`` (uint8,
N x 3072: per image the 1024 red, then 1024 green, then 1024 blue pixels, each plane row-major
32 x 32) and ``b'labels'`` (N ints in 0..9); ``batches.meta`` holds ``b'label_names'``. The
shard (see :mod:`.shard`) stores uint8 (N, 32, 32, 3) HWC arrays, the classes in label order, and
the per-channel train mean/std.

The pickles are read with a restricted unpickler: only the numpy classes an array needs can be
loaded, so a malicious file cannot run code. Writing is atomic and idempotent as for Fashion-MNIST
(:mod:`.prepare`).
"""
from __future__ import annotations

import errno
import json
import pickle
import time
from pathlib import Path

import numpy as np

from .prepare import (DatasetExistsError, PrepareResult, SourceMissingError, _complete_dataset,
                      _write_atomically)
from .shard import MANIFEST, read_manifest, write_split

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_NAME = "cifar10"
_SIDE = 32

# What a numpy array pickled by Python 2 or 3 (numpy 1 or 2) refers to; nothing else is loadable.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
}


class SourceFormatError(ValueError):
    """A source file exists but is not what the format says it should be."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "copy_reg":
            module = "copyreg"
        elif module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = _RestrictedUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as error:
        detail = " ".join(str(error).split())  # one line
        raise SourceFormatError(f"{path}: not a CIFAR-10 python pickle ({detail})") from None
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    # Python 3 pickles may use str keys; the distributed files use bytes keys
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 32, 32, 3) HWC, labels int64 (N,))`` of one ``cifar-10-batches-py``
    batch file; raises :class:`SourceFormatError` when it is not one."""
    path = Path(path)
    batch = _load_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise SourceFormatError(f"{path}: no 'data'/'labels' entries (keys: "
                                f"{', '.join(map(str, batch))})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        raise SourceFormatError(f"{path}: data is {data.dtype}{list(data.shape)}, expected "
                                f"uint8 [N, {3 * _SIDE * _SIDE}]")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype,
                                                                        np.integer):
        raise SourceFormatError(f"{path}: {len(labels)} labels of type {labels.dtype} for "
                                f"{len(data)} images")
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)  # CHW planes -> HWC
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar_classes(path: str | Path) -> tuple[str, ...]:
    meta = _load_pickle(Path(path))
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise SourceFormatError(f"{path}: no 'label_names' list")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def prepare_cifar10(source_dir: str | Path, out_dir: str | Path, *,
                    force: bool = False) -> PrepareResult:
    """Writes ``cifar-10-batches-py`` in ``source_dir`` as a shard dataset in ``out_dir``: train =
    ``data_batch_1..5`` in order, val = ``test_batch``, classes = ``batches.meta`` label names.

    A no-op when ``out_dir`` already holds the complete dataset (unless ``force``). Raises
    :class:`SourceMissingError` when files are missing, :class:`SourceFormatError` when one is not
    a CIFAR-10 pickle, and :class:`DatasetExistsError` when ``out_dir`` exists and is something
    else. Nothing is written on any of these errors.
    """
    start = time.perf_counter()
    source, out = Path(source_dir), Path(out_dir)
    if not source.is_dir():
        raise SourceMissingError(f"{source}: not a directory (expected the unpacked "
                                 "cifar-10-batches-py folder)")
    names = [*CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META]
    missing = [n for n in names if not (source / n).is_file()]
    if missing:
        raise SourceMissingError(f"CIFAR-10 files missing from {source}: {', '.join(missing)} "
                                 "(expected the unpacked cifar-10-python.tar.gz, folder "
                                 "cifar-10-batches-py)")
    classes = read_cifar_classes(source / CIFAR10_META)
    parts = [read_cifar_batch(source / n) for n in CIFAR10_TRAIN]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    val = read_cifar_batch(source / CIFAR10_TEST)
    for split, (_, labels) in (("train", train), ("val", val)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise SourceFormatError(f"{source}: {split} labels outside 0..{len(classes) - 1}")
    counts = {"train": len(train[1]), "val": len(val[1])}

    if out.exists() and not force:
        existing = _complete_dataset(out, CIFAR10_NAME, counts)
        if existing is not None:
            return PrepareResult(existing, created=False, seconds=time.perf_counter() - start)
        if not out.is_dir() or any(out.iterdir()):
            raise DatasetExistsError(
                f"{out} exists and is not a complete {CIFAR10_NAME} dataset; remove it, choose "
                "another directory, or pass --force to replace it")

    pixels = train[0].reshape(-1, 3)  # exact integer sums: no float copy of 150 M values
    count = max(len(pixels), 1)
    mean = pixels.sum(axis=0, dtype=np.int64) / count
    std = np.sqrt(np.maximum(np.einsum("ij,ij->j", pixels, pixels, dtype=np.int64) / count
                             - mean * mean, 0.0))
    meta = {
        "name": CIFAR10_NAME, "version": 1, "format": "binaryduo-shard",
        "classes": list(classes),
        "mean": [round(float(m) / 255.0, 6) for m in mean],
        "std": [round(float(s) / 255.0, 6) for s in std],
        "source": {"dir": str(source), "files": {n: (source / n).stat().st_size for n in names}},
    }

    def write(tmp: Path) -> None:
        splits = {"train": write_split(tmp, "train", *train), "val": write_split(tmp, "val", *val)}
        meta["splits"] = {s: {"count": i.count, "images": i.images, "labels": i.labels,
                              "shape": list(i.shape)} for s, i in splits.items()}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")

    try:
        _write_atomically(out, write, replace=force)
    except OSError as error:  # another process finished first
        existing = _complete_dataset(out, CIFAR10_NAME, counts)
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and existing is not None:
            return PrepareResult(existing, created=False, seconds=time.perf_counter() - start)
        raise
    return PrepareResult(read_manifest(out), created=True, seconds=time.perf_counter() - start)
