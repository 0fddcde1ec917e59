"""Multi-process training with real launchers (torchrun, the deepspeed launcher) on 2 gloo ranks:
same result as one rank with the same global batch, one MLflow record, preemption with resume,
and a failing rank that fails the job promptly. (``srun`` is tested in tests/slurm.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch


pytestmark = pytest.mark.slow

BIN_DIR = Path(sys.executable).parent
RECIPE_ARGS: list[str] = []  # the tiny recipe as is: 2 coupled + 1 fine-tune epochs of 16 steps


def _free_port() -> int:
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "MLFLOW_TRACKING_URI", "BINARYDUO_FAULT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _launch(launcher: str, recipe: Path, out: Path, uri: str, *extra, fault: str | None = None,
            resume: bool = False, timeout: int = 420) -> subprocess.CompletedProcess:
    port = str(_free_port())
    target = ["train", str(recipe), *RECIPE_ARGS, "--tracking-uri", uri,
              *(["--resume", str(out)] if resume else ["--output", str(out)]), *extra]
    if launcher == "torchrun":
        command = [str(BIN_DIR / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
                   "-m", "binaryduo.trainer.cli", *target]
    elif launcher == "deepspeed":
        command = [str(BIN_DIR / "deepspeed"), "--num_gpus", "2", "--no_local_rank",
                   "--master_port", port, "--module", "binaryduo.trainer.cli", *target]
    else:
        raise ValueError(launcher)
    # PATH stays as it is: DeepSpeed's CPU op is rebuilt whenever the build environment changes
    env = _env(**({"BINARYDUO_FAULT": fault} if fault else {}))
    return subprocess.run(command, cwd=out.parent, env=env, text=True, capture_output=True,
                          timeout=timeout)


FP_RECIPE = """\
name: tiny-fp
seed: 3
model:
  name: vgg7
  options: {width_mult: 0.25, num_classes: 10, in_channels: 1}
data: {root: DATA, preset: small, channels: 1, batch_size: 64, train_subset: 256, val_subset: 101}
logging: {every_steps: 1}
stages:
  - {name: fp, variant: fp, epochs: 2, optimizer: {lr: 0.05}, schedule: {kind: cosine}}
"""


def _last_model(out: Path, stage: str) -> dict:
    manifest = (out / "checkpoints" / stage / "manifest.json")
    import json
    tag = json.loads(manifest.read_text())["epochs"][-1]["tag"]
    return torch.load(out / "checkpoints" / stage / tag / "model_state.pt", weights_only=True)


def _record(uri: str, out: Path, last_stage: str) -> dict:
    """Per stage: the val_top1, train_loss and val_loss histories from MLflow; final weights."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("binaryduo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    record = {"parents": len(parents), "stages": {}}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            name = run.data.tags["stage"]
            record["stages"][name] = {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                for key in ("val_top1", "train_loss", "val_loss")}
    record["weights"] = _last_model(out, last_stage)
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist, tiny_recipe_text, run_binaryduo):
    """A full-precision recipe on 1 process and on 2 torchrun ranks (same global batch 64), and
    the tiny BinaryDuo recipe (coupled -> decouple -> fine-tune) on 2 torchrun ranks."""
    root = tmp_path_factory.mktemp("launchers")
    fp, duo = root / "fp.yaml", root / "duo.yaml"
    fp.write_text(FP_RECIPE.replace("DATA", str(fashion_mnist)))
    duo.write_text(tiny_recipe_text.replace("DATA", str(fashion_mnist)))
    result = {"fp": fp, "duo": duo, "root": root}
    uri = f"sqlite:///{root}/one.db"
    run_binaryduo("train", fp, "--tracking-uri", uri, "--output", root / "one", cwd=root,
                   env=_env())
    result["one"] = _record(uri, root / "one", "fp")
    uri = f"sqlite:///{root}/two.db"
    done = _launch("torchrun", fp, root / "two", uri)
    assert done.returncode == 0, done.stderr[-4000:]
    result["two"] = _record(uri, root / "two", "fp")
    uri = f"sqlite:///{root}/local_bn.db"  # control: per-rank BN statistics
    done = _launch("torchrun", fp, root / "local_bn", uri, "--set",
                   "deepspeed.sync_batchnorm=false")
    assert done.returncode == 0, done.stderr[-4000:]
    result["local_bn"] = _record(uri, root / "local_bn", "fp")
    uri = f"sqlite:///{root}/duo.db"
    started = time.perf_counter()
    done = _launch("torchrun", duo, root / "duo", uri)
    assert done.returncode == 0, done.stderr[-4000:]
    result["duo_seconds"] = time.perf_counter() - started
    result["duo_record"] = _record(uri, root / "duo", "finetune")
    return result


def _max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-6))
               for k in a if a[k].is_floating_point() and k.endswith("weight"))


