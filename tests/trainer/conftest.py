import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------ shipped recipes

REPO = Path(__file__).resolve().parents[2]

# How each shipped recipe is smoked: the tiny dataset (built at test time from real images, in the
# recipe's format; tests/conftest.py) that its data root points at, and the overrides. Paper
# recipes keep their ${VAR} data root (the variable is set in the environment, so the reference
# itself is exercised). Their batch is cut to what the tiny trees hold for --smoke's 2 steps per
# stage: the same code path (DataFeed splits whatever batch the recipe has), and the images keep
# the recipe's size (224 / 32). Fashion-MNIST's real 60,000 images would hold the recipes' 128,
# but a batch of 128 made each smoke 20-45 s of bf16 autocast on the CPU (measured: 53 s for the
# demo's BinaryDuo recipe, 7 s per stage for two steps), so it is cut to 16 there too. Every other
# key of the recipe is used as shipped.
SMOKE_DATA = {
    # data.prepare or data.root -> (fixture, environment variable or None, --set overrides)
    "fashion-mnist": ("fashion_mnist", None, ["data.batch_size=16"]),
    "${CIFAR10_DIR}": ("cifar10_shard", "CIFAR10_DIR", ["data.batch_size=16"]),
    "${IMAGENET_DIR}": ("imagenet_smoke_tree", "IMAGENET_DIR",
                        ["data.batch_size=4", "data.num_threads=2"]),
}


@dataclass(frozen=True)
class SmokeRun:
    recipe: Path           # relative to the repository
    name: str              # the recipe's name; its MLflow runs carry tags.recipe = name + "-smoke"
    env: dict
    overrides: list
    stdout: str
    seconds: float


def smoke_plan(recipe: Path, request) -> tuple[dict, list[str]]:
    """(environment, --set items) that point ``recipe`` at its tiny dataset."""
    import yaml

    shipped = yaml.safe_load((REPO / recipe).read_text())
    data = shipped["data"]
    key = data.get("prepare") or data["root"]
    if key not in SMOKE_DATA:
        pytest.fail(f"{recipe}: no tiny test dataset for data.root {data['root']!r} (preset "
                    f"{data['preset']!r}): add one to SMOKE_DATA in tests/trainer/conftest.py")
    fixture, variable, sets = SMOKE_DATA[key]
    root = request.getfixturevalue(fixture)
    teachers = {name: str(request.getfixturevalue(fixture))
                for name, fixture in SMOKE_TEACHERS.items()
                if f"${{{name}}}" in (REPO / recipe).read_text()}
    if key == "${IMAGENET_DIR}" and shipped["model"]["name"].startswith("resnet"):
        # the same path at 64 px (the ResNets pool adaptively, so every layer but the input is
        # the same): bf16 convolutions on this CPU are emulated, and at 224 px a BinaryDuo
        # ResNet-18 smoke took 97 s (72 s of it in conv2d, measured with cProfile), with a
        # ResNet-34 teacher 200 s; 64 px costs about an eighth. The AlexNet recipes (fixed 6x6
        # classifier input) keep 224 px: the full ImageNet geometry through DALI stays tested.
        sets = [*sets, "data.image_size=64", "model.options.input_size=64"]
    if variable is None:
        return teachers, [f"data.root={root}", *sets]
    return {variable: str(root), **teachers}, list(sets)


#: teacher checkpoints a shipped recipe names by environment variable -> the fixture making one
SMOKE_TEACHERS = {"RESNET34_CHECKPOINT": "resnet34_teacher_checkpoint"}


