"""--smoke on every shipped recipe, and one run logged to a real ``mlflow server`` on 127.0.0.1."""
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


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_smoke_every_recipe(recipe, tmp_path, fashion_mnist, run_binaryduo):
    import yaml

    preset = yaml.safe_load((REPO / recipe).read_text())["data"]["preset"]
    if preset != "small":
        pytest.fail(f"no tiny test dataset for preset {preset!r} yet: add one for {recipe}")
    result = run_binaryduo("train", REPO / recipe, "--smoke", "--output", "smoke",
                           "--set", f"data.root={fashion_mnist}", cwd=tmp_path)
    assert "open the record" in result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["smoke"] for r in runs} == {"true"}


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
