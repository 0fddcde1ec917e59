"""The data a compared run used: its dataset inputs' digests (``tracking/datasets.py`` logs them
with ``log_inputs``), and the mark on rows of one dataset and model whose runs used different
training or validation data -- such runs are not compared silently as if equal."""
from __future__ import annotations

from dataclasses import replace


def data_digests(run) -> dict[str, str]:
    """``{train_digest, val_digest}`` of a run's dataset inputs (context training / validation;
    empty for runs made before binaryduo logged them)."""
    found = {"train_digest": "", "val_digest": ""}
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    for item in inputs:
        context = {t.key: t.value for t in item.tags}.get("mlflow.data.context")
        key = {"training": "train_digest", "validation": "val_digest"}.get(context)
        if key is not None:
            found[key] = item.dataset.digest
    return found


def mark_different_data(rows: list) -> list:
    """Rows of one dataset and model whose runs used different data (train or val digest) are
    marked ``data_differs``; runs without recorded inputs are not compared."""
    seen: dict[tuple[str, str], set] = {}
    for row in rows:
        if row.source == "run" and (row.train_digest or row.val_digest):
            seen.setdefault((row.dataset, row.model), set()).add((row.train_digest,
                                                                   row.val_digest))
    return [replace(row, data_differs=True)
            if row.source == "run" and len(seen.get((row.dataset, row.model), ())) > 1
            and (row.train_digest or row.val_digest) else row for row in rows]


def data_notes(rows: list) -> list[str]:
    """One line per dataset and model whose runs used different data."""
    groups: dict[tuple[str, str], set] = {}
    for row in rows:
        if row.data_differs:
            groups.setdefault((row.dataset, row.model), set()).add(
                f"{row.train_digest[:8] or '?'}/{row.val_digest[:8] or '?'}")
    return [f"{dataset} {model}: runs used different data (train/val digests "
            f"{', '.join(sorted(digests))}, marked ≠ in the data column): their numbers are not "
            f"comparable as if equal" for (dataset, model), digests in groups.items()]