def test_two_torchrun_ranks_match_one_rank_with_the_same_global_batch(runs):
    """Global-batch-major shards, per-sample augmentation and global-batch BN statistics: two
    ranks train the one-rank model up to reduction order. Full precision, 8 steps: early
    training amplifies rounding differences (a one-rank run with 2 threads instead of 1 drifts
    by ~1e-4 relative in 4 steps), and binary activations would add threshold flips on top."""
    one, two, local = runs["one"], runs["two"], runs["local_bn"]
    assert one["parents"] == two["parents"] == 1  # one parent run (rank 0 logs), its stages
    assert set(two["stages"]) == {"fp"}
    for key in ("train_loss", "val_loss", "val_top1"):
        a, b = one["stages"]["fp"][key], two["stages"]["fp"][key]
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
        for (_, x), (_, y) in zip(a, b):
            assert y == pytest.approx(x, rel=1e-3, abs=1e-6), (key, a, b)
    same = _max_relative_difference(one["weights"], two["weights"])
    assert same < 5e-3, same
    # the control: per-rank BN statistics give a different model, far beyond rounding
    different = _max_relative_difference(one["weights"], local["weights"])
    assert different > 10 * same, (same, different)


def test_deepspeed_launcher_gives_the_torchrun_result_bit_for_bit(runs):
    root = runs["root"]
    uri = f"sqlite:///{root}/ds.db"
    done = _launch("deepspeed", runs["fp"], root / "ds", uri)
    assert done.returncode == 0, done.stderr[-4000:]
    ds = _record(uri, root / "ds", "fp")
    assert ds["parents"] == 1
    assert ds["stages"] == runs["two"]["stages"]
    for name, tensor in runs["two"]["weights"].items():
        assert torch.equal(ds["weights"][name], tensor), name


def test_preempted_rank_checkpoints_mid_epoch_and_resume_is_bitwise(runs):
    """SIGUSR1 reaches rank 1 only, after step 5 of the coupled stage: both ranks stop at the same
    step, write a mid-epoch checkpoint, exit 75; a resume ends bit-identical to the
    uninterrupted 2-rank run, in the same MLflow runs."""
    root = runs["root"]
    uri = f"sqlite:///{root}/pre.db"
    out = root / "pre"
    stopped = _launch("torchrun", runs["duo"], out, uri, fault="signal:USR1:1:coupled:1:5")
    assert stopped.returncode != 0
    assert "binaryduo: preempted: checkpoint at stage 'coupled', epoch 1, step 5" in stopped.stderr
    manifest = (out / "checkpoints" / "coupled" / "manifest.json").read_text()
    assert "epoch-0000-step-000005" in manifest
    resumed = _launch("torchrun", runs["duo"], out, uri, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    record = _record(uri, out, "finetune")
    assert record["parents"] == 1
    assert record["stages"] == runs["duo_record"]["stages"]
    for name, tensor in runs["duo_record"]["weights"].items():
        assert torch.equal(record["weights"][name], tensor), name


def test_a_failing_rank_fails_the_job_promptly_with_its_error(runs):
    root = runs["root"]
    started = time.perf_counter()
    failed = _launch("torchrun", runs["duo"], root / "fail", f"sqlite:///{root}/fail.db",
                     fault="error:1:finetune:1", timeout=300)
    seconds = time.perf_counter() - started
    assert failed.returncode != 0
    assert "injected fault on rank 1 in stage 'finetune' epoch 1" in failed.stderr
    assert "binaryduo: rank 1/2 failed" in failed.stderr
    # it fails when rank 1 does, not after a collective timeout: well within the healthy run
    assert seconds < runs["duo_seconds"] + 60, seconds


def _stopped_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("binaryduo: run stopped")]


def test_nan_on_one_rank_stops_both_ranks_in_the_same_step(runs):
    """Rank 1 alone diverges (weights poisoned after step 3 of epoch 2); the per-step check is
    agreed by all ranks, so both stop before step 4's backward pass instead of one of them
    waiting in the gradient all-reduce."""
    root = runs["root"]
    started = time.perf_counter()
    # per-rank BatchNorm statistics: with the default global ones rank 1's NaN activations
    # reach rank 0's forward pass too, and both would see a NaN loss themselves
    failed = _launch("torchrun", runs["fp"], root / "nan", f"sqlite:///{root}/nan.db",
                     "--set", "deepspeed.sync_batchnorm=false", fault="nan:fp:2:3:1",
                     timeout=300)
    assert failed.returncode != 0
    assert time.perf_counter() - started < runs["duo_seconds"] + 60  # no collective time-out
    lines = _stopped_lines(failed)
    assert len(lines) == 2, failed.stderr[-3000:]
    assert any("training loss is nan at step 4 of the epoch" in line for line in lines)
    assert any("not finite on another rank at step 4 of the epoch" in line for line in lines)
    assert all("stage 'fp' epoch 2" in line and "epoch-0001 is kept" in line for line in lines)
    manifest = json.loads((root / "nan" / "checkpoints" / "fp" / "manifest.json").read_text())
    assert manifest["latest"] == "epoch-0001"


def test_a_checkpoint_write_failing_on_rank_0_stops_both_ranks(runs):
    root = runs["root"]
    failed = _launch("torchrun", runs["fp"], root / "full", f"sqlite:///{root}/full.db",
                     fault="disk_full:fp:2", timeout=300)
    assert failed.returncode != 0
    lines = _stopped_lines(failed)
    assert len(lines) == 2, failed.stderr[-3000:]
    assert any("No space left on device" in line for line in lines)
    assert any("another rank could not write its part" in line for line in lines)
    assert all("the previous checkpoint epoch-0001 is intact" in line for line in lines)
    stage = root / "full" / "checkpoints" / "fp"
    assert sorted(p.name for p in stage.iterdir()) == ["epoch-0001", "manifest.json"]
