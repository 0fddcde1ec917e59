"""Multi-process training with real launchers (torchrun, the deepspeed launcher) on 2 gloo ranks:
same result as one rank with the same global batch, one MLflow record, preemption with resume,
and a failing rank that fails the job promptly. (``srun`` is tested in tests/slurm.)"""
from __future__ import annotations

import hashlib
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


_SEED_STORE = []


@pytest.fixture(scope="module", autouse=True)
def _empty_stores(tracking_store_seeder):
    """Launches into a new sqlite store start from an empty, migrated copy (tests/conftest.py)."""
    _SEED_STORE.append(tracking_store_seeder)
    yield
    _SEED_STORE.clear()


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
    for seed in _SEED_STORE:
        seed(["--tracking-uri", uri], out.parent)
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


def test_a_two_rank_run_preempted_mid_epoch_finishes_on_one_rank(runs, run_binaryduo):
    """ZeRO 0, --resume on another number of ranks: weights, optimizer state, the global step
    and the data order are world-size-free; the mid-epoch checkpoint's per-rank loss sums are
    re-derived (the interrupted epoch's train_loss still averages the global batch's) and each
    rank gets a fresh dropout stream. It ends where the uninterrupted 2-rank run ends, up to
    reduction order (the 2-vs-1-rank bound above)."""
    root = runs["root"]
    uri, out = f"sqlite:///{root}/moved.db", root / "moved"
    stopped = _launch("torchrun", runs["fp"], out, uri, fault="signal:USR1:1:fp:1:2")
    assert "binaryduo: preempted: checkpoint at stage 'fp', epoch 1, step 2" in stopped.stderr, \
        stopped.stderr[-4000:]
    resumed = run_binaryduo("train", runs["fp"], "--tracking-uri", uri, "--resume", out,
                            cwd=root, env=_env())
    notes = [line for line in resumed.stderr.splitlines()
             if line.startswith("binaryduo: note: stage 'fp' was stopped")]
    assert len(notes) == 1 and "step 2 of epoch 1 by 2 ranks and resumes on 1" in notes[0], \
        resumed.stderr[-3000:]
    two, moved = runs["two"], _record(uri, out, "fp")
    assert moved["parents"] == 1
    for key in ("train_loss", "val_loss", "val_top1"):
        want, got = two["stages"]["fp"][key], moved["stages"]["fp"][key]
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2], (key, got, want)
        for (_, x), (_, y) in zip(want, got):
            assert y == pytest.approx(x, rel=1e-3, abs=1e-6), (key, want, got)
    difference = _max_relative_difference(two["weights"], moved["weights"])
    assert difference < 5e-3, difference


