"""The training and validation data of a run as MLflow dataset inputs (the UI's Dataset column).

One :class:`SplitDataset` per split: name ``<dataset>-<split>``, a digest, the dataset directory
as a local source, the per-image tensor schema and a profile (samples used, samples in the split,
classes, files left out). The digest changes when the data changes and costs no image read:

- ``shard``: ``manifest.json``'s bytes and the name, size and mtime of the split's two arrays;
- ``imagefolder`` / ``filelist``: every listed file's relative path, label, size and mtime (one
  ``stat`` per file: the pre-flight ``data check`` walks the same files anyway), and for a file
  list the list file itself;

and, beside the data itself, what the run took of it: ``data.train_subset`` / ``val_subset``
(``--smoke``'s subset included) and the unreadable files ``data.skip_unreadable`` left out. Two runs
with equal digests saw the same images.

:func:`describe_datasets` returns the journal's form of them (plain strings: the fields of an
``mlflow.entities.Dataset`` plus the input's context, ``training`` / ``validation``); the
tracker logs them with ``log_inputs`` (``delivery.py``), which the store deduplicates by name and
digest, so a replay or a resume adds no second input.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from binaryduo.data.layout import detect_format, list_split
from binaryduo.data.shard import MANIFEST, read_manifest

CONTEXT_TAG = "mlflow.data.context"
CONTEXTS = {"train": "training", "val": "validation"}
DIGEST_CHARS = 16


def _hash(*parts: Any) -> "hashlib.blake2b":
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode("utf-8",
                                                                            "surrogateescape"))
        digest.update(b"\0")
    return digest


def _stat_line(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def split_fingerprint(root: Path, fmt: str, split: str,
                      exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``{digest, samples (in the split), classes, shape}`` of one split, from metadata only."""
    if fmt == "shard":
        manifest = read_manifest(root, verify=False)
        info = manifest.splits[split]
        digest = _hash("shard", (root / MANIFEST).read_bytes(), split,
                       info.images, _stat_line(root / info.images),
                       info.labels, _stat_line(root / info.labels))
        return {"digest": digest.hexdigest(), "samples": info.count,
                "classes": len(manifest.classes), "shape": list(info.shape),
                "dtype": "uint8"}
    listing = list_split(root, split, fmt)
    digest = _hash(fmt, split)
    if fmt == "filelist":
        digest.update((root / f"{split}.txt").read_bytes())
    kept = 0
    for path, label in zip(listing.files, listing.labels.tolist()):
        relative = os.path.relpath(path, root)
        if relative in exclude:
            continue
        kept += 1
        digest.update(f"{relative}\0{label}\0{_stat_line(Path(path))}\n"
                      .encode("utf-8", "surrogateescape"))
    return {"digest": digest.hexdigest(), "samples": kept, "classes": len(listing.classes),
            "shape": None, "dtype": "encoded image files"}


def _dataset_class():
    """:class:`mlflow.data.dataset.Dataset` subclass (imported late: mlflow is slow to import)."""
    from mlflow.data.dataset import Dataset

    class SplitDataset(Dataset):
        """One split of a binaryduo dataset directory, described without reading images."""

        def __init__(self, source, name: str, digest: str, profile: dict, schema):
            self._profile, self._schema = profile, schema
            super().__init__(source=source, name=name, digest=digest)

        def _compute_digest(self) -> str:  # always given
            return self._digest

        @property
        def profile(self):
            return self._profile

        @property
        def schema(self):
            return self._schema

        def to_dict(self) -> dict[str, str]:
            base = super().to_dict()
            base["profile"] = json.dumps(self._profile)
            if self._schema is not None:
                base["schema"] = json.dumps(self._schema.to_dict())
            return base

    return SplitDataset


def describe_datasets(root: str | Path, fmt: str = "auto", *,
                      subsets: dict[str, int | None] | None = None,
                      exclude: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The journal records (``mlflow.entities.Dataset`` fields + ``context``) of the train and
    val splits of ``root`` as a run uses them: ``subsets`` (per split, None = all) and
    ``exclude`` (relative paths left out) are part of the digest."""
    import numpy as np
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    root = Path(root).resolve()
    fmt = detect_format(root) if fmt == "auto" else fmt
    subsets = subsets or {}
    name = _dataset_name(root, fmt)
    split_dataset = _dataset_class()
    records = []
    for split in ("train", "val"):
        found = split_fingerprint(root, fmt, split, frozenset(exclude))
        subset = subsets.get(split)
        used = min(subset, found["samples"]) if subset else found["samples"]
        digest = _hash(found["digest"], subset or "all", *sorted(exclude)).hexdigest()
        profile = {"num_samples": used, "split_samples": found["samples"],
                   "num_classes": found["classes"], "format": fmt, "split": split,
                   "subset": subset, "left_out_unreadable": len(exclude)}
        schema = None
        if found["shape"] is not None:
            schema = TensorDatasetSchema(
                features=Schema([TensorSpec(np.dtype(np.uint8), (-1, *found["shape"]), "image")]),
                targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]))
        source = get_dataset_source_from_json(json.dumps({"uri": str(root)}), "local")
        dataset = split_dataset(source, f"{name}-{split}",
                                digest[:DIGEST_CHARS], profile, schema)
        entity = dataset._to_mlflow_entity()
        records.append({"name": entity.name, "digest": entity.digest,
                        "source_type": entity.source_type, "source": entity.source,
                        "schema": entity.schema, "profile": entity.profile,
                        "context": CONTEXTS[split]})
    return records


def _dataset_name(root: Path, fmt: str) -> str:
    if fmt == "shard":
        try:
            return read_manifest(root, verify=False).name
        except ValueError:
            pass
    return root.name or str(root)


def dataset_input(record: dict[str, str]):
    """The ``mlflow.entities.DatasetInput`` of a journal record."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=record["name"], digest=record["digest"],
                      source_type=record["source_type"], source=record["source"],
                      schema=record.get("schema"), profile=record.get("profile"))
    return DatasetInput(dataset=dataset, tags=[InputTag(CONTEXT_TAG, record["context"])])
