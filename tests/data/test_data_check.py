"""check_dataset on real photos and the broken variants real ImageNet trees contain."""
from __future__ import annotations

import shutil
from pathlib import Path

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
        ("truncated", str(train_a / "photo.JPEG")),
        ("truncated", str(val_b / "cmyk.JPEG")),
        ("zero-byte", str(train_a / "empty.JPEG")),
        ("not-an-image", str(val_b / "notes.JPEG")),
        ("empty-class", str(root / "train" / "n03_empty")),
        ("unknown-class", str(root / "val" / "n99")),
    }
    assert "not an image" in next(p.detail for p in report.problems
                                  if p.path.endswith("notes.JPEG"))
    assert "truncated" in next(p.detail for p in report.problems
                               if p.path.endswith("photo.JPEG"))
    lines = report.format().splitlines()
    assert len(lines) == 7 and lines[-1].startswith(
        "6 problem(s) (4 unreadable file(s), 2 structural)")
    assert all(line.count("\n") == 0 for line in lines) and report.ignored == 1
    assert len(report.unreadable) == 4 and report.checked == 20 + 3
    # header checks alone still find zero-byte and non-image files, not the truncated ones
    header = {(p.kind, p.path) for p in check_dataset(root, depth="header").problems}
    assert ("zero-byte", str(train_a / "empty.JPEG")) in header
    assert ("not-an-image", str(val_b / "notes.JPEG")) in header
    assert not any(kind == "truncated" for kind, _ in header)
    # decoding every file finds the same problems
    full = check_dataset(root, depth="full")
    assert {(p.kind, p.path) for p in full.problems} == found


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
    assert problem.kind == "truncated" and problem.format().startswith(f"truncated: {bad}: ")


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


