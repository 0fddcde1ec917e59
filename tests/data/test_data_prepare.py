"""Fashion-MNIST preparation: exact round trip, idempotence, atomicity, clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from binaryduo.data.prepare import (FASHION_MNIST_CLASSES, DatasetExistsError,
                                    SourceMissingError, prepare_fashion_mnist)
from binaryduo.data.shard import ShardError, read_manifest


def test_round_trip_equals_idx_files(fashion_mnist_root, fashion_mnist_source, helpers):
    manifest = read_manifest(fashion_mnist_root)
    assert manifest.counts == {"train": 60000, "val": 10000}
    assert manifest.classes == FASHION_MNIST_CLASSES
    assert manifest.classes[0] == "T-shirt/top" and manifest.classes[9] == "Ankle boot"
    for split, prefix in (("train", "train"), ("val", "t10k")):
        raw_images = helpers.read_idx_reference(fashion_mnist_source
                                                / f"{prefix}-images-idx3-ubyte.gz")
        raw_labels = helpers.read_idx_reference(fashion_mnist_source
                                                / f"{prefix}-labels-idx1-ubyte.gz")
        images, labels = manifest.load_split(split)
        assert images.dtype == np.uint8 and images.shape == (len(raw_labels), 28, 28, 1)
        assert labels.dtype == np.int64
        for k in (0, 1, 2, 4321, len(raw_labels) - 1):
            np.testing.assert_array_equal(images[k, :, :, 0], raw_images[k])
            assert labels[k] == raw_labels[k]
        np.testing.assert_array_equal(labels, raw_labels)
        assert np.bincount(labels).tolist() == [len(labels) // 10] * 10  # balanced
    # known values of the first training image: label 9 (Ankle boot), a non-empty picture
    assert manifest.load_split("train")[1][0] == 9
    assert manifest.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert manifest.std[0] == pytest.approx(0.3530, abs=1e-4)


def test_second_call_is_a_noop(fashion_mnist_root, fashion_mnist_source):
    before = {p.name: p.stat().st_mtime_ns for p in fashion_mnist_root.iterdir()}
    result = prepare_fashion_mnist(fashion_mnist_root, source_dir=fashion_mnist_source)
    assert result.created is False and "already complete" in result.format()
    assert {p.name: p.stat().st_mtime_ns for p in fashion_mnist_root.iterdir()} == before


def test_missing_source_names_the_debian_package(tmp_path):
    with pytest.raises(SourceMissingError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_something_else(tmp_path, fashion_mnist_source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DatasetExistsError, match="force"):
        prepare_fashion_mnist(out, source_dir=fashion_mnist_source)
    assert (out / "notes.txt").read_text() == "mine"


def test_incomplete_dataset_is_not_taken_for_complete(tmp_path, fashion_mnist_source,
                                                      fashion_mnist_root):
    out = tmp_path / "out"
    out.mkdir()
    # arrays without a manifest (what a non-atomic writer would leave) ...
    for name in ("train_images.npy", "train_labels.npy"):
        (out / name).write_bytes((fashion_mnist_root / name).read_bytes()[:1000])
    with pytest.raises(ShardError, match="manifest"):
        read_manifest(out)
    with pytest.raises(DatasetExistsError):
        prepare_fashion_mnist(out, source_dir=fashion_mnist_source)
    # ... and a manifest whose arrays disagree with it: both refused until --force
    manifest = json.loads((fashion_mnist_root / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="train"):
        read_manifest(out)
    result = prepare_fashion_mnist(out, source_dir=fashion_mnist_source, force=True)
    assert result.created and read_manifest(out).counts == {"train": 60000, "val": 10000}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old dirs left


KILLED_WRITER = """
import sys
from binaryduo.data.prepare import prepare_fashion_mnist
print("start", flush=True)
prepare_fashion_mnist(sys.argv[1], source_dir=sys.argv[2])
"""


def test_interrupted_prepare_never_leaves_a_dataset_that_looks_complete(
        tmp_path, fashion_mnist_source):
    out = tmp_path / "fm"
    outcomes = []
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out),
                                 str(fashion_mnist_source)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".fm.partial-*")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)  # wait until it is writing, then kill it part-way
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # only ever complete: it appears by a rename of a finished directory
            assert read_manifest(out).counts == {"train": 60000, "val": 10000}
            outcomes.append("complete")
            break
        outcomes.append("absent")
        partials = [p.name for p in tmp_path.iterdir()]
        assert all(name.startswith(".fm.partial-") for name in partials), partials
    assert outcomes[0] == "absent", outcomes  # killed while writing: nothing that looks done
    result = prepare_fashion_mnist(out, source_dir=fashion_mnist_source)
    assert read_manifest(out).counts == {"train": 60000, "val": 10000}
    assert result.created == ("complete" not in outcomes)
    # the partial directories of the killed (dead) writers were cleaned up
    assert [p.name for p in tmp_path.iterdir()] == ["fm"]


def test_stale_partial_of_a_dead_process_is_removed(tmp_path, fashion_mnist_source):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".fm.partial-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"half")
    alive = tmp_path / f".fm.partial-{os.getpid()}-cafecafe"  # ours: alive, must be kept
    alive.mkdir()
    prepare_fashion_mnist(tmp_path / "fm", source_dir=fashion_mnist_source)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fm", alive.name])
