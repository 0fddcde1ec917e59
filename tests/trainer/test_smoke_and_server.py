"""--smoke on every shipped recipe, and one run logged to a real ``mlflow server`` on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
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
    distilled = {spec["name"] for spec in shipped["stages"]
                 if (spec.get("distill") or {}).get("weight", 0) > 0}
    for stage in stages:
        assert 0.0 <= stage.data.metrics["val_top1"] <= 100.0
        assert stage.data.metrics["mbit"] > 0
        # --smoke evaluates one batch: data.batch_size images (1 rank)
        smoke_stage_computes(stage.data.metrics,
                             num_classes=shipped["model"]["options"]["num_classes"],
                             val_images=int(parent.data.params["data.batch_size"]),
                             distilled=stage.data.tags["stage"] in distilled)
        if stage.data.tags["stage"] in distilled:  # the teacher's cost is in the record
            assert 0 < stage.data.metrics["distill_teacher_fraction"] < 1
        # health metrics (docs/health.md) in every stage with quantized activations
        health = {k: v for k, v in stage.data.metrics.items() if k.startswith("health/")}
        if stage.data.tags["variant"] != "fp":
            coverage = [v for k, v in health.items() if k.endswith("/ste_coverage")]
            assert coverage and all(0.0 <= v <= 1.0 for v in coverage), stage.data.tags
        assert all(0.0 <= v <= 1.0 for k, v in health.items()
                   if k.endswith(("/ste_coverage", "/flip_ratio")) or "/occupancy_" in k)


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


class Server(str):
    """A server's URL (what ``--tracking-uri`` takes), with the folder its artifacts go to."""

    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` on 127.0.0.1 for this module (about 10 s to start)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = Server(f"http://127.0.0.1:{port}")
    url.artifacts = root / "server-artifacts"
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


#: The Model Registry name the server run registers its last stage's model under
REGISTERED = "tiny-duo-rest"
DESCRIPTION = "The tiny recipe, read back through REST"


@pytest.fixture(scope="module")
def server_run(tmp_path_factory, fashion_mnist, tiny_recipe_text, mlflow_server, run_binaryduo):
    """The tiny recipe (--smoke) trained once into the module's server, its last stage's model
    registered and system metrics every second: the tests below read this one record two ways
    (MlflowClient, plain REST calls)."""
    root = tmp_path_factory.mktemp("server-run")
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text.replace("DATA", str(fashion_mnist)))
    run_binaryduo("train", recipe, "--smoke", "--output", "run", "--tracking-uri", mlflow_server,
                  "--register", REGISTERED, "--set", "logging.system_metrics_interval_s=1",
                  "--set", f"description={DESCRIPTION}", cwd=root)
    return root


def test_run_logged_to_a_real_mlflow_server(server_run, mlflow_server):
    assert not (server_run / "mlflow.db").exists()  # nothing went to the embedded default
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    finetune = next(r for r in runs if r.data.tags.get("stage") == "finetune")
    assert finetune.data.metrics["decouple_max_abs_dlogit_f64"] <= 1e-9
    artifacts = {a.path for a in client.list_artifacts(finetune.info.run_id)}
    assert "decoupling_check_finetune.json" in artifacts
    assert mlflow_server.artifacts.is_dir()  # artifacts went through the server


def rest(server: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call of MLflow's REST API: a GET with ``query``, or a POST of ``body`` as JSON."""
    url = f"{server}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_record_through_the_rest_api(server_run, mlflow_server, fashion_mnist):
    """What a user of MLflow's UI or REST API sees (issue 19), read with plain HTTP: the
    experiment's kind, the standard run tags, dataset inputs, nested stage runs, the stages'
    logged models and the registered version, system metrics."""
    from binaryduo.trainer.tracking.provenance import code_version

    experiment = rest(mlflow_server, "experiments/get-by-name",
                      experiment_name="binaryduo")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens on training runs
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                               "max_results": 100})["runs"]
    assert len(runs) == 3
    tags_of = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]}
               for r in runs}
    parent = next(i for i, t in tags_of.items() if "mlflow.parentRunId" not in t)
    stages = {t["stage"]: i for i, t in tags_of.items() if i != parent}
    assert sorted(stages) == ["coupled", "finetune"]
    assert all(tags_of[i]["mlflow.parentRunId"] == parent for i in stages.values())  # nested
    commit = code_version()["git_sha"]  # None where the code is not its own checkout
    for run_id, run_tags in tags_of.items():
        assert run_tags["mlflow.source.type"] == "LOCAL"
        assert run_tags["mlflow.source.name"].startswith("binaryduo train")
        assert run_tags["mlflow.user"]
        assert run_tags.get("mlflow.source.git.commit") == commit
    assert tags_of[parent]["mlflow.note.content"] == DESCRIPTION  # the recipe's description

    for run_id in [parent, *stages.values()]:
        run = rest(mlflow_server, "runs/get", run_id=run_id)["run"]
        inputs = sorted(
            (i["dataset"]["name"], i["dataset"]["digest"],
             {t["key"]: t["value"] for t in i.get("tags", [])}["mlflow.data.context"])
            for i in run["inputs"]["dataset_inputs"])
        assert [(name, context) for name, _, context in inputs] == [
            ("fashion-mnist-train", "training"), ("fashion-mnist-val", "validation")]
        assert all(len(digest) >= 8 for _, digest, _ in inputs)
        metrics = {m["key"] for m in run["data"]["metrics"]}
        for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            assert name in metrics, (run_id, sorted(metrics))

    models = rest(mlflow_server, "logged-models/search",
                  {"experiment_ids": [experiment["experiment_id"]]})["models"]
    linked = {m["info"]["name"]: m["info"]["source_run_id"] for m in models}
    assert linked == {name: run_id for name, run_id in stages.items()}
    versions = rest(mlflow_server, "model-versions/search",
                    filter=f"name='{REGISTERED}'")["model_versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [("1", stages["finetune"])]
