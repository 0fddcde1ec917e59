"""Health metrics in real runs (issue 17): present in the tiny BinaryDuo run's MLflow record, every
epoch of every stage, with values that make sense; the same with health off except for them
(bitwise equal weights); a run preempted mid-epoch and resumed logs the same health values as the
uninterrupted one; on 2 gloo ranks the loop still reads the host once per step and every rank
gets the same, globally reduced metrics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("health_worker.py")
FINAL = (("coupled", "epoch-0002"), ("finetune", "epoch-0001"))


def health_history(db: Path, run: Path, prefix: str = "health/"
                   ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """stage -> health metric -> [(epoch, value)] from the run's MLflow record (``prefix``
    ``health_steps/``: [(global step, value)])."""
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = json.loads((run / "run_state.json").read_text())["stage_run_ids"]
    out = {}
    for stage, run_id in ids.items():
        keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(prefix)]
        out[stage] = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
                      for k in keys}
    return out


def test_health_metrics_are_in_the_record(tiny_straight_run):
    history = health_history(tiny_straight_run.db, tiny_straight_run.run)
    coupled, finetune = history["coupled"], history["finetune"]
    layers = [f"conv{i}" for i in range(1, 6)]
    for name in layers:   # ternary activations (coupled), binary after decoupling
        assert {f"health/{name}/{m}" for m in ("ste_coverage", "occupancy_0", "occupancy_0.5",
                                               "occupancy_1")} <= coupled.keys(), name
        assert f"health/{name}/occupancy_0.5" not in finetune
    for name in ("conv2", "conv3", "conv4", "conv5", "conv6"):  # binary-weight convs
        for metric in ("flip_ratio", "flip_ratio_step", "alpha", "grad_norm"):
            assert f"health/{name}/{metric}" in coupled and f"health/{name}/{metric}" in finetune
    assert "health/conv1/alpha" not in coupled  # the first conv stays full precision
    for stage, epochs in (("coupled", 2), ("finetune", 1)):
        for key, values in history[stage].items():
            assert [s for s, _ in values] == list(range(1, epochs + 1)), (stage, key)
            for _, value in values:
                if key.endswith(("ratio", "ratio_step", "coverage")) or "occupancy" in key:
                    assert 0.0 <= value <= 1.0, (key, value)
                else:
                    assert value > 0, (key, value)
        for name in layers:
            for epoch in range(epochs):
                total = sum(v[epoch][1] for k, v in history[stage].items()
                            if k.startswith(f"health/{name}/occupancy_"))
                assert total == pytest.approx(1.0, abs=1e-12), (stage, name)
    # every logging.every_steps (4; an epoch is 16 steps, a stage's steps count from 0): the
    # epoch so far, which at the epoch's last step is the epoch's value
    steps = health_history(tiny_straight_run.db, tiny_straight_run.run, "health_steps/")
    assert {k.replace("health/", "health_steps/") for k in coupled} == steps["coupled"].keys()
    for stage, epochs in (("coupled", 2), ("finetune", 1)):
        for key, values in steps[stage].items():
            assert [s for s, _ in values] == list(range(4, 16 * epochs + 1, 4))
            epoch_key = key.replace("health_steps/", "health/")
            for epoch in range(epochs):
                assert dict(values)[16 * (epoch + 1)] == \
                    history[stage][epoch_key][epoch][1], (stage, key)
    flips = dict(steps["coupled"]["health_steps/conv3/flip_ratio"])
    assert flips[4] < flips[16]  # flips since the epoch's start accumulate within it
    # a learning network: some weights flip, not most; activations neither dead nor saturated
    for key, values in coupled.items():
        if key.endswith("/flip_ratio"):
            assert all(0 < v < 0.5 for _, v in values), key
        if key.endswith("/ste_coverage"):
            assert all(0.05 < v < 0.95 for _, v in values), key


def _copy_recipe(tiny_straight_run, tmp_path) -> Path:
    recipe = tmp_path / "tiny.yaml"
    shutil.copy(tiny_straight_run.recipe, recipe)
    return recipe


def test_health_off_trains_the_same_weights(tiny_straight_run, run_binaryduo, tmp_path):
    recipe = _copy_recipe(tiny_straight_run, tmp_path)
    run_binaryduo("train", recipe, "--output", "off", "--set", "health.enabled=false",
                  cwd=tmp_path)
    for stage, tag in FINAL:
        off = torch.load(tmp_path / "off" / "checkpoints" / stage / tag / "model_state.pt",
                         weights_only=True)
        on = torch.load(tiny_straight_run.run / "checkpoints" / stage / tag / "model_state.pt",
                        weights_only=True)
        assert all(torch.equal(on[k], off[k]) for k in on), stage
    assert not any(health_history(tmp_path / "mlflow.db", tmp_path / "off").values())


def test_a_resumed_epoch_logs_the_same_health(tiny_straight_run, run_binaryduo, tmp_path):
    """Preempted after step 6 of the first coupled epoch and after step 5 of the fine-tuning
    epoch (the decoupled stage's first epoch: its flip reference is the decoupled start), then
    resumed: every health value equals the uninterrupted run's."""
    recipe = _copy_recipe(tiny_straight_run, tmp_path)
    for flag, fault in (("--output", "signal:TERM:0:coupled:1:6"),
                        ("--resume", "signal:TERM:0:finetune:1:5")):
        stopped = run_binaryduo("train", recipe, flag, "run", cwd=tmp_path, check=False,
                                env={"BINARYDUO_FAULT": fault})
        assert stopped.returncode == 75, stopped.stderr[-3000:]
    run_binaryduo("train", recipe, "--resume", "run", cwd=tmp_path)
    for prefix in ("health/", "health_steps/"):
        _same_health(health_history(tmp_path / "mlflow.db", tmp_path / "run", prefix),
                     health_history(tiny_straight_run.db, tiny_straight_run.run, prefix))


def _same_health(resumed, straight) -> None:
    assert resumed.keys() == straight.keys()
    for stage in straight:
        assert resumed[stage].keys() == straight[stage].keys(), stage
        different = {k: (resumed[stage][k], v) for k, v in straight[stage].items()
                     if resumed[stage][k] != v}
        assert not different, (stage, different)


def test_health_reads_the_host_once_per_epoch_on_two_ranks(tmp_path, fashion_mnist,
                                                            torchrun_worker):
    ranks = torchrun_worker(WORKER, 2, "syncs", fashion_mnist, tmp_path / "h", out=tmp_path / "h")
    for rank, result in enumerate(ranks):
        short, long = result["2"]["reads"], result["4"]["reads"]
        assert (len(long) - len(short)) / 2 == 1, (rank, short, long)  # the stop decision only
        assert len(short) - 2 == 1, (rank, short)                     # + the epoch's loss sum
        assert len(result["4"]["epoch_end"]) == 1, result["4"]["epoch_end"]  # one all-reduce
        # health every 2 steps: one more all-reduce and host read per logging step, no other
        logged = result["4-logged"]
        assert len(logged["reads"]) == len(long) + 2, (rank, long, logged["reads"])
        assert [s for s, _ in logged["logged"]] == [2, 4]
        assert logged["logged"][1][1]["health_steps/conv2/alpha"] == \
            logged["metrics"]["health/conv2/alpha"]
        assert not any(k.startswith("health") for _, m in result["4"]["logged"] for k in m)
    for steps in ("2", "4"):
        metrics = [r[steps]["metrics"] for r in ranks]
        assert metrics[0] and metrics[0] == metrics[1], steps  # globally reduced, on every rank
        assert metrics[0]["health/conv2/alpha"] > 0


def test_analyze_health_reads_the_record(tiny_straight_run, run_binaryduo, tmp_path):
    run = tiny_straight_run.run
    assert (run / "health.png").is_file()   # logged on the parent run at the end of training
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_straight_run.db}")
    parent = json.loads((run / "run_state.json").read_text())["parent_run_id"]
    assert "health.png" in [a.path for a in client.list_artifacts(parent)]
    plot = tmp_path / "h.png"
    table = run_binaryduo("analyze", "health", run, "--plot", plot, cwd=tiny_straight_run.root)
    assert plot.stat().st_size > 10_000
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "epoch", "layer"]
    assert sum(line.startswith("coupled ") for line in lines) == 2 * 6   # 2 epochs x 6 layers
    assert "level mismatch 0" in table.stdout    # the decoupling check batch, exact
    data = json.loads(run_binaryduo("analyze", "health", run, "--json", "--stage", "finetune",
                                    cwd=tiny_straight_run.root).stdout)
    assert [s["name"] for s in data["stages"]] == ["finetune"]
    transition = data["stages"][0]["transition"]
    for layer in ("conv1", "conv3", "conv5"):
        coupled = {k.split("_")[-1]: v for k, v in transition.items()
                   if k.startswith(f"coupled/{layer}/occupancy_")}
        # the pair of binary copies carries the ternary mean level exactly
        assert transition[f"decoupled/{layer}/occupancy_1"] == pytest.approx(
            coupled["0.5"] / 2 + coupled["1"], abs=1e-12)
    bad = run_binaryduo("analyze", "health", run, "--stage", "nope", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--stage nope" in bad.stderr


def test_a_bad_health_key_is_one_line_and_exit_2(tiny_straight_run, run_binaryduo, tmp_path):
    recipe = _copy_recipe(tiny_straight_run, tmp_path)
    for override in ("health.metrics=[flips]", "health.sample_every_steps=0", "health.on=true"):
        result = run_binaryduo("validate", recipe, "--set", override, cwd=tmp_path, check=False)
        assert result.returncode == 2, (override, result.stderr)
        assert "health." in result.stderr, (override, result.stderr)
