"""Preparation of the paper's datasets from real images: CIFAR-10 pickles -> shard (pixel-exact),
the flat ILSVRC2012 validation folder -> wnid class folders (standard indices), pre-resized copies.
The sources are written at test time in the real formats from the foolbox wheel's real photos."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from binaryduo.data.cifar import SourceFormatError, prepare_cifar10, read_cifar_batch
from binaryduo.data.imagenet import (PrepareInputError, devkit_synsets, prepare_imagenet_val,
                                     prepare_resized, read_ground_truth, standard_synsets)
from binaryduo.data.layout import list_imagefolder
from binaryduo.data.shard import read_manifest

BIN = Path(sys.executable).with_name("binaryduo")
PER_BATCH = 8  # tests/conftest.py CIFAR_PER_BATCH


def run_cli(*args, cwd):
    """The installed command in a real process."""
    return subprocess.run([str(BIN), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def cli(capsys, monkeypatch):
    """The same command in-process (``cli.main``): exit status, stdout, stderr; ~2 s cheaper per
    call than a process (torch import), for the many bad-input cases."""
    from binaryduo.trainer.cli.main import main

    def call(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as done:  # argparse's own usage errors
            code = done.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


def tree_listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# ------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_round_trip_is_pixel_exact(cifar10_shard, cifar10_photos):
    manifest = read_manifest(cifar10_shard)
    assert manifest.name == "cifar10"
    assert manifest.classes[:3] == ("airplane", "automobile", "bird")
    assert manifest.counts == {"train": 5 * PER_BATCH, "val": 20}
    photos = np.stack([p[0] for p in cifar10_photos])
    labels = np.array([p[1] for p in cifar10_photos])
    val_images, val_labels = manifest.load_split("val")
    assert val_images.shape == (20, 32, 32, 3) and val_images.dtype == np.uint8
    np.testing.assert_array_equal(val_images, photos)       # decoded PNG == shard, every pixel
    np.testing.assert_array_equal(val_labels, labels)
    train_images, train_labels = manifest.load_split("train")
    cycle = np.arange(5 * PER_BATCH) % 20                  # data_batch_1..5 in order
    np.testing.assert_array_equal(train_images, photos[cycle])
    np.testing.assert_array_equal(train_labels, labels[cycle])
    # the per-channel statistics of the training pixels, computed independently
    pixels = photos[cycle].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(manifest.mean, pixels.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(manifest.std, pixels.std(axis=0), atol=1e-6)
    assert len(set(np.round(manifest.mean, 3))) == 3         # three distinct channels


def test_cifar10_planes_are_red_green_blue(cifar10_batches, cifar10_photos):
    """The batch layout is R plane, G plane, B plane: a channel swap would be caught here."""
    with open(cifar10_batches / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")[b"data"]
    first = cifar10_photos[0][0]
    assert raw[0, :1024].tolist() == first[:, :, 0].ravel().tolist()
    assert raw[0, 2048:].tolist() == first[:, :, 2].ravel().tolist()
    images, _ = read_cifar_batch(cifar10_batches / "test_batch")
    np.testing.assert_array_equal(images[0], first)
    assert not np.array_equal(first[:, :, 0], first[:, :, 2])


def test_cifar10_through_the_pipeline(cifar10_shard, cifar10_photos):
    """The val preset of the DALI pipeline hands out exactly (pixel/255 - mean)/std."""
    from binaryduo.data.pipelines import LoaderSpec, build_loader
    spec = LoaderSpec(cifar10_shard, format="shard", preset="small", batch_size=7)
    loader = build_loader(spec, train=False, device="cpu")
    mean = np.array(read_manifest(cifar10_shard).mean)[:, None, None]
    std = np.array(read_manifest(cifar10_shard).std)[:, None, None]
    images = np.concatenate([b.images.numpy() for b in loader])
    labels = np.concatenate([b.labels.numpy() for b in loader])
    photos = np.stack([p[0] for p in cifar10_photos]).transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(images, (photos - mean) / std, atol=1e-5)
    assert labels.tolist() == [p[1] for p in cifar10_photos]


def test_cifar10_second_call_is_a_noop(cifar10_batches, tmp_path):
    out = tmp_path / "c10"
    assert prepare_cifar10(cifar10_batches, out).created
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_cifar10(cifar10_batches, out)
    assert again.created is False and "already complete" in again.format()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_cifar10_refuses_a_pickle_that_runs_code(cifar10_batches, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(cifar10_batches, source)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(source / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": Exploit(), b"labels": []}, handle, protocol=2)
    with pytest.raises(SourceFormatError, match="refusing to load"):
        prepare_cifar10(source, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing from"),
    ("not-a-pickle", "not a CIFAR-10 python pickle"),
    ("wrong-width", r"expected uint8 \[N, 3072\]"),
    ("label-count", "labels of type"),
    ("label-range", r"labels outside 0\.\.9"),
])
def test_cifar10_bad_input_cli(cifar10_batches, tmp_path, damage, message, cli):
    source = tmp_path / "src"
    shutil.copytree(cifar10_batches, source)
    batch = source / "data_batch_2"
    record = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    if damage == "missing":
        batch.unlink()
    elif damage == "not-a-pickle":
        batch.write_bytes(b"\x89PNG\r\n\x1a\nnot a pickle")
    else:
        if damage == "wrong-width":
            record[b"data"] = np.zeros((4, 1024), np.uint8)
        elif damage == "label-count":
            record[b"labels"] = [0, 1]
        else:
            record[b"labels"] = [0, 1, 2, 10]
        batch.write_bytes(pickle.dumps(record, protocol=2))
    result = cli("data", "prepare", "cifar10", "--from", source, tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial dirs


def test_cifar10_cli_writes_and_refuses_to_overwrite(cifar10_batches, tmp_path):
    out = tmp_path / "out"
    done = run_cli("data", "prepare", "cifar10", "--from", cifar10_batches, out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "cifar10: 40 train, 20 val images, 10 classes" in done.stdout
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    refused = run_cli("data", "prepare", "cifar10", "--from", cifar10_batches, other,
                      cwd=tmp_path)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


# ------------------------------------------------------------------------- ImageNet validation


def test_imagenet_val_from_official_ids(imagenet_val_source, imagenet_wnids, tmp_path):
    flat, truth, meta, expected = imagenet_val_source
    before = tree_listing(flat)
    result = prepare_imagenet_val(flat, truth, tmp_path / "val", synsets=meta)
    assert result.created and result.images == 20 and result.classes == 19
    assert result.ground_truth_lines == 22 and "2 of them are not in the source" in result.format()
    placed = {p.name: p.parent.name for p in (tmp_path / "val").rglob("*.JPEG")}
    assert placed == {name: imagenet_wnids[cls] for name, cls in expected.items()}
    # hard links: the same inode; the user's files are where they were, unchanged
    for name, wnid in placed.items():
        assert os.path.samefile(tmp_path / "val" / wnid / name, flat / name)
    assert tree_listing(flat) == before
    # the IDs are a permutation: taking them as indices would have put images elsewhere
    ids = [int(line) for line in truth.read_text().split()][:20]
    names = sorted(expected)
    assert sum(imagenet_wnids[i - 1] == placed[n] for i, n in zip(ids, names)) < 3


def test_imagenet_val_class_indices_are_the_standard_ones(imagenet_smoke_tree,
                                                          imagenet_val_source):
    """With the 1000 wnid folders of train/, the pipeline's label of every validation photo is its
    true ImageNet class index (from the foolbox file name)."""
    _, _, _, expected = imagenet_val_source
    listing = list_imagefolder(imagenet_smoke_tree, "val")
    assert len(listing.classes) == 1000 and listing.classes[0] == "n01440764"
    got = {Path(f).name: int(label) for f, label in zip(listing.files, listing.labels)}
    assert got == expected
    from binaryduo.data.pipelines import LoaderSpec, build_loader
    loader = build_loader(LoaderSpec(imagenet_smoke_tree, preset="imagenet", batch_size=8),
                          train=False, device="cpu")
    labels = [int(x) for b in loader for x in b.labels]
    assert labels == [expected[Path(f).name] for f in loader.files]


def test_imagenet_val_other_label_forms(imagenet_val_source, imagenet_wnids, tmp_path):
    flat, truth, meta, expected = imagenet_val_source
    by_id = devkit_synsets(meta)
    ids = [int(x) for x in truth.read_text().split()]
    wnid_truth = tmp_path / "wnids.txt"       # TF's imagenet_2012_validation_synset_labels.txt
    wnid_truth.write_text("\n".join(by_id[i - 1] for i in ids) + "\n")
    index_truth = tmp_path / "index.txt"      # 0-based standard indices
    index_truth.write_text("\n".join(str(imagenet_wnids.index(by_id[i - 1])) for i in ids))
    id_order = tmp_path / "synsets_in_id_order.txt"
    id_order.write_text("\n".join(by_id) + "\n")
    want = {name: imagenet_wnids[cls] for name, cls in expected.items()}
    for out, kwargs in (("wnid", dict(ground_truth=wnid_truth)),
                        ("index", dict(ground_truth=index_truth, labels="index")),
                        ("idtext", dict(ground_truth=truth, synsets=id_order)),
                        ("copy", dict(ground_truth=truth, synsets=meta, copy=True))):
        prepare_imagenet_val(flat, out_dir=tmp_path / out, **kwargs)
        placed = {p.name: p.parent.name for p in (tmp_path / out).rglob("*.JPEG")}
        assert placed == want, out
    copied = tmp_path / "copy" / want[sorted(want)[0]] / sorted(want)[0]
    assert not os.path.samefile(copied, flat / sorted(want)[0])
    assert copied.read_bytes() == (flat / sorted(want)[0]).read_bytes()
    assert standard_synsets() == imagenet_wnids  # the default of --labels index


def test_imagenet_val_is_idempotent(imagenet_val_source, tmp_path):
    flat, truth, meta, _ = imagenet_val_source
    prepare_imagenet_val(flat, truth, tmp_path / "val", synsets=meta)
    again = prepare_imagenet_val(flat, truth, tmp_path / "val", synsets=meta)
    assert again.created is False and "already complete" in again.format()


@pytest.mark.parametrize("case, message", [
    ("ids-without-synsets", "devkit's synset order"),
    ("id-out-of-range", r"ilsvrc2012-id 1001 outside 1\.\.1000"),
    ("not-an-integer", "is not an integer"),
    ("unsorted-synsets-for-index", "not in sorted"),
    ("stranger-file", "not named ILSVRC2012_val_"),
    ("short-ground-truth", "has no line in"),
    ("missing-ground-truth", "no such ground-truth file"),
    ("bad-meta", "not an ILSVRC2012 devkit meta.mat"),
    ("existing-out", "--force"),
    ("no-ground-truth-option", "the following arguments are required: --ground-truth"),
])
def test_imagenet_val_bad_input_cli(imagenet_val_source, tmp_path, case, message, cli):
    flat, truth, meta, _ = imagenet_val_source
    args = ["--from", flat, "--ground-truth", truth, "--synsets", meta]
    out = tmp_path / "val"
    if case == "ids-without-synsets":
        args = args[:4]
    elif case in ("id-out-of-range", "not-an-integer", "short-ground-truth"):
        bad = tmp_path / "truth.txt"
        lines = truth.read_text().split()
        if case == "id-out-of-range":
            lines[3] = "1001"
        elif case == "not-an-integer":
            lines[3] = "n0144O764"
        else:
            lines = lines[:5]
        bad.write_text("\n".join(lines))
        args[3] = bad
    elif case == "unsorted-synsets-for-index":
        synsets = tmp_path / "synsets.txt"
        synsets.write_text("\n".join(devkit_synsets(meta)))
        args = ["--from", flat, "--ground-truth", truth, "--labels", "index", "--synsets",
                synsets]
    elif case == "stranger-file":
        source = tmp_path / "flat"
        shutil.copytree(flat, source)
        shutil.copyfile(source / "ILSVRC2012_val_00000001.JPEG", source / "holiday.jpg")
        args[1] = source
    elif case == "missing-ground-truth":
        args[3] = tmp_path / "nowhere.txt"
    elif case == "bad-meta":
        args[5] = tmp_path / "meta.mat"
        args[5].write_bytes(b"MATLAB 5.0 MAT-file, but not really")
    elif case == "existing-out":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "no-ground-truth-option":
        args = args[:2]
    result = cli("data", "prepare", "imagenet-val", *args, out, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: ")
    assert re.search(message, lines[0]), lines[0]
    if case == "existing-out":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_read_ground_truth_auto_detects_wnids(tmp_path, imagenet_wnids):
    path = tmp_path / "t.txt"
    path.write_text(f"{imagenet_wnids[65]}\n{imagenet_wnids[0]}\n\n")
    assert read_ground_truth(path) == [imagenet_wnids[65], imagenet_wnids[0]]
    path.write_text("65\n0\n")
    assert read_ground_truth(path, "index") == [imagenet_wnids[65], imagenet_wnids[0]]
    with pytest.raises(PrepareInputError, match="devkit"):
        read_ground_truth(path)  # integers default to ILSVRC2012_IDs, which need the devkit


# --------------------------------------------------------------------------- pre-resized copies


@pytest.fixture(scope="module")
def odd_tree(imagenet_photos, tmp_path_factory) -> Path:
    """train/ and val/ with real photos (512x512 and one 1024x683), grey, CMYK, a PNG named .JPEG,
    a small image, a truncated JPEG and a non-image file."""
    from PIL import Image
    root = tmp_path_factory.mktemp("odd") / "tree"
    for split in ("train", "val"):
        for k in range(3):
            (root / split / f"c{k}").mkdir(parents=True)
    for k, (path, _) in enumerate(imagenet_photos[:6]):
        shutil.copyfile(path, root / ("train" if k < 3 else "val") / f"c{k % 3}" / f"p{k}.JPEG")
    big = next(p for p, _ in imagenet_photos if Image.open(p).size != (512, 512))
    shutil.copyfile(big, root / "train" / "c0" / "big.JPEG")
    with Image.open(imagenet_photos[0][0]) as image:
        rgb = image.convert("RGB")
    rgb.convert("L").save(root / "train" / "c1" / "gray.JPEG", quality=90)
    rgb.convert("CMYK").save(root / "train" / "c1" / "cmyk.JPEG", quality=90)
    rgb.save(root / "train" / "c2" / "png.JPEG", format="PNG")
    rgb.save(root / "train" / "c2" / "real.png", format="PNG")
    rgb.resize((200, 150)).save(root / "train" / "c2" / "small.JPEG", quality=90)
    data = imagenet_photos[1][0].read_bytes()
    (root / "train" / "c2" / "truncated.JPEG").write_bytes(data[:len(data) // 2])
    (root / "train" / "c0" / "README.txt").write_text("not an image")
    return root


def test_resized_copy(odd_tree, tmp_path):
    from PIL import Image
    before = tree_listing(odd_tree)
    out = tmp_path / "r160"
    result = prepare_resized(odd_tree, out, shorter_side=160, workers=2)
    assert (result.resized, result.kept, result.undecodable, result.other) == (11, 1, 1, 1)
    assert tree_listing(odd_tree) == before                       # the source is untouched
    assert sorted(tree_listing(out)) == sorted(before)            # same relative paths
    for path in [*out.rglob("*.JPEG"), *out.rglob("*.png")]:
        with Image.open(path) as image:
            source = Image.open(odd_tree / path.relative_to(out))
            if path.name == "truncated.JPEG" or path.name == "small.JPEG":
                assert path.read_bytes() == (odd_tree / path.relative_to(out)).read_bytes()
                continue
            assert min(image.size) == 160, path
            w, h = source.size
            assert abs(image.size[0] / image.size[1] - w / h) < 0.01  # aspect ratio kept
            assert image.mode == ("L" if path.name == "gray.JPEG" else "RGB")
            # the format follows the name: a PNG named .JPEG becomes a real JPEG
            assert image.format == ("PNG" if path.suffix == ".png" else "JPEG")
            image.load()
    assert (out / "train" / "c0" / "README.txt").read_text() == "not an image"
    # the same picture: close to a plain box-filter resize of it, far from another photo's
    def box(path, size):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BOX), float)
    with Image.open(out / "train" / "c0" / "p0.JPEG") as small:
        pixels = np.asarray(small, dtype=np.float64)
    assert np.abs(box(odd_tree / "train" / "c0" / "p0.JPEG", (160, 160)) - pixels).mean() < 8
    assert np.abs(box(odd_tree / "train" / "c1" / "p1.JPEG", (160, 160)) - pixels).mean() > 30
    assert result.bytes_out < result.bytes_in / 3
    from binaryduo.data.check import check_dataset
    report = check_dataset(out)
    assert [p.kind for p in report.problems] == ["truncated"]     # the truncated file, kept
    again = prepare_resized(odd_tree, out, shorter_side=160)
    assert again.created is False


@pytest.mark.parametrize("case, message", [
    ("not-a-dataset", "not an ImageFolder or file-list dataset"),
    ("shard", "numpy shard"),
    ("tiny-side", "must be >= 16"),
    ("missing", "not a directory"),
    ("inside", "lies inside"),
])
def test_resized_bad_input_cli(odd_tree, cifar10_shard, tmp_path, case, message, cli):
    source, out, side = odd_tree, tmp_path / "out", "160"
    if case == "not-a-dataset":
        source = tmp_path / "plain"
        source.mkdir()
        (source / "a.jpg").write_bytes(b"")
    elif case == "shard":
        source = cifar10_shard
    elif case == "tiny-side":
        side = "8"
    elif case == "missing":
        source = tmp_path / "nowhere"
    elif case == "inside":
        source = tmp_path / "tree"
        shutil.copytree(odd_tree, source)
        out = source / "resized"
    result = cli("data", "prepare", "resized", source, out, "--shorter-side", side, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: ") and message in lines[0]
    assert not out.exists()


def test_marker_files_are_invisible_to_the_layout(imagenet_smoke_tree):
    assert (imagenet_smoke_tree / "val" / ".binaryduo-imagenet-val.json").is_file()
    record = json.loads((imagenet_smoke_tree / "val" / ".binaryduo-imagenet-val.json").read_text())
    assert record["images"] == 20 and record["mode"] == "copy"
    listing = list_imagefolder(imagenet_smoke_tree, "val")
    assert not any(".binaryduo" in f for f in listing.files)
