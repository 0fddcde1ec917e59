"""``binaryduo export`` on a real trained run: the IR verified on real Fashion-MNIST test images,
logged to the stage's MLflow run, loaded back as a pyfunc model; and every refusal before any
export (one line, exit 2, nothing written)."""
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from binaryduo import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory, fashion_mnist, tiny_recipe_text, run_binaryduo):
    """The tests' tiny BinaryDuo recipe with binary weights, trained with --smoke."""
    root = tmp_path_factory.mktemp("export-run")
    recipe = root / "tiny-binary.yaml"
    recipe.write_text(tiny_recipe_text.replace("DATA", str(fashion_mnist)).replace(
        "options: {width_mult: 0.25,", "options: {width_mult: 0.25, weight_bits: 1,"))
    run_binaryduo("train", recipe, "--smoke", "--output", "run",
                  "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", cwd=root)
    return root


def test_a_run_exports_verified_and_logged_and_serves(binary_run, run_binaryduo,
                                                      mlflow_global_uri):
    result = run_binaryduo("export", "run", "--verify", "all", cwd=binary_run)  # 10,000 images
    output = binary_run / "run" / "export" / "finetune-openvino"
    report = json.loads((output / "export_report.json").read_text())
    check = report["verification"]
    assert check["passed"] and check["reason"] == ""
    assert check["samples"] == check["identical_predictions"] == 10000  # the whole test set
    # vgg7's five binary convolutions (conv2..conv6) run the bit-packed kernel
    assert check["expected_binary_kernels"] == check["binary_kernels"] == 5
    assert check["binary_primitive_types"] and all(
        "u1" in kind for kind in check["binary_primitive_types"])
    assert check["ir_top1"] == check["reference_top1"]
    assert report["variant"] == "decoupled" and report["stage"] == "finetune"
    assert "10000/10000 identical predictions" in result.stdout and "verified" in result.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{binary_run / 'mlflow.db'}")
    state = json.loads((binary_run / "run" / "run_state.json").read_text())
    stage_run = client.get_run(state["stage_run_ids"]["finetune"])
    assert stage_run.data.metrics["export_identical_predictions"] == 10000
    assert stage_run.data.metrics["export_binary_kernels"] == 5
    assert stage_run.data.tags["export_verified"] == "true"
    logged = {a.path for a in client.list_artifacts(stage_run.info.run_id, "export/openvino")}
    assert {"export/openvino/model.xml", "export/openvino/model.bin",
            "export/openvino/export_report.json"} <= logged

    # the pyfunc model, loaded back from the store, gives the logits of the trained PyTorch
    # model (any batch size: the IR is reshaped per request)
    import mlflow.pyfunc

    mlflow_global_uri(f"sqlite:///{binary_run / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"runs:/{stage_run.info.run_id}/binary_model")
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    logits = served.predict(images.numpy())
    assert logits.shape == (3, 10)
    single = served.predict(images[:1].numpy())  # another batch size: another compilation
    model = models.build("vgg7", "decoupled", width_mult=0.25, weight_bits=1, num_classes=10,
                         in_channels=1)
    from binaryduo.trainer.run.checkpoint import load_model_state

    model.load_state_dict(load_model_state(next(
        (binary_run / "run" / "checkpoints" / "finetune").glob("*/model_state.pt"))))
    with torch.no_grad():
        reference = model.double().eval()(images.double()).numpy()
    assert np.abs(logits - reference).max() < 1e-4
    assert np.abs(single[0] - logits[0]).max() < 1e-5


def test_the_coupled_stage_exports_through_its_decoupling(binary_run, run_binaryduo, tmp_path):
    result = run_binaryduo("export", binary_run / "run", "--stage", "coupled", "--random",
                           "--verify", "64", "--batch", "4", "--no-tracking",
                           "--output", tmp_path / "coupled", cwd=tmp_path)
    report = json.loads((tmp_path / "coupled" / "export_report.json").read_text())
    assert report["variant"] == "coupled" and report["export"]["exported_variant"] == "decoupled"
    assert report["verification"]["passed"], report["verification"]["reason"]
    assert report["ir_batch"] == 4 and "64 random" in report["verified_on"]
    assert "64/64 identical predictions" in result.stdout


def _refused(run_binaryduo, cwd, *args) -> str:
    result = run_binaryduo("export", *args, cwd=cwd, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: "), result.stderr
    return lines[0]


def test_bad_input_is_refused_before_any_export(binary_run, run_binaryduo, tmp_path):
    fp_state = tmp_path / "fp" / "model_state.pt"
    fp_state.parent.mkdir()
    torch.save(models.build("vgg7", "bnn", width_mult=0.25, num_classes=10, in_channels=1,
                            weight_bits=32).state_dict(), fp_state)
    assert "weight_bits=32" in _refused(run_binaryduo, tmp_path, fp_state, "--model", "vgg7",
                                        "--variant", "bnn", "-O", "width_mult=0.25",
                                        "-O", "in_channels=1", "-O", "weight_bits=32", "--random",
                                        "--output", tmp_path / "fp-out")
    assert not (tmp_path / "fp-out").exists()
    assert "give --model NAME and --variant" in _refused(run_binaryduo, tmp_path, fp_state)
    assert "no such file or directory" in _refused(run_binaryduo, tmp_path, tmp_path / "nope")
    assert "--verify 0" in _refused(run_binaryduo, binary_run, "run", "--verify", "0")
    assert "--stage warmup: not a stage" in _refused(run_binaryduo, binary_run, "run",
                                                     "--stage", "warmup")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "exists and is not empty" in _refused(run_binaryduo, binary_run, "run", "--random",
                                                 "--output", taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert (taken / "notes.txt").read_text() == "mine"


def test_a_store_that_refuses_the_record_keeps_the_verified_export(binary_run, run_binaryduo,
                                                                    tmp_path):
    """A store without the run (here: another, empty one): exit 1, one line, files intact; a
    store that does not exist is refused before the export (nothing is created)."""
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    assert "no MLflow store there" in _refused(run_binaryduo, tmp_path, binary_run / "run",
                                               "--random", "--output", tmp_path / "never",
                                               "--tracking-uri", missing)
    assert not (tmp_path / "never").exists() and not (tmp_path / "missing.db").exists()
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}").search_experiments()
    result = run_binaryduo("export", binary_run / "run", "--random", "--verify", "8",
                           "--output", tmp_path / "out", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'other.db'}", cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "but not logged to run" in lines[0], result.stderr
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())[
        "verification"]["passed"]
    assert (tmp_path / "out" / "model.bin").stat().st_size > 0
