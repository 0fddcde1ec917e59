"""Fixtures shared by every test folder: the real photos of the foolbox 3.3.4 wheel and the tiny
datasets built from them at test time, in the formats the paper recipes read.

- ``cifar10_batches``: a ``cifar-10-batches-py`` folder written in the exact format of the CIFAR-10
  distribution (Python-2-compatible protocol-2 pickles of dicts with bytes keys, ``b'data'`` uint8
  N x 3072 as R, G, B planes, ``b'labels'`` a list of ints; ``batches.meta`` with
  ``b'label_names'``) from the 20 real CIFAR-10 test images in the wheel;
  ``cifar10_shard``: it, prepared by ``binaryduo.data.cifar.prepare_cifar10``.
- ``imagenet_val_source``: a flat ``ILSVRC2012_val_<k>.JPEG`` folder of the 20 real ImageNet
  photos, its ground truth in ILSVRC2012_IDs, and a devkit-style ``meta.mat``. The real wnids and
  their standard (sorted) order come from timm's ``imagenet_synsets.txt``; the devkit's ID order is
  not available offline, so the ID -> wnid assignment in this ``meta.mat`` is a seeded permutation
  (which is what the code must not confuse with the standard index).
- ``imagenet_tree``-like ``imagenet_smoke_tree``: ``train/<wnid>/`` for all 1000 wnids (so the
  ImageFolder index is the standard index; 19 hold photos, plus grey / CMYK / PNG-named-.JPEG
  variants), ``val/`` built by ``prepare_imagenet_val`` from the flat folder.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from binaryduo.data.prepare import FASHION_MNIST_DIR, prepare_fashion_mnist

CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")
CIFAR_PER_BATCH = 8  # images per data_batch_i (real files: 10,000)


#: A two-stage BinaryDuo recipe on Fashion-MNIST small enough for a test (DATA: the dataset root):
#: 2 coupled + 1 fine-tune epochs of 16 steps.
TINY_RECIPE = """\
name: tiny-duo
seed: 7
model:
  name: vgg7
  options: {width_mult: 0.25, num_classes: 10, in_channels: 1}
data:
  root: DATA
  preset: small
  channels: 1
  batch_size: 64
  train_subset: 1024
  val_subset: 101
logging: {every_steps: 4}
stages:
  - name: coupled
    variant: coupled
    epochs: 2
    optimizer: {lr: 0.05}
    schedule: {kind: step, milestones: [2]}
  - name: finetune
    variant: decoupled
    transition: decouple
    init_from: previous
    epochs: 1
    optimizer: {lr: 0.01}
    schedule: {kind: cosine}
