"""--smoke on every shipped recipe, and one run logged to a real ``mlflow server`` on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml"))

pytestmark = pytest.mark.slow


#: Every recipe in bf16 (``precision: auto`` on a GPU: the path users run), and the demo recipes
#: also in fp32 (``auto`` on CPU: what ``make demo`` runs).
SMOKES = [(recipe, "bf16") for recipe in RECIPES] + [
    (recipe, "fp32") for recipe in RECIPES if recipe.parts[1] == "demo"]


@pytest.mark.parametrize("recipe,precision", SMOKES, ids=lambda v: str(v))
def test_smoke_every_recipe(recipe, precision, smoke_store, smoke_stage_computes):
    """Every shipped recipe runs end to end (--smoke) on a tiny dataset in its own format."""
    import yaml

    run = smoke_store(recipe, precision)
    print(f"smoke {recipe} {precision}: {run.seconds:.1f} s")
    assert "open the record" in run.stdout
    client = MlflowClient(tracking_uri=smoke_store.uri)
    experiment = client.get_experiment_by_name("binaryduo").experiment_id
    runs = client.search_runs([experiment], f"tags.recipe = '{run.name}-smoke' and "
                                            f"tags.precision = '{precision}'")
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["smoke"] for r in runs} == {"true"}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    shipped = yaml.safe_load((REPO / recipe).read_text())
    assert len(stages) == len(runs) - 1 == len(shipped["stages"])
    assert parent.data.params["model.name"] == shipped["model"]["name"]
    # the recipe's description is the run's MLflow description
    assert parent.data.tags["mlflow.note.content"] == " ".join(shipped["description"].split())
    for key, value in shipped["model"].get("options", {}).items():
        assert parent.data.params[f"model.options.{key}"] == str(value)  # e.g. weight bits
    if run.env:  # the ${VAR} reference resolved to the tiny tree
        assert parent.data.params["data.root"] == next(iter(run.env.values()))
    for stage in stages:
        assert 0.0 <= stage.data.metrics["val_top1"] <= 100.0
        assert stage.data.metrics["mbit"] > 0
        # --smoke evaluates one batch: data.batch_size images (1 rank)
        smoke_stage_computes(stage.data.metrics,
                             num_classes=shipped["model"]["options"]["num_classes"],
                             val_images=int(parent.data.params["data.batch_size"]))


def test_the_demo_exports_its_binaryduo_network_verified_on_the_whole_test_set(smoke_store):
    """``binaryduo demo``'s last step on its BinaryDuo recipe (binary weights, trained here with
    --smoke in fp32 as ``make demo`` runs it on CPU): the fine-tuned decoupled network becomes an
    OpenVINO IR whose five binary convolutions run the bit-packed kernel, with the PyTorch model's
    prediction on every one of the 10,000 test images, logged to the stage's MLflow run."""
    from binaryduo.trainer.cli.demo import EXPORTED_RECIPE, RECIPES, export_demo_model

    assert f"{EXPORTED_RECIPE}.yaml" in RECIPES
    smoke_store(Path("recipes/demo") / f"{EXPORTED_RECIPE}.yaml", "fp32")
    run_dir = smoke_store.root / "runs" / f"{EXPORTED_RECIPE}-fp32"
    code, report = export_demo_model(run_dir, smoke_store.uri)
    assert code == 0 and report is not None
    check = report["verification"]
    assert check["passed"] and check["samples"] == check["identical_predictions"] == 10000
    assert check["binary_kernels"] == check["expected_binary_kernels"] == 5
    # two smoke steps may leave one class winning everywhere: the logits are the real check
    assert check["max_abs_dlogit"] < 1e-4 and check["ir_top1"] == check["reference_top1"]
    assert (report["variant"], report["stage"], report["options"]["weight_bits"]) == (
        "decoupled", "finetune", 1)
    # the weights (model.bin) within 1.3x the paper-rule Mbit; the topology text (model.xml, about
    # 36 kB here) is what makes this small network's whole IR 1.6x
    weights = run_dir / "export" / "finetune-openvino" / "model.bin"
    assert weights.stat().st_size * 8 / 1e6 <= 1.3 * report["paper_mbit"]
    state = json.loads((run_dir / "run_state.json").read_text())
    stage_run = MlflowClient(tracking_uri=smoke_store.uri).get_run(
        state["stage_run_ids"]["finetune"])
    assert stage_run.data.tags["export_verified"] == "true"
    assert stage_run.data.metrics["export_identical_predictions"] == 10000


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("mlflow server did not come up within 60 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_run_logged_to_a_real_mlflow_server(tmp_path, tiny_recipe, mlflow_server, run_binaryduo):
    run_binaryduo("train", tiny_recipe, "--smoke", "--output", "run", "--tracking-uri",
                  mlflow_server, cwd=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded default
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    finetune = next(r for r in runs if r.data.tags.get("stage") == "finetune")
    assert finetune.data.metrics["decouple_max_abs_dlogit_f64"] <= 1e-9
    artifacts = {a.path for a in client.list_artifacts(finetune.info.run_id)}
    assert "decoupling_check_finetune.json" in artifacts
    assert (tmp_path / "server-artifacts").is_dir()  # artifacts went through the server