def _files(directory: Path) -> dict[str, tuple]:
    """Every file and folder under ``directory``: size, modification time and SHA-256."""
    return {str(p.relative_to(directory)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns,
                                            None if p.is_dir() else
                                            hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*"))}


def test_zero1_resume_on_another_number_of_ranks_is_refused_before_any_compute(runs,
                                                                               run_binaryduo):
    """ZeRO 1 splits the optimizer state per rank: a resume on 1 rank of a 2-rank checkpoint is
    refused in one line naming both world sizes, exit 2, the run directory untouched."""
    root = runs["root"]
    uri, out, zero1 = f"sqlite:///{root}/zero1.db", root / "zero1", ("--set",
                                                                     "deepspeed.zero_stage=1")
    stopped = _launch("torchrun", runs["fp"], out, uri, *zero1, fault="signal:USR1:1:fp:1:1")
    assert "binaryduo: preempted: checkpoint at stage 'fp', epoch 1, step 1" in stopped.stderr, \
        stopped.stderr[-4000:]
    checkpoint = out / "checkpoints" / "fp" / "epoch-0000-step-000001"
    before = _files(out)
    refused = run_binaryduo("train", runs["fp"], *zero1, "--tracking-uri", uri, "--resume", out,
                            cwd=root, env=_env(), check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("binaryduo:")]
    assert len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("binaryduo: error: --resume ")
    assert f"checkpoint {checkpoint} was written by 2 ranks" in lines[0], lines
    assert "this run has 1; resume it on 2 ranks" in lines[0], lines
    assert "Traceback" not in refused.stderr
    assert _files(out) == before  # nothing written, nothing touched


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_in_one_line(runs):
    root = runs["root"]
    refused = _launch("torchrun", runs["fp"], root / "odd", f"sqlite:///{root}/odd.db", "--set",
                      "data.batch_size=63", timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("binaryduo:")]
    assert lines == ["binaryduo: error: data.batch_size 63 (the global batch) does not split "
                     "evenly over 2 ranks"], refused.stderr[-3000:]
    # torchrun prints its own traceback for a failed job; none comes from binaryduo's code
    assert "binaryduo/trainer" not in refused.stderr and "/trainer/run/" not in refused.stderr
    assert refused.returncode != 0 and not (root / "odd").exists()


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


def _both_ranks_stop(runs, name: str, recipe: str, *extra, fault: str) -> list[str]:
    """Launches ``recipe`` (fp or duo) on 2 ranks with ``fault``: it must fail, every rank with
    its ``run stopped`` line (returned)."""
    root = runs["root"]
    failed = _launch("torchrun", runs[recipe], root / name, f"sqlite:///{root}/{name}.db", *extra,
                     fault=fault, timeout=300)
    assert failed.returncode != 0
    lines = _stopped_lines(failed)
    assert len(lines) == 2, failed.stderr[-3000:]
    return lines


def test_nan_on_one_rank_stops_both_ranks_in_the_same_step(runs):
    """Rank 1 alone diverges (weights poisoned after step 3 of epoch 2); the per-step check is
    agreed by all ranks, so both stop at step 4 instead of one of them
    waiting in a collective. Rank 1 sees its NaN loss; rank 0 its gradients, made NaN by the
    all-reduce with rank 1's."""
    root = runs["root"]
    started = time.perf_counter()
    # per-rank BatchNorm statistics: with the default global ones rank 1's NaN activations
    # reach rank 0's forward pass too, and both would see a NaN loss themselves
    lines = _both_ranks_stop(runs, "nan", "fp", "--set", "deepspeed.sync_batchnorm=false",
                             fault="nan:fp:2:3:1")
    assert time.perf_counter() - started < runs["duo_seconds"] + 60  # no collective time-out
    assert any("training loss is nan at step 4 of the epoch" in line for line in lines)
    assert any("the gradients are not finite (loss " in line and "at step 4 of the epoch" in line
               for line in lines)
    assert all("stage 'fp' epoch 2" in line and "epoch-0001 is kept" in line for line in lines)
    manifest = json.loads((root / "nan" / "checkpoints" / "fp" / "manifest.json").read_text())
    assert manifest["latest"] == "epoch-0001"


def test_an_infinite_gradient_on_one_rank_stops_both_ranks_in_the_same_step(runs):
    """Rank 1's gradient overflows after the all-reduce (step 3 of epoch 2), its loss finite:
    both ranks stop at that step, with the divergence line."""
    lines = _both_ranks_stop(runs, "inf", "fp", fault="inf_grad:fp:2:3:1")
    assert any("the gradients are not finite (loss " in line for line in lines)
    assert any("the loss or the gradients are not finite on another rank" in line
               for line in lines)
    assert all("stage 'fp' epoch 2" in line and "at step 3 of the epoch" in line and
               "epoch-0001 is kept" in line for line in lines)


def test_a_decoupling_check_failing_on_rank_1_stops_both_ranks_promptly(runs):
    """Rank 1's decoupled weights are off by 1e-3 (as if the engine's broadcast had not
    reached it): its check fails, rank 0's passes; the verdict is agreed, so both ranks stop
    at once with the same line instead of rank 0 fine-tuning into a collective time-out."""
    started = time.perf_counter()
    lines = _both_ranks_stop(runs, "baddec", "duo", fault="bad_decouple:1:finetune")
    seconds = time.perf_counter() - started
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1], lines
    assert "decoupling 'coupled' -> 'finetune' on rank 1: not exact" in lines[0], lines
    # no collective time-out (the healthy 2-rank run's time is the yardstick; a rank left
    # waiting would take BINARYDUO_DIST_TIMEOUT_S), and no fine-tuning step was taken
    assert seconds < runs["duo_seconds"] + 60, (seconds, runs["duo_seconds"])
    assert not (runs["root"] / "baddec" / "checkpoints" / "finetune").exists()


def test_a_checkpoint_write_failing_on_rank_0_stops_both_ranks(runs):
    lines = _both_ranks_stop(runs, "full", "fp", fault="disk_full:fp:2")
    assert any("No space left on device" in line for line in lines)
    assert any("another rank could not write its part" in line for line in lines)
    assert all("the previous checkpoint epoch-0001 is intact" in line for line in lines)
    stage = runs["root"] / "full" / "checkpoints" / "fp"
    assert sorted(p.name for p in stage.iterdir()) == ["epoch-0001", "manifest.json"]
