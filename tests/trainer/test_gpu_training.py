"""The GPU training path, chosen automatically when CUDA is present: DALI ``mixed`` decode, NCCL,
bf16 (``precision: auto``). Skipped without a GPU (CI and laptops have none); run on a lent GPU
machine with ``pytest tests/data/test_gpu_pipelines.py tests/trainer/test_gpu_training.py``.

Shipped recipes run with ``--smoke`` on the tiny trees of real photos (tests/conftest.py), exactly
as the CPU smoke test runs them, but without forcing DeepSpeed's CPU accelerator."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).with_name("binaryduo")

# recipe -> (fixture holding its tiny dataset, the recipe's ${VAR}, --set overrides)
GPU_RECIPES = {
    "recipes/imagenet/resnet18_binaryduo.yaml": ("imagenet_smoke_tree", "IMAGENET_DIR",
                                                 ["data.batch_size=4"]),
    "recipes/imagenet/alexnet_binaryduo.yaml": ("imagenet_smoke_tree", "IMAGENET_DIR",
                                                ["data.batch_size=4"]),
    "recipes/cifar10/vgg7_binaryduo.yaml": ("cifar10_shard", "CIFAR10_DIR",
                                            ["data.batch_size=16"]),
}


#: Also compiled (the recipe key ``compile``: inductor on CUDA, under bf16 autocast).
COMPILED = ["recipes/cifar10/vgg7_binaryduo.yaml"]


@pytest.mark.parametrize("recipe,compiled", [
    *[pytest.param(r, False, id=r) for r in GPU_RECIPES],
    *[pytest.param(r, True, id=f"{r}-compiled") for r in COMPILED]])
def test_recipe_trains_on_the_gpu_with_nccl_and_bf16(recipe, compiled, tmp_path, request,
                                                     smoke_stage_computes):
    from mlflow.tracking import MlflowClient

    fixture, variable, sets = GPU_RECIPES[recipe]
    sets = [*sets, "compile=true"] if compiled else sets
    env = {**os.environ, variable: str(request.getfixturevalue(fixture))}
    env.pop("DS_ACCELERATOR", None)  # let DeepSpeed find the GPU, as a user's run does
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [arg for item in sets for arg in ("--set", item)]
    result = subprocess.run([str(BIN), "train", str(REPO / recipe), "--smoke", "--output",
                             str(tmp_path / "run"), "--tracking-uri", uri, *overrides],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["hardware"]["device"] == torch.cuda.get_device_name(0)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["precision"] == "bf16" and tags["dist_backend"] == "nccl", tags
    assert tags["hardware"] == torch.cuda.get_device_name(0)
    for stage in stages:
        metrics = stage.data.metrics
        assert math.isfinite(metrics["train_loss"]), stage.data.tags["stage"]
        assert 0.0 <= metrics["val_top1"] <= 100.0
        assert metrics["images_per_second"] > 0
        # the same bounds as the CPU smoke (tests/trainer/conftest.py), in bf16
        smoke_stage_computes(metrics,
                             num_classes=int(parent.data.params["model.options.num_classes"]),
                             val_images=int(parent.data.params["data.batch_size"]))
    # bf16 is mixed precision: everything written is float32 (weights and BN statistics)
    for path in (tmp_path / "run").glob("checkpoints/*/epoch-*/model_state.pt"):
        state = torch.load(path, weights_only=True)
        dtypes = {t.dtype for t in state.values()}
        assert dtypes <= {torch.float32, torch.int64}, (path, dtypes)
        assert not any(key.startswith("_orig_mod.") for key in state), path  # compiled in place
    finetune = [s for s in stages if "decouple_max_abs_dlogit_f64" in s.data.metrics]
    assert finetune, "the decouple transition ran"
    for stage in finetune:  # decoupling is checked in float64, whatever the training precision
        assert stage.data.metrics["decouple_max_abs_dlogit_f64"] <= 1e-9
        assert stage.data.metrics["decouple_changed_predictions_f64"] == 0
        # and in the run's own precision (bf16 autocast, float32 BN): within the recipe's bound
        assert stage.data.metrics["decouple_activation_flip_fraction_native"] <= 1e-4
