"""Dataset faults (issue 5): truncated JPEG, zero-byte file, text named .JPEG, an empty class folder,
a missing split, a truncated shard array -- next to the valid oddities real ImageNet holds (a PNG,
a grey and a CMYK JPEG named .JPEG), in trees built at test time from the real ImageNet photos of
the foolbox wheel.

``binaryduo data check`` lists every fault with its reason and exits 1. ``binaryduo train`` on the
shipped ImageNet recipe (``recipes/imagenet/resnet18_bnn.yaml``, cut to the tiny tree as the smoke
tests do) refuses before it starts: exit 2, the unreadable files named on one line, no run
directory, no MLflow store. With ``data.skip_unreadable=true`` it trains without them -- and with
the PNG/grey/CMYK files, which DALI decodes -- and the parent MLflow run records the count.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "imagenet" / "resnet18_bnn.yaml"
# as tests/trainer/conftest.py SMOKE_DATA cuts the ImageNet recipes to the tiny trees
SMOKE_SETS = ("--set", "data.batch_size=4", "--set", "data.num_threads=2")
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 1


def _build_tree(root: Path, photos: list[tuple[Path, int]], *, faults: bool, val: bool = True):
    """``train/``: 8 readable images in 2 classes (4 real photos; a real photo with its grey,
    CMYK and PNG-named-.JPEG variants) -- exactly what --smoke's 2 steps of 4 use, so all of them
    are decoded; ``val/``: 4 real photos. ``faults`` adds the broken files and an empty class."""
    from PIL import Image

    odd, plain = root / "train" / "n00000001", root / "train" / "n00000002"
    odd.mkdir(parents=True)
    plain.mkdir(parents=True)
    shutil.copyfile(photos[0][0], odd / "rgb.JPEG")
    with Image.open(photos[0][0]) as image:
        rgb = image.convert("RGB")
    rgb.convert("L").save(odd / "gray.JPEG", format="JPEG", quality=90)
    rgb.convert("CMYK").save(odd / "cmyk.JPEG", format="JPEG", quality=90)
    rgb.save(odd / "png_named.JPEG", format="PNG")
    for k in range(4):
        shutil.copyfile(photos[1 + k][0], plain / f"p{k}.JPEG")
    if val:
        for k, cls in enumerate(("n00000001", "n00000001", "n00000002", "n00000002")):
            (root / "val" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photos[5 + k][0], root / "val" / cls / f"v{k}.JPEG")
    bad = {}
    if faults:
        data = photos[9][0].read_bytes()
        bad["truncated"] = plain / "truncated.JPEG"
        bad["truncated"].write_bytes(data[:len(data) // 2])        # cut at half its bytes
        bad["zero-byte"] = odd / "empty.JPEG"
        bad["zero-byte"].write_bytes(b"")
        bad["not-an-image"] = plain / "notes.JPEG"
        bad["not-an-image"].write_text("<html><body>404 Not Found</body></html>\n")
        (root / "train" / "n00000003").mkdir()                     # an empty class folder
    return bad


@pytest.fixture(scope="module")
def faulty_tree(imagenet_photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty") / "imagenet"
    bad = _build_tree(root, imagenet_photos, faults=True)
    return root, bad


@pytest.fixture(scope="module")
def no_val_tree(imagenet_photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("no-val") / "imagenet"
    _build_tree(root, imagenet_photos, faults=False, val=False)
    return root


@pytest.fixture
def env(tmp_path):
    # the data-check cache goes to a test folder (these trees are too small to be cached anyway)
    return {"BINARYDUO_CACHE_DIR": str(tmp_path / "cache")}


def _nothing_written(cwd: Path, output: Path):
    assert not output.exists()
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlartifacts").exists()
    assert not (cwd / "runs").exists()


VALID = ("rgb.JPEG", "gray.JPEG", "cmyk.JPEG", "png_named.JPEG")


def test_data_check_lists_every_fault(faulty_tree, no_val_tree, run_binaryduo, tmp_path, env):
    root, bad = faulty_tree
    result = run_binaryduo("data", "check", root, cwd=tmp_path, env=env, check=False)
    assert result.returncode == EXIT_CHECK_FAILED, result.stderr
    lines = result.stdout.splitlines()
    for kind, path in bad.items():
        assert sum(line.startswith(f"{kind}: {path}: ") for line in lines) == 1, (kind, lines)
    assert f"empty-class: {root / 'train' / 'n00000003'}: no image files" in lines
    truncated = next(line for line in lines if line.startswith("truncated: "))
    assert "without the JPEG end-of-image marker" in truncated
    assert "not an image" in next(line for line in lines if line.startswith("not-an-image: "))
    assert not any(name in result.stdout for name in VALID)   # the odd but valid files pass
    assert lines[-1].startswith("4 problem(s) (3 unreadable file(s), 1 structural)")
    assert len(lines) == 5

    as_json = json.loads(run_binaryduo("data", "check", root, "--json", cwd=tmp_path, env=env,
                                       check=False).stdout)
    assert not as_json["ok"] and as_json["unreadable"] == 3
    assert {(p["kind"], p["path"]) for p in as_json["problems"]} == {
        *((kind, str(path)) for kind, path in bad.items()),
        ("empty-class", str(root / "train" / "n00000003"))}

    missing = run_binaryduo("data", "check", no_val_tree, cwd=tmp_path, env=env, check=False)
    assert missing.returncode == EXIT_CHECK_FAILED
    assert missing.stdout.splitlines()[0] == f"missing-split: {no_val_tree / 'val'}: no val/ folder"


@pytest.mark.slow
def test_train_refuses_unreadable_files_before_it_starts(faulty_tree, run_binaryduo, tmp_path,
                                                         env):
    root, bad = faulty_tree
    output = tmp_path / "out"
    result = run_binaryduo("train", RECIPE, "--smoke", "--output", output, "--tracking-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", *SMOKE_SETS, cwd=tmp_path,
                           env={**env, "IMAGENET_DIR": str(root)}, check=False)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("binaryduo: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for kind, path in bad.items():
        assert f"{path} ({kind})" in errors[0]
    assert "3 unreadable image file(s)" in errors[0] and "data.skip_unreadable" in errors[0]
    assert not any(name in errors[0] for name in VALID)
    assert "Traceback" not in result.stderr and "epoch" not in result.stdout
    assert not (tmp_path / "mlflow.db").exists()
    _nothing_written(tmp_path, output)


@pytest.mark.slow
def test_train_refuses_a_missing_split(no_val_tree, run_binaryduo, tmp_path, env):
    output = tmp_path / "out"
    result = run_binaryduo("train", RECIPE, "--smoke", "--output", output, *SMOKE_SETS,
                           cwd=tmp_path, env={**env, "IMAGENET_DIR": str(no_val_tree)},
                           check=False)
    assert result.returncode == EXIT_USAGE
    assert "has no val/ directory" in result.stderr and "Traceback" not in result.stderr
    _nothing_written(tmp_path, output)


@pytest.mark.slow
def test_train_refuses_a_truncated_shard_array(fashion_mnist, tiny_recipe_text, run_binaryduo,
                                               tmp_path, env):
    shard = tmp_path / "fashion-mnist"
    shard.mkdir()
    for item in fashion_mnist.iterdir():   # links: the shared fixture is never modified
        os.link(item, shard / item.name)
    victim = shard / "val_images.npy"
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[:len(data) // 2])                     # a new file, cut at half
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text.replace("DATA", str(shard)))
    output = tmp_path / "out"
    result = run_binaryduo("train", recipe, "--output", output, cwd=tmp_path, env=env,
                           check=False)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("binaryduo: error:")]
    assert len(errors) == 1 and f"shard: {victim}: val array: truncated" in errors[0], errors
    assert "Traceback" not in result.stderr
    _nothing_written(tmp_path, output)
    check = run_binaryduo("data", "check", shard, cwd=tmp_path, env=env, check=False)
    assert check.returncode == EXIT_CHECK_FAILED
    assert check.stdout.startswith(f"shard: {victim}: val array: truncated: {len(data) // 2} bytes")


@pytest.mark.slow
def test_skip_unreadable_trains_without_them_and_records_the_count(faulty_tree, run_binaryduo,
                                                                   tmp_path, env):
    root, bad = faulty_tree
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_binaryduo("train", RECIPE, "--smoke", "--output", tmp_path / "out",
                           "--tracking-uri", uri, *SMOKE_SETS,
                           "--set", "data.skip_unreadable=true", cwd=tmp_path,
                           env={**env, "IMAGENET_DIR": str(root)})
    warnings = [line for line in result.stderr.splitlines()
                if line.startswith("binaryduo: warning: ")]
    skipping = next(line for line in warnings if "skipping 3 unreadable image file(s)" in line)
    assert all(str(path) in skipping for path in bad.values())
    assert any("1 class folder(s)" in line and "n00000003" in line for line in warnings)
    # the 8 readable training images are exactly --smoke's 2 steps of 4: the PNG, grey and CMYK
    # files named .JPEG went through DALI's decoder (any file it cannot decode stops the run)
    assert "[bnn] epoch 1/1" in result.stdout

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("binaryduo").experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data_skipped_files"] == "3"
    assert parent.data.params["data.skip_unreadable"] == "True"
    local = client.download_artifacts(parent.info.run_id, "provenance.json", str(tmp_path))
    skipped = json.loads(Path(local).read_text())["data_skipped_files"]
    assert {tuple(line.split(": ")[:2]) for line in skipped} == {
        (kind, str(path)) for kind, path in bad.items()}
    assert not any(name in " ".join(skipped) for name in VALID)
