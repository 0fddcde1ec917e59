import os
import subprocess
import sys
from pathlib import Path

import pytest

from binaryduo.data.prepare import FASHION_MNIST_DIR, prepare_fashion_mnist

BIN = Path(sys.executable).with_name("binaryduo")

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
def fashion_mnist(tmp_path_factory):
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist "
                    "(make install does it)")
    root = tmp_path_factory.mktemp("datasets") / "fashion-mnist"
    prepare_fashion_mnist(root)
    return root


@pytest.fixture
def tiny_recipe(tmp_path, fashion_mnist):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.replace("DATA", str(fashion_mnist)))
    return path


@pytest.fixture
def run_binaryduo():
    """Runs the installed ``binaryduo`` command in a real process (the CPU/gloo path)."""
    return _run_binaryduo


def _run_binaryduo(*args, cwd, env=None, timeout=600, check=True):
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([str(BIN), *map(str, args)], cwd=cwd, env=full_env, text=True,
                            capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"binaryduo {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
