"""check_dataset on real photos and the broken variants real ImageNet trees contain."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from binaryduo.data.check import check_dataset, check_image
from binaryduo.data.pipelines import LoaderSpec, build_loader
from binaryduo.data.shard import write_split


@pytest.fixture
def odd_but_valid_tree(tmp_path, imagenet_photos, helpers):
    """Two classes of real photos plus grey, CMYK and PNG-named-.JPEG variants in each split."""
    root = tmp_path / "tree"
    for split in ("train", "val"):
        for k, cls in enumerate(("n01", "n02")):
            helpers.make_variants(imagenet_photos[k][0], root / split / cls)
            shutil.copyfile(imagenet_photos[k + 2][0], root / split / cls / "photo.JPEG")
    return root


def test_odd_but_valid_images_pass_and_decode_in_dali(odd_but_valid_tree):
    report = check_dataset(odd_but_valid_tree)
    assert report.ok, report.format()
    assert report.images == {"train": 10, "val": 10} and report.classes == 2
    assert report.format().splitlines() == [report.summary()]
    assert report.summary().startswith("OK: ")
    # what the check calls valid, the DALI pipeline decodes (CMYK, grey, PNG named .JPEG)
    loader = build_loader(LoaderSpec(odd_but_valid_tree, batch_size=5), train=False)
    assert sum(int(b.valid.sum()) for b in loader) == 10


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_every_problem_is_reported_once(odd_but_valid_tree):
    root = odd_but_valid_tree
    train_a, val_b = root / "train" / "n01", root / "val" / "n02"
    truncate(train_a / "photo.JPEG")                        # truncated progressive JPEG
    truncate(val_b / "cmyk.JPEG", keep=0.3)                 # truncated CMYK baseline JPEG
    (train_a / "empty.JPEG").write_bytes(b"")               # zero bytes
    (val_b / "notes.JPEG").write_text("not an image\n")     # text with an image name
    (train_a / "README.txt").write_text("ignored: no image extension")
    (root / "train" / "n03_empty").mkdir()                  # empty class folder
    (root / "val" / "n99").mkdir()                          # val class unknown to train
    shutil.copyfile(root / "val" / "n02" / "rgb.JPEG", root / "val" / "n99" / "x.JPEG")

    report = check_dataset(root)
    found = {(p.kind, p.path) for p in report.problems}
    assert found == {
        ("undecodable", str(train_a / "photo.JPEG")),
        ("undecodable", str(val_b / "cmyk.JPEG")),
        ("zero-byte", str(train_a / "empty.JPEG")),
        ("undecodable", str(val_b / "notes.JPEG")),
        ("empty-class", str(root / "train" / "n03_empty")),
        ("unknown-class", str(root / "val" / "n99")),
    }
    assert "not an image" in next(p.detail for p in report.problems
                                  if p.path.endswith("notes.JPEG"))
    assert "truncated" in next(p.detail for p in report.problems
                               if p.path.endswith("photo.JPEG"))
    lines = report.format().splitlines()
    assert len(lines) == 7 and lines[-1].startswith("6 problem(s)")
    assert all(line.count("\n") == 0 for line in lines) and report.ignored == 1
    # without decoding, header checks still find zero-byte and non-image files
    quick = {(p.kind, p.path) for p in check_dataset(root, decode=False).problems}
    assert ("zero-byte", str(train_a / "empty.JPEG")) in quick
    assert ("undecodable", str(val_b / "notes.JPEG")) in quick


def test_missing_split_and_no_classes(tmp_path, imagenet_photos):
    root = tmp_path / "tree"
    (root / "train" / "n01").mkdir(parents=True)
    shutil.copyfile(imagenet_photos[0][0], root / "train" / "n01" / "a.JPEG")
    report = check_dataset(root)
    assert [(p.kind, p.path) for p in report.problems] == [("missing-split", str(root / "val"))]
    (root / "val").mkdir()
    report = check_dataset(root)
    assert [(p.kind, p.path) for p in report.problems] == [("no-classes", str(root / "val"))]
    with pytest.raises(NotADirectoryError):
        check_dataset(root / "train" / "n01" / "a.JPEG")


def test_check_image_on_single_files(imagenet_photos, tmp_path):
    assert check_image(imagenet_photos[0][0]) is None
    bad = tmp_path / "x.jpg"
    bad.write_bytes(imagenet_photos[0][0].read_bytes()[:2000])
    problem = check_image(bad)
    assert problem.kind == "undecodable" and problem.format().startswith(f"undecodable: {bad}: ")


def test_shard_checks(fashion_mnist_root, tmp_path):
    assert check_dataset(fashion_mnist_root).ok
    # a small shard whose labels exceed its class list
    import json
    root = tmp_path / "shard"
    root.mkdir()
    images = np.zeros((4, 8, 8, 1), np.uint8)
    splits = {s: write_split(root, s, images, np.array([0, 1, 2, 3])) for s in ("train", "val")}
    manifest = json.loads((fashion_mnist_root / "manifest.json").read_text())
    manifest.update(classes=["a", "b", "c"],
                    splits={s: {"count": i.count, "images": i.images, "labels": i.labels,
                                "shape": list(i.shape)} for s, i in splits.items()})
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = check_dataset(root)
    assert [p.kind for p in report.problems] == ["shard", "shard"]
    assert "outside 0..2" in report.problems[0].detail
    (root / "val_images.npy").write_bytes(b"garbage")
    assert any("val" in p.detail for p in check_dataset(root).problems)


def test_filelist_checks(imagenet_photos, tmp_path):
    root = tmp_path / "list"
    root.mkdir()
    shutil.copyfile(imagenet_photos[0][0], root / "a.jpg")
    (root / "train.txt").write_text("a.jpg 0\nmissing.jpg 1\n")
    (root / "val.txt").write_text("a.jpg 0\nbroken line\n")
    report = check_dataset(root)
    assert report.layout == "filelist"
    assert [(p.kind, p.path) for p in report.problems] == [
        ("missing-file", str(root / "missing.jpg")), ("bad-list", str(root / "val.txt"))]
