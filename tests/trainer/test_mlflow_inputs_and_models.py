"""Datasets as MLflow run inputs and each stage's final model as an MLflow Model (issue 19).

Read from the shared tiny run's store (``tiny_straight_run``: no extra training), plus cheap
unit checks of the dataset digest and the ``--register`` refusals (before any compute)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from binaryduo.trainer.tracking.datasets import describe_datasets

BIN = Path(sys.executable).with_name("binaryduo")


def _store(run) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run.db}")
    return client, client.get_experiment_by_name("binaryduo").experiment_id


@pytest.mark.slow
def test_every_run_has_its_training_and_validation_datasets(tiny_straight_run, fashion_mnist):
    client, experiment = _store(tiny_straight_run)
    runs = client.search_runs([experiment])
    assert len(runs) == 3  # the parent and two stages
    expected = describe_datasets(fashion_mnist, subsets={"train": 1024, "val": 101})
    for run in runs:
        inputs = run.inputs.dataset_inputs
        found = sorted((i.dataset.name, i.dataset.digest, i.dataset.source_type,
                        json.loads(i.dataset.source)["uri"], json.loads(i.dataset.profile)
                        ["num_samples"], [(t.key, t.value) for t in i.tags]) for i in inputs)
        assert found == [
            ("fashion-mnist-train", expected[0]["digest"], "local", str(fashion_mnist.resolve()),
             1024, [("mlflow.data.context", "training")]),
            ("fashion-mnist-val", expected[1]["digest"], "local", str(fashion_mnist.resolve()),
             101, [("mlflow.data.context", "validation")])]
        schema = json.loads(inputs[0].dataset.schema)["mlflow_tensorspec"]
        assert '"shape": [-1, 28, 28, 1]' in schema["features"]


@pytest.mark.slow
def test_stage_models_are_logged_models_that_load_back_bit_for_bit(tiny_straight_run,
                                                                  mlflow_global_uri, tmp_path):
    import mlflow.pytorch
    from binaryduo import models
    from mlflow.entities import LoggedModelStatus

    client, experiment = _store(tiny_straight_run)
    mlflow_global_uri(f"sqlite:///{tiny_straight_run.db}")
    stages = {r.data.tags["stage"]: r for r in client.search_runs([experiment])
              if "stage" in r.data.tags}
    logged = client.search_logged_models([experiment])
    assert sorted(m.name for m in logged) == ["coupled", "finetune"]  # one each, no duplicate
    options = {"width_mult": 0.25, "num_classes": 10, "in_channels": 1}
    for model in logged:
        run = stages[model.name]
        assert model.status == LoggedModelStatus.READY
        assert model.source_run_id == run.info.run_id
        epochs = int(run.data.params["stage.epochs"])
        assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [
            (model.model_id, epochs)]
        linked = {m.key: m.value for m in model.metrics}  # the stage's final metrics
        assert linked["val_top1"] == run.data.metrics["val_top1"]
        assert linked["best_val_top1"] == run.data.metrics["best_val_top1"]

        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}",
                                           dst_path=str(tmp_path))
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 32, 32]
        assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]
        checkpoint = models.build("vgg7", run.data.tags["variant"], **options)
        manifest = json.loads((tiny_straight_run.run / "checkpoints" / model.name /
                               "manifest.json").read_text())
        state = tiny_straight_run.run / "checkpoints" / model.name / manifest["latest"] / \
            "model_state.pt"
        checkpoint.load_state_dict(torch.load(state, weights_only=True))
        images = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(images), checkpoint.eval()(images))
        assert info.saved_input_example_info["type"] == "ndarray"
        metadata = info.metadata
        assert metadata["stage"] == model.name and metadata["recipe"] == "tiny-duo"
        if model.name == "finetune":  # the decoupling check travels with the decoupled model
            check = metadata["decoupling_check"]
            assert check["decouple_decoupled_val_top1"] == check["decouple_coupled_val_top1"]
            assert check["decouple_decoupled_val_top1"] == \
                run.data.metrics["decouple_decoupled_val_top1"]
        else:
            assert "decoupling_check" not in metadata


def test_dataset_digest_follows_the_data_not_a_full_read(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for index in range(3):
                (root / split / cls / f"{index}.jpg").write_bytes(b"x" * (10 + index))
    first = describe_datasets(root)
    assert [d["context"] for d in first] == ["training", "validation"]
    assert json.loads(first[0]["profile"])["num_samples"] == 6
    assert describe_datasets(root) == first  # stable
    image = root / "train" / "a" / "0.jpg"
    image.write_bytes(b"y" * 99)  # the data changed: so does the digest of that split only
    changed = describe_datasets(root)
    assert changed[0]["digest"] != first[0]["digest"]
    assert changed[1]["digest"] == first[1]["digest"]
    subset = describe_datasets(root, subsets={"train": 4})
    assert subset[0]["digest"] != changed[0]["digest"]
    assert json.loads(subset[0]["profile"])["num_samples"] == 4
    left_out = describe_datasets(root, exclude=("train/a/0.jpg",))
    assert left_out[0]["digest"] != changed[0]["digest"]
    assert json.loads(left_out[0]["profile"])["num_samples"] == 5


def test_shard_digest_reads_headers_only(fashion_mnist, tmp_path):
    copy = tmp_path / "shard"
    copy.mkdir()
    for item in fashion_mnist.iterdir():
        os.link(item, copy / item.name) if item.is_file() else None
    before = describe_datasets(copy)
    labels = copy / "val_labels.npy"
    data = np.load(labels)
    labels.unlink()  # a new file, not the hard-linked original
    np.save(labels, data[::-1].copy())
    after = describe_datasets(copy)
    assert after[0]["digest"] == before[0]["digest"] and after[1]["digest"] != before[1]["digest"]


@pytest.mark.parametrize("name, message", [
    ("bad/name", "not a registered model name"),
    (" ", "the registered model name is empty"),
])
def test_register_with_a_bad_name_is_refused_before_compute(tmp_path, tiny_recipe, name,
                                                             message):
    result = subprocess.run([str(BIN), "train", str(tiny_recipe), "--output", "run",
                             "--register", name], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: --register")
    assert message in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


def test_register_without_logged_models_is_refused(tmp_path, tiny_recipe):
    result = subprocess.run([str(BIN), "train", str(tiny_recipe), "--output", "run",
                             "--register", "tiny", "--set", "logging.log_models=false"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "logging.log_models is false" in result.stderr
    assert not (tmp_path / "run").exists()