"""


@pytest.fixture(scope="session")
def tiny_recipe_text() -> str:
    return TINY_RECIPE


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory):
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist "
                    "(make install does it)")
    root = tmp_path_factory.mktemp("datasets") / "fashion-mnist"
    prepare_fashion_mnist(root)
    return root


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def foolbox_data() -> Path:
    spec = importlib.util.find_spec("foolbox")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("foolbox 3.3.4 not installed (its wheel holds the real ImageNet photos): "
                    "pip install --no-deps foolbox==3.3.4", pytrace=False)
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@pytest.fixture(scope="session")
def imagenet_photos(foolbox_data) -> list[tuple[Path, int]]:
    """The 20 real ImageNet JPEGs with their true ImageNet class index, in file order."""
    photos = []
    for path in sorted(foolbox_data.glob("imagenet_*.jpg")):
        match = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        photos.append((path, int(match.group(2))))
    assert len(photos) == 20, photos
    return photos


@pytest.fixture(scope="session")
def cifar10_photos(foolbox_data) -> list[tuple[np.ndarray, int]]:
    """The 20 real CIFAR-10 test images (uint8 32x32x3) with their labels, in file order."""
    from PIL import Image
    photos = []
    for path in sorted(foolbox_data.glob("cifar10_*.png")):
        label = int(re.fullmatch(r"cifar10_\d+_(\d)\.png", path.name).group(1))
        with Image.open(path) as image:
            photos.append((np.asarray(image.convert("RGB")), label))
    assert len(photos) == 20 and photos[0][0].shape == (32, 32, 3)
    return photos


@pytest.fixture(scope="session")
def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in standard index order (timm's imagenet_synsets.txt)."""
    from binaryduo.data.imagenet import timm_synsets_file
    path = timm_synsets_file()
    if path is None:
        pytest.fail("timm not installed (its wheel holds imagenet_synsets.txt): "
                    "pip install --no-deps timm==1.0.31", pytrace=False)
    wnids = path.read_text().split()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"  # index 0 = tench
    return wnids


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], batch_label: str) -> None:
    """One batch file exactly as the CIFAR-10 python distribution stores it."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)
    record = {b"batch_label": batch_label.encode(), b"labels": [int(x) for x in labels],
              b"data": data, b"filenames": [f"img_{i:05d}.png".encode()
                                            for i in range(len(images))]}
    with open(path, "wb") as handle:
        pickle.dump(record, handle, protocol=2)


def cifar_train_order(count: int = 5 * CIFAR_PER_BATCH, photos: int = 20) -> list[int]:
    """Which photo fills each training slot (data_batch_1 first): the 20 photos cycled."""
    return [slot % photos for slot in range(count)]


@pytest.fixture(scope="session")
def cifar10_batches(cifar10_photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar-src") / "cifar-10-batches-py"
    root.mkdir()
    images = np.stack([p[0] for p in cifar10_photos])
    labels = [p[1] for p in cifar10_photos]
    order = cifar_train_order()
    for batch in range(5):
        slots = order[batch * CIFAR_PER_BATCH:(batch + 1) * CIFAR_PER_BATCH]
        write_cifar_batch(root / f"data_batch_{batch + 1}", images[slots],
                          [labels[i] for i in slots], f"training batch {batch + 1} of 5")
    write_cifar_batch(root / "test_batch", images, labels, "testing batch 1 of 1")
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"num_cases_per_batch": CIFAR_PER_BATCH,
                     b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES],
                     b"num_vis": 3072}, handle, protocol=2)
    return root


@pytest.fixture(scope="session")
def cifar10_shard(cifar10_batches, tmp_path_factory) -> Path:
    from binaryduo.data.cifar import prepare_cifar10
    out = tmp_path_factory.mktemp("cifar") / "cifar10"
    prepare_cifar10(cifar10_batches, out)
    return out


def write_devkit_meta(path: Path, wnids_by_id: list[str]) -> None:
    """A ``meta.mat`` in the ILSVRC2012 devkit's structure: struct array ``synsets`` with
    ILSVRC2012_ID 1..1000 for the leaves, then internal nodes (IDs > 1000) as the real file has."""
    from scipy.io import savemat
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    internal = ["n00001740", "n00002137", "n00002684"]
    synsets = np.zeros((len(wnids_by_id) + len(internal), 1),
                       dtype=[(f, object) for f in fields])
    for index, wnid in enumerate([*wnids_by_id, *internal]):
        leaf = index < len(wnids_by_id)
        synsets[index, 0] = (np.array([[index + 1]], dtype=np.uint16), wnid, f"words {wnid}",
                             f"gloss {wnid}", np.array([[0 if leaf else 2]], dtype=np.uint8),
                             np.zeros((1, 0 if leaf else 2), dtype=np.uint16),
                             np.array([[0 if leaf else 1]], dtype=np.uint8),
                             np.array([[1300 if leaf else 0]], dtype=np.uint16))
    savemat(str(path), {"synsets": synsets})


@pytest.fixture(scope="session")
def imagenet_val_source(imagenet_photos, imagenet_wnids, tmp_path_factory):
    """``(flat_dir, ground_truth_file, meta_mat, expected)``: ``expected[file name]`` is the true
    standard class index of that validation image."""
    root = tmp_path_factory.mktemp("ilsvrc-src")
    flat = root / "ILSVRC2012_img_val"
    flat.mkdir()
    rng = np.random.default_rng(2012)
    wnids_by_id = list(rng.permutation(imagenet_wnids))   # the devkit's ID order (here seeded)
    id_of = {w: i + 1 for i, w in enumerate(wnids_by_id)}
    order = rng.permutation(len(imagenet_photos))           # which photo is val image k
    lines, expected = [], {}
    for k, photo in enumerate(order, 1):
        path, cls = imagenet_photos[photo]
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        shutil.copyfile(path, flat / name)
        lines.append(str(id_of[imagenet_wnids[cls]]))
        expected[name] = cls
    lines += ["1", "1000"]  # two images the flat folder does not hold (a partial copy)
    truth = root / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("\n".join(lines) + "\n")
    meta = root / "meta.mat"
    write_devkit_meta(meta, wnids_by_id)
    return flat, truth, meta, expected


@pytest.fixture(scope="session")
def imagenet_smoke_tree(imagenet_photos, imagenet_wnids, imagenet_val_source, tmp_path_factory):
    """An ImageNet ImageFolder tree (all 1000 wnid folders in train/, so labels are the standard
    indices) of real photos, val/ made by ``prepare_imagenet_val``."""
    from PIL import Image

    from binaryduo.data.imagenet import prepare_imagenet_val
    root = tmp_path_factory.mktemp("imagenet-smoke") / "imagenet"
    for wnid in imagenet_wnids:
        (root / "train" / wnid).mkdir(parents=True)
    for number, (path, cls) in enumerate(imagenet_photos):
        folder = root / "train" / imagenet_wnids[cls]
        shutil.copyfile(path, folder / f"{number:02d}.JPEG")
        if number < 2:  # oddities real ImageNet has: grey, CMYK, a PNG named .JPEG
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            rgb.convert("L").save(folder / f"{number:02d}_gray.JPEG", format="JPEG", quality=90)
            rgb.convert("CMYK").save(folder / f"{number:02d}_cmyk.JPEG", format="JPEG",
                                     quality=90)
            rgb.save(folder / f"{number:02d}_png.JPEG", format="PNG")
    flat, truth, meta, _ = imagenet_val_source
    prepare_imagenet_val(flat, truth, root / "val", synsets=meta, copy=True)
    return root


# ------------------------------------------------------------------ the installed command

BIN = Path(sys.executable).with_name("binaryduo")


@pytest.fixture
def tiny_recipe(tmp_path, fashion_mnist, tiny_recipe_text):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_recipe_text.replace("DATA", str(fashion_mnist)))
    return path


@dataclass(frozen=True)
class SharedRun:
    """A training run done once per session and read by several tests (a real process each
    costs tens of seconds). Nothing else writes under ``root``: its MLflow store (``db``, the
    default ./mlflow.db of the command's working directory) holds only this run."""
    root: Path
    recipe: Path
    run: Path
    db: Path
    stdout: str


def _shared_run(tmp_path_factory, fashion_mnist, name: str, *args) -> SharedRun:
    root = tmp_path_factory.mktemp(name)
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("DATA", str(fashion_mnist)))
    result = _run_binaryduo("train", recipe, "--output", "run", *args, cwd=root)
    return SharedRun(root, recipe, root / "run", root / "mlflow.db", result.stdout)


