"""The system-metrics sampler (trainer/tracking/system_metrics.py): MLflow's collectors, our
thread, the journal. An offline Tracker keeps every record in the run directory's journal, so
these tests need no server (the REST test in test_smoke_and_server.py reads a real one)."""
import time

import pytest
import yaml

from binaryduo.trainer.recipe import Recipe
from binaryduo.trainer.tracking.system_metrics import PREFIX, SystemMetrics
from binaryduo.trainer.tracking.tracker import Tracker


@pytest.fixture
def tracker(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "binaryduo", enabled=True,
                      journal_dir=tmp_path / "run", offline=True)
    yield tracker
    tracker.close()


def system_points(tracker, run_id):
    return [r for r in tracker.journal.records.values()
            if r["op"] == "log_metrics" and r["run_id"] == run_id
            and all(k.startswith(PREFIX) for k in r["metrics"])]


def test_points_go_to_the_parent_and_the_running_stage_under_mlflow_names(tracker):
    parent = tracker.start_run("recipe")
    stage = tracker.start_run("stage", parent=parent)
    sampler = SystemMetrics(tracker, 0.25)
    with sampler.sampling(parent):
        time.sleep(0.6)  # two points into the parent
        sampler.follow(stage)
        time.sleep(0.35)
        sampler.follow(parent)
        time.sleep(0.1)
    assert sampler.failure is None and not sampler._thread
    on_parent, on_stage = system_points(tracker, parent), system_points(tracker, stage)
    # the parent has every point (the whole job), the stage the ones of its own time
    assert len(on_stage) >= 1 and len(on_parent) >= len(on_stage) + 2
    assert {p["seq"] - 1 for p in on_stage} <= {p["seq"] for p in on_parent}  # logged in pairs
    assert [p["metrics"] for p in on_stage] == [
        p["metrics"] for p in on_parent if p["seq"] + 1 in {q["seq"] for q in on_stage}]
    for points in (on_parent, on_stage):
        assert [p["step"] for p in points] == list(range(len(points)))  # per run, from 0
    metrics = on_stage[-1]["metrics"]
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes",
                 "system_memory_usage_percentage", "disk_usage_percentage",
                 "network_receive_megabytes"):
        assert PREFIX + name in metrics
    assert 0.0 <= metrics[PREFIX + "cpu_utilization_percentage"] <= 100.0
    assert metrics[PREFIX + "system_memory_usage_megabytes"] > 0
    # the cost of one sample: a few milliseconds of the sampler's own CPU time at most
    assert sampler.samples >= 5 and sampler.cpu_seconds / sampler.samples < 0.02


def test_a_resumed_run_continues_its_steps(tracker):
    run = tracker.start_run("recipe")
    first = SystemMetrics(tracker, 0.2)
    with first.sampling(run):
        time.sleep(0.3)
    steps = [p["step"] for p in system_points(tracker, run)]
    second = SystemMetrics(tracker, 0.2)  # a new process after a preemption: same journal
    with second.sampling(run):
        time.sleep(0.15)  # stopped before its first period: the stop's sample is its one point
    resumed = [p["step"] for p in system_points(tracker, run)]
    assert resumed == steps + [steps[-1] + 1]


class BrokenMonitor:
    def collect_metrics(self):
        raise OSError("no /proc here")


def test_a_failing_collector_stops_the_thread_with_one_warning(tracker, capsys):
    run = tracker.start_run("recipe")
    sampler = SystemMetrics(tracker, 0.1, monitors=[BrokenMonitor()])
    with sampler.sampling(run):
        time.sleep(0.3)
        assert not sampler._thread.is_alive()  # stopped by itself, the caller untouched
    assert "OSError: no /proc here" in sampler.failure
    assert capsys.readouterr().err.count("system metrics stopped") == 1
    assert system_points(tracker, run) == []
    tracker.log_metrics(run, {"train_loss": 1.0}, step=1)  # the Tracker still works


