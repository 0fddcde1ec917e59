#!/usr/bin/env python
"""System-metrics overhead (issue 19): what the sampler thread of
``binaryduo.trainer.tracking.system_metrics`` costs a training.

1. **The sampler's own cost**, in this process: MLflow's collectors (CPU and memory, disk,
   network; GPU where NVML answers) sampled ``--samples`` times, timed in the thread's CPU time,
   and ``--points`` points journaled through an offline Tracker (a JSON line each). From these,
   the share of one core it takes at the default interval (10 s, 5 samples per point).
2. **A tiny training with and without** (``--runs N`` each, alternating, ``--interval`` seconds,
   default 1: ten times denser than the default): the tiny two-stage recipe of the tests
   (Fashion-MNIST, VGG-7 at quarter width), its ``epoch_seconds`` read back from MLflow; the
   medians are compared and the final weights checked bit for bit (the thread only reads
   operating-system counters). On a shared machine this is noisy; (1) is the precise number.

A report, not a test: it exits 0. Run:
    .venv/bin/python benchmarks/system_metrics_overhead.py [--samples 200] [--runs 3]
        [--interval 1] [--skip-training]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("binaryduo")


def sampler_cost(samples: int, points: int) -> dict:
    from binaryduo.trainer.tracking.system_metrics import (PREFIX, SAMPLES_PER_LOG,
                                                           default_monitors)
    from binaryduo.trainer.tracking.tracker import Tracker

    monitors = default_monitors()
    start = time.thread_time()
    for _ in range(samples):
        for monitor in monitors:
            monitor.collect_metrics()
    per_sample = (time.thread_time() - start) / samples
    metrics = {}
    for monitor in monitors:
        metrics.update(monitor.aggregate_metrics())
    per_point = {}
    for offline in (True, False):  # journaled only; journaled and sent to a sqlite store
        with tempfile.TemporaryDirectory() as tmp:
            tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench", enabled=True,
                              journal_dir=Path(tmp) / "run", offline=offline)
            run = tracker.start_run("bench")
            start = time.thread_time()
            for step in range(points):
                tracker.log_metrics(run, {PREFIX + k: v for k, v in metrics.items()}, step)
            per_point[offline] = (time.thread_time() - start) / points
            tracker.close()
    per_interval = SAMPLES_PER_LOG * per_sample + per_point[False]
    return {"monitors": [type(m).__name__ for m in monitors], "per_sample_ms": per_sample * 1e3,
            "per_point_ms": per_point[True] * 1e3, "per_sent_point_ms": per_point[False] * 1e3,
            "core_share_at_10s": per_interval / 10.0, "metrics": len(metrics)}


def tiny_training(runs: int, interval: float) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_RECIPE  # the tests' tiny two-stage recipe
    from mlflow.tracking import MlflowClient

    from binaryduo.data.prepare import prepare_fashion_mnist

    root = Path(tempfile.mkdtemp(prefix="binaryduo-sysmetrics-"))
    prepare_fashion_mnist(root / "data")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("DATA", str(root / "data")))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    client = MlflowClient(uri)
    for index in range(runs):
        for side in (("on", "off") if index % 2 == 0 else ("off", "on")):
            out = root / f"{side}{index}"
            switch = ("logging.system_metrics=true" if side == "on"
                      else "logging.system_metrics=false")
            subprocess.run([str(BIN), "train", str(recipe), "--output", str(out), "--tracking-uri",
                            uri, "--set", switch, "--set",
                            f"logging.system_metrics_interval_s={interval}"],
                           check=True, capture_output=True, env=env, cwd=root)
            experiment = client.get_experiment_by_name("binaryduo").experiment_id
            for run in client.search_runs([experiment], "tags.stage != ''"):
                if run.info.run_id in (out / "run_state.json").read_text():
                    seconds[side] += [m.value for m in client.get_metric_history(
                        run.info.run_id, "epoch_seconds")]
    identical = _same_weights(root / "on0", root / "off0")
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    return {"epochs": {k: len(v) for k, v in seconds.items()}, "median_on_s": on,
            "median_off_s": off, "ratio": on / off, "bitwise_identical": identical}


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    files = sorted(p.relative_to(a) for p in (a / "checkpoints").rglob("model_state.pt"))
    return bool(files) and all(
        all(torch.equal(x, y) for x, y in zip(
            torch.load(a / f, weights_only=True).values(),
            torch.load(b / f, weights_only=True).values())) for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {os.cpu_count()} cores")
    cost = sampler_cost(args.samples, args.points)
    print(f"sampler: {', '.join(cost['monitors'])}: {cost['metrics']} metrics; "
          f"{cost['per_sample_ms']:.2f} ms CPU per sample, {cost['per_point_ms']:.2f} ms per "
          f"point journaled offline, {cost['per_sent_point_ms']:.2f} ms journaled and sent to a "
          f"sqlite store; {cost['core_share_at_10s'] * 100:.3f} % of one core at the default "
          f"10 s interval (5 samples and one sent point)")
    if not args.skip_training:
        result = tiny_training(args.runs, args.interval)
        print(f"tiny training, {args.runs} runs each side, interval {args.interval:g} s: epoch "
              f"median {result['median_on_s']:.3f} s with, {result['median_off_s']:.3f} s "
              f"without ({result['epochs']['on']} / {result['epochs']['off']} epochs): "
              f"ratio {result['ratio']:.3f}; final weights bitwise identical: "
              f"{result['bitwise_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
