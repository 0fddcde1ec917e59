"""``binaryduo compare``'s data column: the digests of each run's dataset inputs; runs of one
dataset and model on different data are marked (≠, ``data_differs``, a note), never compared
silently as if equal. The store is filled in process through the Tracker (no training)."""
from __future__ import annotations

import json

import pytest

from binaryduo.trainer.cli.main import main
from binaryduo.trainer.tracking.tracker import Tracker


def _dataset(split: str, digest: str) -> dict[str, str]:
    return {"name": f"fashion-mnist-{split}", "digest": digest, "source_type": "local",
            "source": json.dumps({"uri": "/data/fashion-mnist"}), "schema": None,
            "profile": json.dumps({"num_samples": 10}),
            "context": {"train": "training", "val": "validation"}[split]}


def _recipe_run(tracker: Tracker, recipe: str, train_digest: str | None, top1: float) -> None:
    parent = tracker.start_run(recipe, tags={"recipe": recipe, "smoke": "false",
                                             "world_size": "1"})
    tracker.log_params(parent, {"model.name": "vgg7", "data.prepare": "fashion-mnist"})
    stage = tracker.start_run("bnn", parent=parent, tags={"stage": "bnn", "variant": "bnn"})
    tracker.log_params(stage, {"stage_index": 0, "stage.epochs": 1})
    if train_digest is not None:
        inputs = [_dataset("train", train_digest), _dataset("val", "00000000aaaaaaaa")]
        tracker.log_inputs(parent, inputs)
        tracker.log_inputs(stage, inputs)
    tracker.log_metrics(stage, {"val_top1": top1, "val_top5": 90.0}, step=1)
    tracker.finish(stage)
    tracker.finish(parent)


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "binaryduo", enabled=True)
    return uri, tracker


def _compare(uri, capsys, *args):
    assert main(["compare", "--tracking-uri", uri, "--no-paper", *args]) == 0
    return capsys.readouterr()


def test_same_data_is_not_marked(store, capsys):
    uri, tracker = store
    _recipe_run(tracker, "fashion_a", "1111111111111111", 80.0)
    _recipe_run(tracker, "fashion_b", "1111111111111111", 81.0)
    out = _compare(uri, capsys, "--format", "json")
    rows = json.loads(out.out)
    assert [(r["recipe"], r["train_digest"], r["val_digest"], r["data_differs"]) for r in rows] \
        == [("fashion_a", "1111111111111111", "00000000aaaaaaaa", False),
            ("fashion_b", "1111111111111111", "00000000aaaaaaaa", False)]
    assert "different data" not in out.err


def test_different_data_is_marked_in_every_format(store, capsys):
    uri, tracker = store
    _recipe_run(tracker, "fashion_a", "1111111111111111", 80.0)
    _recipe_run(tracker, "fashion_b", "2222222222222222", 81.0)
    _recipe_run(tracker, "fashion_old", None, 79.0)  # made before inputs were logged: unknown
    rows = json.loads(_compare(uri, capsys, "--format", "json").out)
    assert {r["recipe"]: r["data_differs"] for r in rows} == {
        "fashion_a": True, "fashion_b": True, "fashion_old": False}
    out = _compare(uri, capsys)
    lines = [line for line in out.out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    data = header.index("data")
    cells = {row[-1]: row[data] for row in
             ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert cells == {"fashion_a": "11111111 ≠", "fashion_b": "22222222 ≠", "fashion_old": ""}
    assert ("binaryduo: note: Fashion-MNIST vgg7: runs used different data (train/val digests "
            "11111111/00000000, 22222222/00000000") in out.err
    csv_out = _compare(uri, capsys, "--format", "csv").out
    assert "train_digest,val_digest,data_differs" in csv_out.splitlines()[0]