@pytest.fixture(scope="session")
def tiny_straight_run(tmp_path_factory, fashion_mnist) -> SharedRun:
    """The tiny recipe trained uninterrupted: the end-to-end test reads its record, the crash
    tests compare resumed runs with its weights bit for bit."""
    return _shared_run(tmp_path_factory, fashion_mnist, "tiny-straight")


@pytest.fixture(scope="session")
def tiny_zero1_bf16_smoke(tmp_path_factory, fashion_mnist) -> SharedRun:
    """The tiny recipe with --smoke, ZeRO stage 1 and bf16 (on the CPU accelerator)."""
    return _shared_run(tmp_path_factory, fashion_mnist, "tiny-z1-bf16", "--smoke",
                       "--set", "deepspeed.zero_stage=1", "--set", "precision=bf16")


@pytest.fixture
def mlflow_global_uri(monkeypatch):
    """``use(uri)`` points mlflow's process-wide tracking URI (what ``mlflow.pytorch.load_model``
    and ``mlflow.pyfunc.load_model`` read) at a store for one test, and clears it afterwards.
    ``mlflow.set_tracking_uri`` outlives the test otherwise and wins over ``MLFLOW_TRACKING_URI``
    in every later test of the same worker (it also exports that variable into ``os.environ``,
    which monkeypatch restores)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield mlflow.set_tracking_uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def run_binaryduo():
    """Runs the installed ``binaryduo`` command in a real process (the CPU/gloo path)."""
    return _run_binaryduo


_EMPTY_STORE: list[Path] = []  # this process's empty, migrated MLflow store (made on first use)


def seed_tracking_store(args, cwd) -> None:
    """A run pointed (``--tracking-uri sqlite:///PATH``) at a store that does not exist yet gets a
    copy of an empty one, as MLflow itself creates it: its schema migrations cost ~1.8 s per new
    store (measured: 5.3 s vs 3.5 s for a client's first call) and the suite makes dozens. Only
    for runs expected to succeed: a test of bad input checks that no store is created."""
    args = [str(a) for a in args]
    uris = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--tracking-uri"]
    if not uris or not uris[-1].startswith("sqlite:///"):
        return
    target = Path(cwd) / uris[-1].removeprefix("sqlite:///")
    if target.exists() or not target.parent.is_dir():
        return
    if not _EMPTY_STORE:
        import tempfile

        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="binaryduo-empty-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        _EMPTY_STORE.append(template)
    shutil.copyfile(_EMPTY_STORE[0], target)


@pytest.fixture(scope="session")
def tracking_store_seeder():
    """:func:`seed_tracking_store`, for tests that launch runs their own way (torchrun)."""
    return seed_tracking_store


_FORK_SERVER = []  # this pytest process's fork server (tests/forkserver.py), started on first use


def _command_environment(extra: dict | None = None) -> dict:
    # one OpenMP thread, as `make test` runs: seeded results depend on the thread count, and the
    # committed fixtures (tests/fixtures/) were written so
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run_binaryduo(*args, cwd, env=None, timeout=600, check=True):
    """The ``binaryduo`` command in a process of its own: forked from a server that has done the
    heavy imports once (tests/forkserver.py says what stays the same), or a fresh interpreter
    with BINARYDUO_TEST_FRESH_PROCESSES=1."""
    if check:
        seed_tracking_store(args, cwd)
    full_env = _command_environment(env)
    if os.environ.get("BINARYDUO_TEST_FRESH_PROCESSES") == "1":
        result = subprocess.run([str(BIN), *map(str, args)], cwd=cwd, env=full_env, text=True,
                                capture_output=True, timeout=timeout)
    else:
        if not _FORK_SERVER:
            spec = importlib.util.spec_from_file_location(
                "binaryduo_tests_forkserver", Path(__file__).with_name("forkserver.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _FORK_SERVER.append(module.ForkServerClient(_command_environment()))
        result = _FORK_SERVER[0].run(str(BIN), [str(a) for a in args], cwd=cwd, env=full_env,
                                     timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"binaryduo {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# -- running on two workers (make test: pytest-xdist, --dist loadgroup) ----------------------------
REPO = Path(__file__).resolve().parents[1]
#: Modules whose tests share a session-scoped run across modules: one xdist group, one worker.
SHARED_RUN_GROUPS = {
    "tests/trainer/test_train_end_to_end.py": "tiny-runs",
    "tests/reliability/test_crash_and_resume.py": "tiny-runs",
}
#: Independent real runs, spread one by one over the workers.
SPREAD_TESTS = {"test_smoke_every_recipe"}
#: ... except the smokes whose runs test_compare reads: on its worker, each run once.
COMPARE_SMOKES = {("recipes/cifar10/vgg7_bnn.yaml", "bf16"),
                  ("recipes/cifar10/vgg7_binaryduo.yaml", "bf16")}
#: The longest groups (minutes each, measured), started first and on alternate workers so that
#: both workers finish together; then the recipe smokes, then the rest in collection order. (The
#: scheduler keeps this order only with --no-loadscope-reorder, as `make test` runs it: by default
#: pytest-xdist sorts the groups by their number of tests, and these few-test groups ran last.)
LONGEST_FIRST = ["tiny-runs", "tests/trainer/test_launchers.py",
                 "tests/reliability/test_tracking_faults.py", "tests/slurm/test_slurm_cluster.py",
                 "tests/trainer/test_compare.py", "tests/trainer/test_sweep.py",
                 "tests/trainer/test_compare_seeds.py"]


def pytest_configure(config):
    # pytest-xdist registers this marker; without it (-p no:xdist) --strict-markers would refuse
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test module is one xdist group, so its module-scoped fixtures (a launcher run, a
    Slurm cluster, an MLflow store) are built once, on one worker; the recipe smokes are spread.
    Without xdist the markers do nothing and only the order changes (modules stay whole).

    ``tryfirst``: xdist's worker turns the markers into ``@group`` node ids in its own collection
    hook, which would otherwise run first and see no marker. Checked below: measured without it
    (or with pytest 9, whose node ids xdist 3.8 can no longer rename), every module was split
    over both workers and its module fixtures built twice: 13:50 instead of ~11 minutes."""
    def group(item) -> str | None:
        if item.originalname in SPREAD_TESTS:
            params = getattr(item, "callspec", None)
            key = (str(params.params.get("recipe")), params.params.get("precision")) if params \
                else None
            return "tests/trainer/test_compare.py" if key in COMPARE_SMOKES else None
        module = Path(item.path).relative_to(REPO).as_posix()
        return SHARED_RUN_GROUPS.get(module, module)

    for item in items:
        name = group(item)
        if name is not None:
            item.add_marker(pytest.mark.xdist_group(name))
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}

    def order(item) -> tuple[int, int]:
        name = group(item)
        if name in rank:
            return rank[name], 0
        if item.originalname in SPREAD_TESTS:  # 13-37 s each: before the small modules (which
            # fill the end evenly), the 224-px ones first
            return len(LONGEST_FIRST), 0 if "imagenet" in item.nodeid else 1
        return len(LONGEST_FIRST) + 1, 0

    items.sort(key=order)


def pytest_collection_finish(session):
    """On an xdist worker with ``--dist loadgroup``: every grouped test's node id must carry its
    ``@group`` (what the scheduler groups by); else the grouping silently does nothing."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"--dist loadgroup does not group: {lost[0]} has an xdist_group marker but no @group "
            "in its node id (a pytest / pytest-xdist pair that does not work together? setup.py "
            "pins them)")