def test_quick_check_reads_the_ends_of_files(imagenet_photos, tmp_path):
    """Each fault of real datasets, and the valid cases next to it."""
    from PIL import Image
    data = imagenet_photos[0][0].read_bytes()
    cases = {
        "whole.JPEG": (data, None),
        "after_eoi.JPEG": (data + b"\0" * 7 + b"trailing bytes after the marker", None),
        "padded.JPEG": (data + b"\0" * 100, None),
        "no_eoi.JPEG": (data[:-2], "truncated"),             # only the final marker missing
        "half.JPEG": (data[:len(data) // 2], "truncated"),
        "html.JPEG": (b"<!DOCTYPE html><html>404</html>", "not-an-image"),
        "tiny.JPEG": (b"x", "not-an-image"),
        "zero.JPEG": (b"", "zero-byte"),
        "gif.JPEG": (b"GIF89a" + b"\0" * 40, "unsupported"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    with Image.open(imagenet_photos[0][0]) as image:
        rgb = image.convert("RGB").resize((64, 48))
    rgb.save(tmp_path / "png.JPEG", format="PNG")
    png = (tmp_path / "png.JPEG").read_bytes()
    (tmp_path / "png_half.JPEG").write_bytes(png[:len(png) // 2])
    rgb.save(tmp_path / "bmp.JPEG", format="BMP")
    bmp = (tmp_path / "bmp.JPEG").read_bytes()
    (tmp_path / "bmp_half.JPEG").write_bytes(bmp[:len(bmp) // 2])
    cases.update({"png.JPEG": (png, None), "png_half.JPEG": (None, "truncated"),
                  "bmp.JPEG": (bmp, None), "bmp_half.JPEG": (None, "truncated")})
    for name, (_, kind) in cases.items():
        problem = check_image(tmp_path / name)
        assert (problem.kind if problem else None) == kind, (name, problem)
        full = check_image(tmp_path / name, depth="full")
        assert (full.kind if full else None) == kind, (name, full)
    assert "DALI does not decode GIF" in check_image(tmp_path / "gif.JPEG").detail


def test_what_passes_decodes_in_dali(imagenet_photos, tmp_path):
    """The files the check accepts although their end is unusual decode through DALI too."""
    data = imagenet_photos[3][0].read_bytes()
    for split in ("train", "val"):
        folder = tmp_path / "tree" / split / "n01"
        folder.mkdir(parents=True)
        (folder / "after_eoi.JPEG").write_bytes(data + b"trailing bytes after the marker")
        (folder / "padded.JPEG").write_bytes(data + b"\0" * 100)
    assert check_dataset(tmp_path / "tree").ok
    loader = build_loader(LoaderSpec(tmp_path / "tree", batch_size=2), train=False)
    assert [int(b.valid.sum()) for b in loader] == [2]


def test_cache_remembers_good_files_only(imagenet_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(imagenet_tree, tree)
    cache = tmp_path / "cache"
    first = check_dataset(tree, cache_dir=cache, cache_min_files=0)
    assert first.ok and (first.checked, first.cached) == (59, 0)
    assert len(list((cache / "data-check").glob("*-quick.npy"))) == 1
    again = check_dataset(tree, cache_dir=cache, cache_min_files=0)
    assert again.ok and (again.checked, again.cached) == (0, 59)
    assert "59 known good from the cache" in again.summary()
    victim = sorted((tree / "train").rglob("*.JPEG"))[5]
    truncate(victim)                                      # changed: checked again, and reported
    broken = check_dataset(tree, cache_dir=cache, cache_min_files=0)
    assert [(p.kind, p.path) for p in broken.problems] == [("truncated", str(victim))]
    assert (broken.checked, broken.cached) == (1, 58)
    still = check_dataset(tree, cache_dir=cache, cache_min_files=0)   # problems never cached
    assert [p.path for p in still.problems] == [str(victim)] and still.checked == 1
    # other depths have their own cache; small datasets are not cached by default
    assert check_dataset(tree, depth="header", cache_dir=cache, cache_min_files=0).cached == 0
    assert check_dataset(tree, cache_dir=tmp_path / "other").cached == 0
    assert not (tmp_path / "other").exists()


def test_truncated_shard_array(tmp_path):
    root = tmp_path / "shard"
    root.mkdir()
    import json
    images = np.zeros((6, 8, 8, 1), np.uint8)
    splits = {s: write_split(root, s, images, np.arange(6) % 3) for s in ("train", "val")}
    (root / "manifest.json").write_text(json.dumps({
        "format": "binaryduo-shard", "version": 1, "name": "t", "classes": ["a", "b", "c"],
        "splits": {s: {"count": i.count, "images": i.images, "labels": i.labels,
                       "shape": list(i.shape)} for s, i in splits.items()},
        "mean": [0.5], "std": [0.5]}))
    assert check_dataset(root).ok
    data = (root / "train_images.npy").read_bytes()
    (root / "train_images.npy").write_bytes(data[:-10])
    report = check_dataset(root)
    assert [(p.kind, p.path) for p in report.problems] == [("shard",
                                                            str(root / "train_images.npy"))]
    assert report.problems[0].detail == (f"train array: truncated: {len(data) - 10} bytes, its "
                                         f"header promises {len(data)}")
    assert report.structural == report.problems and report.unreadable == []


def test_loader_exclude_leaves_files_out_on_every_rank(imagenet_tree):
    files = build_loader(LoaderSpec(imagenet_tree, batch_size=2), train=True).files
    gone = {files[0], files[7]}
    relative = {str(Path(f).relative_to(imagenet_tree)) for f in gone}
    loaders = [build_loader(LoaderSpec(imagenet_tree, batch_size=2, exclude=relative), train=True,
                            rank=r, world_size=2) for r in range(2)]
    for loader in loaders:
        assert loader.num_samples == len(files) - 2 and loader.excluded == 2
        assert not gone & set(loader.files)
    assert len(loaders[0]) == len(loaders[1]) == (len(files) - 2) // 2 // 2
    seen = np.concatenate([loader.epoch_indices(0)[0] for loader in loaders])
    assert len(set(seen)) == len(seen)                  # disjoint, equal shards
    # absolute paths work as well; val is untouched by train files
    spec = LoaderSpec(imagenet_tree, batch_size=2, exclude=gone)
    assert build_loader(spec, train=True).excluded == 2
    assert build_loader(spec, train=False).excluded == 0
    with pytest.raises(ValueError, match="every train image is excluded"):
        build_loader(LoaderSpec(imagenet_tree, batch_size=2, exclude=files), train=True)
