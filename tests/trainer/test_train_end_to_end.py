"""A two-stage BinaryDuo recipe, end to end: real Fashion-MNIST images through the DALI CPU
pipeline, a DeepSpeed engine, checkpoints, and an MLflow sqlite record. Crashes and resume
equivalence: tests/reliability/test_crash_and_resume.py."""
import json

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _records(db):
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return client, parents, children


def test_two_stage_recipe_end_to_end(tmp_path, tiny_recipe, run_binaryduo):
    result = run_binaryduo("train", tiny_recipe, "--output", "run", cwd=tmp_path)
    assert "[coupled] epoch 2/2" in result.stdout and "[finetune] epoch 1/1" in result.stdout

    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["stages"][1]["transition"] == "decouple"
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["packages"]["torch"] == torch.__version__.split("+")[0]
    assert "git_sha" in provenance["code"]

    client, parents, children = _records(tmp_path / "mlflow.db")
    assert len(parents) == 1 and set(children) == {"coupled", "finetune"}
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert parent.info.status == "FINISHED"
    assert parent.data.params["stages.1.transition"] == "decouple"
    assert parent.data.tags["world_size"] == "1" and parent.data.tags["code_version"]

    coupled, finetune = children["coupled"], children["finetune"]
    history = client.get_metric_history(coupled.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]
    assert 30 < history[-1].value <= 100  # it learns: chance is 10 %, 32 steps on 1024 images
    lrs = {m.step: m.value for m in client.get_metric_history(coupled.info.run_id, "lr")}
    assert lrs[1] == pytest.approx(0.05) and lrs[2] == pytest.approx(0.005)  # milestone 2
    for key in ("train_loss", "val_top5", "images_per_second", "data_wait_fraction"):
        assert key in coupled.data.metrics

    # the decoupling check ran, passed, and the decoupled model kept the coupled accuracy
    metrics = finetune.data.metrics
    assert metrics["decouple_max_abs_dlogit_f64"] <= 1e-9
    assert metrics["decouple_changed_predictions_f64"] == 0
    assert metrics["decouple_parameter_deviation"] == 0
    manifest = json.loads((run / "checkpoints" / "coupled" / "manifest.json").read_text())
    assert metrics["decouple_coupled_val_top1"] == manifest["best"]["top1"]
    assert abs(metrics["decouple_val_top1_delta"]) <= 100 / 101  # at most one flipped image
    artifacts = {a.path for a in client.list_artifacts(finetune.info.run_id)}
    assert {"decoupling_check_finetune.json", "cost_finetune.json", "model"} <= artifacts
    check = json.loads((run / "decoupling_check_finetune.json").read_text())
    assert check["passed"] is True
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "recipe.resolved.yaml", "provenance.json", "training_curves.png"}
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the final model is a loadable decoupled network
    state = torch.load(run / "checkpoints" / "finetune" / "epoch-0001" / "model_state.pt",
                       weights_only=True)
    assert state["features.conv2.bn.weight"].shape[0] == 2 * state["features.conv2.conv.weight"].shape[0]


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_recipe, run_binaryduo):
    run_binaryduo("train", tiny_recipe, "--output", "run", "--smoke", cwd=tmp_path)
    other = run_binaryduo("train", tiny_recipe, "--resume", "run", "--smoke", "--set", "seed=8",
                          cwd=tmp_path, check=False)
    assert other.returncode == 1
    assert "holds a run of a different recipe" in other.stderr


def test_bf16_and_zero1_smoke(tmp_path, tiny_recipe, run_binaryduo):
    """bf16 (BN buffers cast after initialize) and ZeRO stage 1 run on the CPU accelerator."""
    result = run_binaryduo("train", tiny_recipe, "--smoke", "--output", "run", "--set",
                           "precision=bf16", "--set", "deepspeed.zero_stage=1", cwd=tmp_path)
    assert "[finetune] epoch 1/1" in result.stdout
    client, parents, children = _records(tmp_path / "mlflow.db")
    assert parents[0].data.params["precision"] == "bf16"
    assert children["finetune"].data.metrics["decouple_max_abs_dlogit_f64"] <= 1e-9


def test_bad_recipe_costs_nothing_and_writes_nothing(tmp_path, tiny_recipe, run_binaryduo):
    result = run_binaryduo("train", tiny_recipe, "--output", "run", "--set", "stages.0.epochs=0",
                           "--set", "model.options.latent_clip=1.0", "--set", "precision=bf16",
                           cwd=tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages.0.epochs" in lines[0]
    result = run_binaryduo("train", tiny_recipe, "--output", "run", "--set",
                           "model.options.latent_clip=1.0", "--set", "precision=bf16",
                           cwd=tmp_path, check=False)
    assert result.returncode == 2 and "latent_clip needs precision fp32" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no run dir, no mlflow.db
