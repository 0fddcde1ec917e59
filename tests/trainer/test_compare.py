"""``binaryduo compare`` on a store filled by real --smoke runs of the shipped CIFAR-10 recipes:
the table's values are the runs' MLflow metrics, the paper's rows sit beside them, filters and
formats work, the plot is drawn, and bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

BNN = Path("recipes/cifar10/vgg7_bnn.yaml")
DUO = Path("recipes/cifar10/vgg7_binaryduo.yaml")


@pytest.fixture(scope="module")
def store(smoke_store):
    smoke_store(BNN)
    smoke_store(DUO)
    return smoke_store


# The shared smoke store holds every recipe smoked in this session: select the two FP-weight
# CIFAR-10 recipes (also exercises --filter on a tag and on a flattened recipe param).
CIFAR_FP = ("--filter", "tags.recipe LIKE 'cifar10_%'",
            "--filter", "params.`model.options.weight_bits` = '32'")


@pytest.fixture
def compare(compare_cli):
    return compare_cli


def stage_runs(store, recipe: str) -> dict[str, object]:
    client = MlflowClient(tracking_uri=store.uri)
    experiment = client.get_experiment_by_name("binaryduo").experiment_id
    runs = client.search_runs([experiment], f"tags.recipe = '{recipe}-smoke'")
    return {r.data.tags["stage"]: r for r in runs if "stage" in r.data.tags}


def test_json_table_equals_the_runs_metrics(store, compare):
    rows = json.loads(compare(store, "--include-smoke", "--format", "json",
                              *CIFAR_FP).stdout)
    runs = [r for r in rows if r["source"] == "run"]
    by_recipe = {}
    for row in runs:
        by_recipe.setdefault(row["recipe"], []).append(row)
    for recipe, stages in (("cifar10_vgg7_bnn", ["bnn (bnn)"]),
                           ("cifar10_vgg7_binaryduo", ["coupled (coupled)",
                                                       "finetune: before fine-tune",
                                                       "finetune (decoupled)"])):
        found = by_recipe.pop(f"{recipe}-smoke")
        assert [r["stage"] for r in found] == stages
        mlflow_runs = stage_runs(store, recipe)
        for row in found:
            assert row["dataset"] == "CIFAR-10" and row["model"] == "vgg7"
            assert row["method"] == ("BNN" if recipe.endswith("bnn") else "BinaryDuo")
            assert row["weight_bits"] == 32 and row["world_size"] == 1 and row["smoke"] is True
            run = mlflow_runs[row["stage"].split(" ")[0].rstrip(":")]
            metrics, tags = run.data.metrics, run.data.tags
            assert row["run_id"] == run.info.run_id
            assert row["mbit"] == metrics["mbit"] and row["mflops"] == metrics["mflops"]
            assert row["code_version"] == tags["code_version"]
            assert row["hardware"] == tags["hardware"]
            if "before fine-tune" in row["stage"]:
                assert row["top1"] == metrics["decouple_decoupled_val_top1"]
                assert row["epochs"] == 0
                continue
            assert row["top1"] == metrics["val_top1"] and row["top5"] == metrics["val_top5"]
            assert row["best_top1"] == metrics["best_val_top1"]
            assert row["epochs"] == row["planned_epochs"] == 1  # --smoke: one epoch per stage
            seconds = (run.info.end_time - run.info.start_time) / 1000
            assert row["wall_seconds"] == pytest.approx(seconds)
            assert 0 < row["wall_seconds"] < store_age(store)
            assert row["images_per_second"] == metrics["images_per_second"]  # one epoch
    assert not by_recipe  # nothing else in the table
    # the decoupled model before fine-tuning scores what the coupled one scored (exactness)
    duo = [r for r in runs if r["recipe"] == "cifar10_vgg7_binaryduo-smoke"]
    assert duo[1]["top1"] == stage_runs(store, "cifar10_vgg7_binaryduo")["finetune"] \
        .data.metrics["decouple_coupled_val_top1"]
    # the paper's CIFAR-10 VGG-7 rows come first; no ImageNet rows for a CIFAR-only store
    paper = [r for r in rows if r["source"] == "paper"]
    assert [(r["method"], r["top1"]) for r in paper] == [("BNN", 89.07), ("BinaryDuo", 90.44)]
    assert rows[:2] == paper


def store_age(store) -> float:
    import time
    return time.time() - store.created


def test_markdown_and_csv(store, compare):
    markdown = compare(store, "--include-smoke", *CIFAR_FP).stdout
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:7] == ["dataset", "model", "method", "W bits", "stage", "top-1", "top-5"]
    assert "*89.07*" in lines[2] and "*90.44*" in lines[3]
    finetune = stage_runs(store, "cifar10_vgg7_binaryduo")["finetune"].data.metrics
    row = next(line for line in lines if "finetune (decoupled)" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{finetune['val_top1']:.2f}" and cells[8] == f"{finetune['mbit']:.2f}"
    assert cells[-1] == "cifar10_vgg7_binaryduo-smoke (smoke)"
    table = list(csv.DictReader(io.StringIO(compare(store, "--include-smoke",
                                                    "--format", "csv", *CIFAR_FP).stdout)))
    bnn = next(r for r in table if r["stage"] == "bnn (bnn)")
    assert float(bnn["top1"]) == stage_runs(store, "cifar10_vgg7_bnn")["bnn"] \
        .data.metrics["val_top1"]


def test_filters_latest_and_smoke_default(store, compare):
    only = json.loads(compare(store, "--include-smoke", "--format", "json",
                              "--filter", "tags.recipe = 'cifar10_vgg7_bnn-smoke'").stdout)
    assert {r["recipe"] for r in only if r["source"] == "run"} == {"cifar10_vgg7_bnn-smoke"}
    by_param = json.loads(compare(store, "--include-smoke", "--format", "json",
                                  "--filter", "params.`stages.0.variant` = 'coupled'",
                                  *CIFAR_FP, "--no-paper").stdout)
    assert {r["recipe"] for r in by_param} == {"cifar10_vgg7_binaryduo-smoke"}
    latest = json.loads(compare(store, "--include-smoke", "--latest",
                                "--format", "json", *CIFAR_FP).stdout)
    assert len([r for r in latest if r["source"] == "run"]) == 4   # 1 BNN + 3 BinaryDuo rows
    # smoke runs are not results: left out by default, with a note; the paper rows remain
    default = compare(store, "--format", "json")
    rows = json.loads(default.stdout)
    assert rows and all(r["source"] == "paper" for r in rows)
    assert "--include-smoke" in default.stderr


def test_plot(store, run_binaryduo, tmp_path):
    out = tmp_path / "compare.png"
    result = run_binaryduo("compare", "--tracking-uri", store.uri, "--include-smoke",
                           "--plot", out, *CIFAR_FP, cwd=tmp_path)
    assert "cifar10_vgg7_binaryduo-smoke" in result.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image
    with Image.open(out) as image:
        assert image.size[0] > image.size[1] > 300


@pytest.mark.parametrize("case, message", [
    ("experiment", "no MLflow experiment 'nope'"),
    ("filter", "--filter"),
    ("plot-dir", "does not exist"),
    ("plot-suffix", "expected a .png"),
    ("store", "no MLflow store"),
    ("format", "invalid choice"),
])
def test_bad_input(store, compare, run_binaryduo, tmp_path, case, message):
    args = {"experiment": ["--experiment", "nope", "--plot", tmp_path / "p.png"],
            "filter": ["--filter", "tags.recipe === 'x'", "--plot", tmp_path / "p.png"],
            "plot-dir": ["--plot", tmp_path / "missing" / "p.png"],
            "plot-suffix": ["--plot", tmp_path / "p.pdf"],
            "store": ["--plot", tmp_path / "p.png"],
            "format": ["--format", "xlsx"]}[case]
    uri = f"sqlite:///{tmp_path / 'none.db'}" if case == "store" else store.uri
    if case == "store":  # in a real process once
        result = run_binaryduo("compare", "--tracking-uri", uri, *args, cwd=tmp_path, check=False)
    else:
        result = compare(uri, *args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: "), lines
    assert message in lines[0]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []   # no plot, no store created


def test_demo_table_reads_through_compare(store, tmp_path):
    """demo.py's table uses compare's reader: it finds no finished non-smoke demo run here."""
    from binaryduo.trainer.cli.demo import demo_table
    with pytest.raises(RuntimeError, match="no finished MLflow run of recipe"):
        demo_table(store.uri)
    assert re.search("cifar10", " ".join(p.name for p in (store.root / "runs").iterdir()))


def test_latest_running_runs_and_dataset_names(tmp_path, compare):
    """A store written through the trainer's own Tracker (the calls the stage runner makes): two runs of
    one recipe, the second still running after 2 of 5 epochs. --latest keeps the newer one; the
    row says epochs 2/5 and that it is running."""
    import time

    from binaryduo.trainer.tracking.tracker import Tracker
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "binaryduo", enabled=True)
    ids = []
    for finished_epochs, done in ((5, True), (2, False)):
        tags = {"recipe": "imagenet_alexnet_bnn", "smoke": "false", "world_size": "8",
                "hardware": "NVIDIA H100 80GB HBM3", "code_version": "0123456789abcdef0123"}
        parent = tracker.start_run("imagenet_alexnet_bnn", tags=tags)
        tracker.log_params(parent, {"model.name": "alexnet", "model.options.weight_bits": "1",
                                    "data.preset": "imagenet"})
        stage = tracker.start_run("bnn", parent=parent, tags={**tags, "stage": "bnn",
                                                              "variant": "bnn"})
        tracker.log_params(stage, {"stage_index": 0, "stage.epochs": 5})
        for epoch in range(1, finished_epochs + 1):
            tracker.log_metrics(stage, {"val_top1": 10.0 * epoch + done, "val_top5": 20.0 * epoch,
                                        "images_per_second": 4000.0 + epoch}, step=epoch)
        if done:
            tracker.log_metrics(stage, {"best_val_top1": 51.0, "mbit": 191.07, "mflops": 125.54},
                                step=5)
            tracker.finish(stage)
            tracker.finish(parent)
        ids.append(stage)
        time.sleep(0.05)
    rows = json.loads(compare(uri, "--format", "json", "--no-paper", cwd=tmp_path).stdout)
    assert [r["run_id"] for r in rows] == ids
    rows = json.loads(compare(uri, "--format", "json", "--latest", cwd=tmp_path).stdout)
    paper = [r for r in rows if r["source"] == "paper"]
    assert {r["method"] for r in paper} == {"BNN", "XNOR-Net", "BNN+", "BinaryDuo"}  # AlexNet
    (running,) = [r for r in rows if r["source"] == "run"]
    assert running["run_id"] == ids[1] and running["status"] == "RUNNING"
    assert running["dataset"] == "ImageNet" and running["world_size"] == 8
    assert (running["epochs"], running["planned_epochs"]) == (2, 5)
    assert running["top1"] == 20.0 and running["images_per_second"] == 4001.5  # median
    assert running["best_top1"] == 20.0 and running["mbit"] is None
    markdown = compare(uri, "--latest", "--no-paper", cwd=tmp_path).stdout
    row = next(line for line in markdown.splitlines() if "bnn (bnn)" in line)
    assert "| 2/5 |" in row and "8 x NVIDIA H100 80GB HBM3" in row
    assert "0123456789ab |" in row and "(running)" in row


def test_a_stage_with_its_own_weight_bits_is_its_own_w_bits(tmp_path, compare):
    """Two-step weights and an FP teacher stage: each row's W bits is its stage's ``weight_bits``
    (logged as the stage run's ``stage.weight_bits``), the model's where the stage has none."""
    from binaryduo.trainer.tracking.tracker import Tracker
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "binaryduo", enabled=True)
    tags = {"recipe": "fashion_mnist_vgg7_binaryduo_kd", "smoke": "false"}
    parent = tracker.start_run("fashion_mnist_vgg7_binaryduo_kd", tags=tags)
    tracker.log_params(parent, {"model.name": "vgg7", "model.options.weight_bits": "1"})
    for index, (name, variant, bits) in enumerate((("teacher", "fp", "32"),
                                                   ("coupled", "coupled", "None"))):
        stage = tracker.start_run(name, parent=parent, tags={**tags, "stage": name,
                                                             "variant": variant})
        tracker.log_params(stage, {"stage_index": index, "stage.epochs": 1,
                                   "stage.weight_bits": bits})
        tracker.log_metrics(stage, {"val_top1": 50.0 + index}, step=1)
        tracker.finish(stage)
    tracker.finish(parent)
    rows = json.loads(compare(uri, "--format", "json", "--no-paper", cwd=tmp_path).stdout)
    assert {r["stage"]: r["weight_bits"] for r in rows} == {"teacher (fp)": 32,
                                                            "coupled (coupled)": 1}
