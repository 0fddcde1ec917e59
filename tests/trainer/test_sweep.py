"""``binaryduo sweep``: one finished run per (recipe, seed), also after the sweep is killed and run
again; bad input refused before anything starts; the MLflow tags ``compare --by-seed`` groups by.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from binaryduo.trainer.cli.errors import UsageError
from binaryduo.trainer.cli.seeds import parse_seeds

BIN = Path(sys.executable).with_name("binaryduo")


@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("7", [7]),
                                         ("0,2,7", [0, 2, 7]), ("0-2,10", [0, 1, 2, 10]),
                                         (" 3 , 1", [3, 1])])
def test_seed_lists(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, says", [("", "not a seed"), ("0-x", "not a seed"),
                                        ("-1", "not a seed"), ("3-1", "ends before it starts"),
                                        ("0-2,1", "seed 1 given twice"), ("0-5000", "more than"),
                                        ("1.5", "not a seed")])
def test_bad_seed_lists_say_what_is_wrong(text, says):
    with pytest.raises(UsageError, match=says):
        parse_seeds(text)


def _parent_runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run for run in client.search_runs(experiments)
            if "mlflow.parentRunId" not in run.data.tags]


@pytest.mark.parametrize("args, says", [
    (["--seeds", "2-1"], "range '2-1' ends before it starts"),
    (["--seeds", "0-1", "--set", "seed=3"], "the seed is set per run by --seeds"),
    (["--seeds", "0-1", "--set", "model.name=nope"], "unknown model 'nope'"),
    (["MISSING.yaml", "--seeds", "0-1"], "MISSING.yaml: cannot read recipe"),
    (["SAME", "--seeds", "0-1"], "is also the name of"),
    (["--seeds", "0-1", "--output", "taken"], "holds sweep sweep-other"),
    (["--seeds", "0-1", "--output", "full"], "not empty and holds no sweep.json"),
    (["--seeds", "0-1", "--tracking-uri", "http://127.0.0.1:9"], "127.0.0.1:9"),
])
def test_bad_input_is_refused_before_any_run_starts(args, says, tiny_recipe, run_binaryduo,
                                                    tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "sweep.json").write_text(json.dumps({"sweep_id": "sweep-other"}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    twin = tmp_path / "twin.yaml"  # another file, same recipe name
    twin.write_text(tiny_recipe.read_text())
    args = [str(twin) if a == "SAME" else a for a in args]
    result = run_binaryduo("sweep", tiny_recipe, *args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("binaryduo: error: ") for line in lines), result.stderr
    assert says in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["sweep.json"]


def test_a_killed_sweep_run_again_ends_with_one_finished_run_per_seed(tiny_recipe, tmp_path,
                                                                      run_binaryduo):
    """The sweep is killed with SIGKILL while seed 1 trains (between its two stages): its run
    gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops. The same command then skips
    seed 0, resumes seed 1 in its MLflow run, and starts seed 2."""
    db = tmp_path / "mlflow.db"
    command = [str(BIN), "sweep", str(tiny_recipe), "--seeds", "0-1", "--output", "sweep",
               "--tracking-uri", f"sqlite:///{db}", "--smoke"]  # --smoke: 6 runs' time
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "first.log").open("w")
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    seed1 = tmp_path / "sweep" / "tiny-duo" / "seed-1"
    deadline = time.monotonic() + 300
    # mid-run: seed 1's MLflow record is open and its first epoch's checkpoint written
    while not (seed1 / "checkpoints" / "coupled" / "manifest.json").exists():
        assert sweep.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.2)
    child = int(Path(f"/proc/{sweep.pid}/task/{sweep.pid}/children").read_text().split()[0])
    sweep.send_signal(signal.SIGKILL)
    assert sweep.wait() == -signal.SIGKILL
    while Path(f"/proc/{child}").exists():  # the run stops on its own (checkpoint, then exit)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    log.close()
    state = json.loads((seed1 / "run_state.json").read_text())
    assert not state["finished"]
    assert (tmp_path / "sweep" / "tiny-duo" / "seed-0" / "run_state.json").exists()

    again = subprocess.run([*command[:4], "0-2", *command[5:]], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "tiny-duo seed 0: finished earlier, skipped" in again.stdout
    assert "tiny-duo seed 1: resuming in sweep/tiny-duo/seed-1" in again.stdout
    assert "tiny-duo seed 2: starting" in again.stdout
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["seeds"] == [0, 1, 2]

    parents = _parent_runs(db)
    assert sorted(run.data.tags["seed"] for run in parents) == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" for run in parents)
    assert {run.data.tags["sweep_id"] for run in parents} == {record["sweep_id"]}
    assert {run.data.tags["recipe_hash_without_seed"] for run in parents} == \
        {record["recipes"]["tiny-duo"]["recipe_hash_without_seed"]}
    assert len({run.data.tags["recipe_hash"] for run in parents}) == 3
    resumed = next(run for run in parents if run.data.tags["seed"] == "1")
    assert resumed.info.run_id == state["parent_run_id"]  # continued, not started anew
    for seed in (0, 1, 2):
        state = json.loads((tmp_path / "sweep" / "tiny-duo" / f"seed-{seed}" /
                            "run_state.json").read_text())
        assert state["finished"] and state["completed"] == ["coupled", "finetune"]

    # compare finds the sweep by its directory and counts each seed once
    shown = run_binaryduo("compare", "--by-seed", "--sweep", "sweep", "--tracking-uri",
                          f"sqlite:///{db}", "--include-smoke", "--no-paper", "--format", "json",
                          cwd=tmp_path)
    rows = json.loads(shown.stdout)
    assert {row["stage"] for row in rows} == {"coupled (coupled)", "finetune (decoupled)",
                                              "finetune: before fine-tune"}
    assert all(row["n"] == 3 and sorted(row["seeds"]) == ["0", "1", "2"] for row in rows)


def test_a_second_sweep_in_a_directory_in_use_is_refused(tiny_recipe, run_binaryduo, tmp_path):
    """Two sweeps in one directory would resume the same run at the same time: the one that
    finds the lock held (here by the test) starts nothing."""
    import fcntl

    (tmp_path / "sweep").mkdir()
    with (tmp_path / "sweep" / ".sweep.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_binaryduo("sweep", tiny_recipe, "--seeds", "0", "--output", "sweep",
                               cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("binaryduo: error: --output sweep: another sweep is running "
                                     "in it (it holds sweep/.sweep.lock); wait for it, or stop "
                                     "it first")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".sweep.lock"]


def test_sigterm_stops_the_run_with_a_checkpoint_and_the_sweep_with_status_75(tiny_recipe,
                                                                             tmp_path):
    """SIGTERM to the sweep reaches its run, which checkpoints and exits 75; the sweep stops
    there (no further seed starts) with the same status and says how to continue."""
    command = [str(BIN), "sweep", str(tiny_recipe), "--seeds", "0-1", "--output", "sweep",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--smoke"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    seed0 = tmp_path / "sweep" / "tiny-duo" / "seed-0"
    deadline = time.monotonic() + 300
    while not (seed0 / "checkpoints" / "coupled" / "manifest.json").exists():
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 75, out[-2000:] + err[-2000:]
    assert "binaryduo: preempted: checkpoint at stage 'finetune'" in err
    assert "stopped at [1/2] tiny-duo seed 0 (SIGTERM); run the same command again" in err
    assert not (tmp_path / "sweep" / "tiny-duo" / "seed-1").exists()
    assert not json.loads((seed0 / "run_state.json").read_text())["finished"]


def test_train_tags_refuse_binaryduos_own_and_malformed_ones():
    from binaryduo.trainer.cli.main import parse_tags

    assert parse_tags(["sweep_id=sweep-1", "team=bnn.lab"]) == {"sweep_id": "sweep-1",
                                                                 "team": "bnn.lab"}
    for bad, says in [("seed=3", "set by binaryduo train itself"),
                      ("mlflow.runName=x", "set by binaryduo train itself"),
                      ("novalue=", "expected KEY=VALUE"), ("=x", "expected KEY=VALUE"),
                      ("a b=c", "expected KEY=VALUE"), ("nokey", "expected KEY=VALUE")]:
        with pytest.raises(UsageError, match=says):
            parse_tags([bad])
    with pytest.raises(UsageError, match="given twice"):
        parse_tags(["a=1", "a=2"])