def test_switched_off_or_a_disabled_tracker_starts_no_thread(tracker, tiny_recipe_text):
    run = tracker.start_run("recipe")
    off = SystemMetrics.for_recipe(
        recipe(tiny_recipe_text, system_metrics=False).logging, tracker)
    other_rank = SystemMetrics(Tracker("sqlite:///x.db", "binaryduo", enabled=False), 1.0)
    for sampler in (off, other_rank):
        with sampler.sampling(run):
            assert sampler._thread is None
    assert system_points(tracker, run) == []


def recipe(text, **logging):
    data = yaml.safe_load(text)
    data["logging"].update(logging)
    return Recipe.model_validate(data)


def test_the_switch_is_a_later_key_leaving_old_recipes_identity_alone(tiny_recipe_text):
    plain = recipe(tiny_recipe_text)
    assert plain.logging.system_metrics and plain.logging.system_metrics_interval_s == 10.0
    assert "system_metrics" not in plain.identity()["logging"]
    off = recipe(tiny_recipe_text, system_metrics=False, system_metrics_interval_s=30)
    assert off.identity()["logging"]["system_metrics"] is False
    assert off.identity()["logging"]["system_metrics_interval_s"] == 30.0
    with pytest.raises(ValueError):
        recipe(tiny_recipe_text, system_metrics_interval_s=0.1)


def test_no_nvidia_driver_here_means_no_gpu_collector_and_one_note(capsys):
    """nvidia-ml-py is a dependency; on this CPU machine NVML cannot start (no driver), so the
    collectors are CPU, disk and network, and a run that expected a GPU says why in one line."""
    import pynvml  # noqa: F401  (installed with binaryduo)

    from binaryduo.trainer.tracking.system_metrics import default_monitors
    try:
        pynvml.nvmlInit()
        pytest.skip("an NVIDIA driver answers here")
    except pynvml.NVMLError:
        pass
    names = [type(m).__name__ for m in default_monitors(gpu_expected=True)]
    assert names == ["CPUMonitor", "DiskMonitor", "NetworkMonitor"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no GPU system metrics" in err and "NVIDIA: " in err


class StandInNVML:
    """NVML as the ``pynvml`` module answers on a node with two GPUs (this machine has none): the
    calls MLflow's GPUMonitor makes, with fixed readings."""

    class NVMLError(Exception):
        pass

    class Memory:
        used, total = 30e9, 80e9

    class Utilization:
        gpu = 87

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self.Memory()

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self.Utilization()

    def nvmlDeviceGetPowerUsage(self, handle):
        return 350_000 + 1000 * handle  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000


def test_gpu_readings_reach_the_run_under_mlflow_names(tracker, monkeypatch):
    """With NVML answering (a stand-in: no GPU here), default_monitors adds MLflow's own
    GPUMonitor and its readings of every GPU go to the run through the journal, averaged."""
    import sys

    from mlflow.system_metrics.metrics import gpu_monitor

    from binaryduo.trainer.tracking.system_metrics import default_monitors
    nvml = StandInNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpu_monitor, "pynvml", nvml, raising=False)
    monitors = default_monitors(gpu_expected=True)
    assert [type(m).__name__ for m in monitors][-1] == "GPUMonitor"
    run = tracker.start_run("recipe")
    sampler = SystemMetrics(tracker, 0.2, monitors=monitors)
    with sampler.sampling(run):
        time.sleep(0.3)
    assert sampler.failure is None
    metrics = system_points(tracker, run)[-1]["metrics"]
    for gpu in (0, 1):
        assert metrics[f"{PREFIX}gpu_{gpu}_utilization_percentage"] == 87
        assert metrics[f"{PREFIX}gpu_{gpu}_memory_usage_megabytes"] == 30e3
        assert metrics[f"{PREFIX}gpu_{gpu}_memory_usage_percentage"] == 37.5
        assert metrics[f"{PREFIX}gpu_{gpu}_power_usage_watts"] == 350 + gpu
    assert PREFIX + "cpu_utilization_percentage" in metrics