@pytest.fixture(scope="session")
def resnet34_teacher_checkpoint(tmp_path_factory) -> Path:
    """A torchvision ResNet-34 state dict (random weights; the real teacher file is torchvision's
    ImageNet one, same keys and shapes)."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("teachers") / "resnet34.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory, request, run_binaryduo):
    """``smoke_store(recipe[, precision])`` runs a shipped recipe with ``--smoke`` (once per
    session and precision; bf16 unless told: the recipes' GPU path, autocast on CPU) in a real
    process, into one MLflow store shared by all of them (``smoke_store.uri``): the smoke tests
    and ``compare`` read the same real runs."""
    import yaml

    root = tmp_path_factory.mktemp("smoke-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    done: dict[Path, SmokeRun] = {}

    def run(recipe: Path, precision: str = "bf16") -> SmokeRun:
        recipe = Path(recipe)
        if (recipe, precision) not in done:
            env, sets = smoke_plan(recipe, request)
            sets = [*sets, f"precision={precision}"]
            name = yaml.safe_load((REPO / recipe).read_text())["name"]
            overrides = [arg for item in sets for arg in ("--set", item)]
            started = time.monotonic()
            result = run_binaryduo("train", REPO / recipe, "--smoke", "--output",
                                    root / "runs" / f"{name}-{precision}", "--tracking-uri", uri,
                                    *overrides, cwd=root, env=env)
            done[recipe, precision] = SmokeRun(recipe, name, env, sets, result.stdout,
                                               time.monotonic() - started)
        return done[recipe, precision]

    run.root, run.uri, run.created = root, uri, time.time()
    return run


def assert_smoke_stage_computes(metrics: dict, *, num_classes: int, val_images: int,
                                distilled: bool = False) -> None:
    """What a --smoke stage (2 training steps, one evaluation batch) can show. Two steps cannot
    show learning (the tiny full runs do: test_train_end_to_end, test_launchers, the crash
    tests); they can show a network that computes. Near initialisation the mean cross-entropy
    is about ln(num_classes): measured on every shipped recipe, 1.96-2.37 for 10 classes
    (ln 10 = 2.30) and 6.68-7.32 for 1000 (ln 1000 = 6.91). A loss outside half to one and a
    half times that fails (exploding activations, inputs not normalised, a broken loss, labels
    leaking into the input), and so does an evaluation that does not count whole images
    (top-1 is k / val_images) or ranks top-5 below top-1. A ``distilled`` stage's training loss is
    not the cross-entropy and is only required to be finite."""
    chance_loss = math.log(num_classes)
    # a distilled stage's training loss is (mostly) the KL to its teacher, near 0 for two
    # untrained networks; its validation loss is still the cross-entropy
    assert math.isfinite(metrics["train_loss"]), metrics
    for key in ("val_loss",) if distilled else ("train_loss", "val_loss"):
        assert 0.5 * chance_loss < metrics[key] < 1.5 * chance_loss, (key, metrics)
    assert 0.0 <= metrics["val_top1"] <= metrics["val_top5"] <= 100.0, metrics
    correct = metrics["val_top1"] * val_images / 100
    assert abs(correct - round(correct)) < 1e-6, (metrics["val_top1"], val_images)


@pytest.fixture(scope="session")
def smoke_stage_computes():
    """:func:`assert_smoke_stage_computes`, for the CPU and GPU smoke tests."""
    return assert_smoke_stage_computes


@pytest.fixture(scope="session")
def torchrun_worker():
    """``torchrun_worker(script, nproc, *args, out=PREFIX)``: runs a test worker script on
    ``nproc`` gloo ranks (torchrun, CPU) and returns each rank's ``PREFIX.<rank>.json``."""
    import json
    import os
    import socket
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")

    def launch(script: Path, nproc: int, *args, out: Path) -> list[dict]:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        with socket.socket() as sock:  # torchrun's --master_port 0 hangs the gloo rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        result = subprocess.run([str(torchrun), "--nproc_per_node", str(nproc), "--master_port",
                                 str(port), str(script), *map(str, args)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(nproc)]

    return launch


@pytest.fixture
def compare_cli(capsys, monkeypatch):
    """``binaryduo compare --tracking-uri STORE_OR_URI ...`` in-process (``cli.main``, no
    process start-up; the compare tests use real processes where that matters): a
    CompletedProcess of the exit status, stdout and stderr."""
    from binaryduo.trainer.cli.main import main

    def call(store_or_uri, *args, cwd=None, check=True):
        uri = getattr(store_or_uri, "uri", store_or_uri)
        monkeypatch.chdir(cwd or store_or_uri.root)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        capsys.readouterr()
        try:
            code = main(["compare", "--tracking-uri", uri, *map(str, args)])
        except SystemExit as done:
            code = done.code
        out, err = capsys.readouterr()
        if check:
            assert code == 0, err
        return subprocess.CompletedProcess(args, code, out, err)
    return call
