"""Rendering, submission records and status parsing without Slurm (fake sbatch/scontrol on PATH)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from binaryduo.slurm.render import (DEFAULT_SIGNAL_LEAD, ENV_MARKER, OPTIONS_MARKER, template_text,
                                    time_limit_seconds)
from binaryduo.slurm.status import parse_scontrol_job, state_from_sacct, state_from_scontrol
from binaryduo.slurm.submit import SlurmError, parse_job_id
from binaryduo.trainer.cli.main import main
from binaryduo.trainer.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]

RECIPE = """\
name: tiny-render
model:
  name: vgg7
  options: {width_mult: 0.25, num_classes: 10, in_channels: 1}
data:
  root: ${BINARYDUO_TEST_DATA:-data/fm}
  preset: small
  channels: 1
  batch_size: 64
  prepare: fashion-mnist
stages:
  - name: coupled
    variant: coupled
    epochs: 2
    optimizer: {lr: 0.05}
  - name: finetune
    variant: decoupled
    transition: decouple
    init_from: previous
    epochs: 1
    optimizer: {lr: 0.01}
"""

ALL_OPTIONS = ["--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12",
               "--partition", "gpu-a100", "--time", "2-00:00:00", "--account", "proj42",
               "--signal-lead", "600", "--job-name", "r18duo",
               "--sbatch-option=--constraint=a100", "--sbatch-option=--qos=high"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    return tmp_path


def _bin(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A PATH whose sbatch/scontrol/sacct are scripts (and nothing else of Slurm's)."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))  # fakes use absolute paths (/usr/bin/touch)
    for name in ("scontrol", "sacct", "squeue"):  # by default: the job is unknown
        _bin(bindir, name, 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    return bindir


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- rendering -------------------------------------------------------------------------------------


def test_every_option_ends_up_in_the_dry_run_script_and_nothing_is_written(workdir, capsys):
    before = _files(workdir)
    assert main(["slurm", "submit", "tiny.yaml", *ALL_OPTIONS, "--output", "runs/r18",
                 "--set", "stages.finetune.epochs=3", "--smoke",
                 "--tracking-uri", "http://mlflow.example:5000", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert _files(workdir) == before
    run_dir = workdir / "runs" / "r18"
    for line in ["--job-name=r18duo", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                 "--cpus-per-task=12", "--partition=gpu-a100", "--time=2-00:00:00",
                 "--account=proj42", "--signal=B:USR1@600", "--requeue", "--open-mode=append",
                 f"--output={run_dir}/slurm-%j.out", f"--error={run_dir}/slurm-%j.err",
                 f"--chdir={workdir}", "--constraint=a100", "--qos=high"]:
        assert f"#SBATCH {line}\n" in script, line
    # the template's defaults are replaced, not repeated
    assert script.count("#SBATCH --signal=") == 1 and script.count("#SBATCH --job-name=") == 1
    assert f"export RECIPE={run_dir}/slurm/recipe.yaml\n" in script
    assert f"export RUN_DIR={run_dir}\n" in script
    assert "export SMOKE=1\n" in script
    assert "export MLFLOW_TRACKING_URI=http://mlflow.example:5000\n" in script
    assert "srun --kill-on-bad-exit=1" in script
    assert OPTIONS_MARKER not in script and ENV_MARKER not in script
    # every #SBATCH line comes before the first command (sbatch stops reading there)
    lines = script.splitlines()
    first_command = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    assert all(i < first_command for i, l in enumerate(lines) if l.startswith("#SBATCH"))
    bash = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert bash.returncode == 0, bash.stderr


def test_cpu_job_defaults(workdir, capsys):
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                 "--tasks-per-node", "2", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2\n" in script
    assert "--gpus-per-node" not in "".join(l for l in script.splitlines(True)
                                            if l.startswith("#SBATCH"))
    assert f"#SBATCH --signal=B:USR1@{DEFAULT_SIGNAL_LEAD}\n" in script
    assert "#SBATCH --job-name=binaryduo-tiny-render\n" in script
    assert f"--output={workdir}/runs/tiny-render-" in script
    assert "export SMOKE" not in script and "MLFLOW_TRACKING_URI" not in script


def test_the_template_by_hand_is_a_valid_script_with_defaults():
    text = template_text()
    assert text == (REPO / "slurm" / "binaryduo.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@"):
        assert line in text
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "binaryduo.sbatch")]).returncode == 0
    # outside a job it refuses clearly instead of running anything
    done = subprocess.run(["bash", str(REPO / "slurm" / "binaryduo.sbatch")], text=True,
                          capture_output=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "submit this script with sbatch" in done.stderr


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("10:30", 630), ("1:00:00", 3600),
                                           ("2-00", 172800), ("1-02:03", 93780),
                                           ("1-00:00:05", 86405), ("UNLIMITED", None)])
def test_time_limits(text, seconds):
    assert time_limit_seconds(text) == seconds


# -- bad input -------------------------------------------------------------------------------------


def test_a_bad_recipe_is_one_line_per_problem_and_writes_nothing(workdir, fake_slurm, capsys):
    _bin(fake_slurm, "sbatch", f"/usr/bin/touch {workdir}/SBATCH_CALLED; echo 1\n")
    (workdir / "bad.yaml").write_text(RECIPE.replace("epochs: 2", "epochs: 0")
                                      .replace("preset: small", "preset: tiny"))
    before = _files(workdir)
    assert main(["slurm", "submit", "bad.yaml", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("binaryduo: error: bad.yaml:") for line in err)
    assert _files(workdir) == before
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "1",
                 "--set", "stages.coupled.epochs=x"]) == 2
    assert "binaryduo: error:" in capsys.readouterr().err
    assert main(["slurm", "submit", "missing.yaml", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "cannot read recipe" in capsys.readouterr().err
    assert _files(workdir) == before


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--gpus-per-node", "1"], "--nodes 0: must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node -1: must be >= 0"),
    (["--nodes", "1", "--gpus-per-node", "8", "--tasks-per-node", "4"], "one task per GPU"),
    (["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "0"], "--tasks-per-node 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "tomorrow"], "not a Slurm time limit"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "5", "--signal-lead", "300"],
     "not longer than --signal-lead"),
    (["--nodes", "1", "--gpus-per-node", "1", "--signal-lead", "0"], "--signal-lead 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "a b"], "--partition"),
    (["--nodes", "1", "--gpus-per-node", "1", "--sbatch-option", "constraint=a100"],
     "--sbatch-option"),
    (["--nodes", "3", "--gpus-per-node", "1"], "does not split evenly over 3 tasks"),
    (["--nodes", "1", "--gpus-per-node", "1", "--output", "runs/with space"], "whitespace"),
])
def test_bad_options_exit_2_before_anything_is_written(workdir, fake_slurm, capsys, args,
                                                      message):
    _bin(fake_slurm, "sbatch", f"/usr/bin/touch {workdir}/SBATCH_CALLED; echo 1\n")
    before = _files(workdir)
    assert main(["slurm", "submit", "tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("binaryduo: error: ")
    assert _files(workdir) == before


def test_missing_required_options_is_a_usage_error(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["slurm", "submit", "tiny.yaml", "--nodes", "1"])
    assert exit_.value.code == 2 and "--gpus-per-node" in capsys.readouterr().err


def test_no_sbatch_on_path(workdir, fake_slurm, capsys):
    before = _files(workdir)
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err
    assert _files(workdir) == before


def test_a_refused_submission_leaves_nothing_behind(workdir, fake_slurm, capsys):
    _bin(fake_slurm, "sbatch", 'echo "sbatch: error: Invalid partition name specified" >&2; '
                               'exit 1\n')
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "1",
                 "--output", "runs/refused"]) == 1
    assert "sbatch refused the job: sbatch: error: Invalid partition" in capsys.readouterr().err
    assert not (workdir / "runs").exists()


# -- a submission --------------------------------------------------------------------------------


def test_submit_records_the_command_and_a_frozen_recipe(workdir, fake_slurm, capsys, monkeypatch):
    monkeypatch.setenv("BINARYDUO_TEST_DATA", "data/from-env")
    _bin(fake_slurm, "sbatch", f'echo "$@" > {workdir}/sbatch.args; echo "4242;cluster"\n')
    monkeypatch.setattr("sys.argv", ["binaryduo", "slurm", "submit", "tiny.yaml", "..."])
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2",
                 "--set", "stages.finetune.epochs=4", "--output", "runs/one"]) == 0
    out = capsys.readouterr().out
    run_dir = workdir / "runs" / "one"
    assert "submitted job 4242" in out and f"run directory {run_dir}" in out
    assert (workdir / "sbatch.args").read_text().split() == [
        "--parsable", str(run_dir / "slurm" / "job.sbatch")]
    frozen = run_dir / "slurm" / "recipe.yaml"
    expected = load_recipe(workdir / "tiny.yaml", ["stages.finetune.epochs=4"])
    assert load_recipe(frozen) == expected  # round-trips exactly: the job trains this
    assert yaml.safe_load(frozen.read_text())["data"]["root"] == "data/from-env"  # resolved
    assert yaml.safe_load(frozen.read_text())["stages"][1]["epochs"] == 4
    record = json.loads((run_dir / "slurm" / "submission.json").read_text())
    assert record["job_id"] == "4242" and record["cwd"] == str(workdir)
    assert record["command"] == ["binaryduo", "slurm", "submit", "tiny.yaml", "..."]
    assert record["overrides"] == ["stages.finetune.epochs=4"]
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert f"export RECIPE={frozen}\n" in script
    index = [json.loads(l) for l in (workdir / "runs" / "slurm-jobs.jsonl").read_text().splitlines()]
    assert index == [{"job_id": "4242", "run_dir": str(run_dir), "recipe": "tiny-render",
                      "submitted": record["submitted"]}]

    # the same run again (e.g. after it failed): continued; a different recipe: refused
    _bin(fake_slurm, "sbatch", 'echo 4243\n')
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2",
                 "--set", "stages.finetune.epochs=4", "--output", "runs/one"]) == 0
    assert json.loads((run_dir / "slurm" / "submission.json").read_text())["job_id"] == "4243"
    assert len((run_dir / "slurm" / "submissions.jsonl").read_text().splitlines()) == 2
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2",
                 "--output", "runs/one"]) == 2
    assert "holds a run of a different recipe" in capsys.readouterr().err
    assert json.loads((run_dir / "slurm" / "submission.json").read_text())["job_id"] == "4243"


def test_a_run_whose_job_is_still_active_is_not_submitted_twice(workdir, fake_slurm, capsys):
    _bin(fake_slurm, "sbatch", 'echo 77\n')
    args = ["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "1",
            "--output", "runs/busy"]
    assert main(args) == 0
    _bin(fake_slurm, "scontrol", 'echo "JobId=77 JobName=x JobState=RUNNING Reason=None '
                                 'Restarts=0 ExitCode=0:0 RunTime=00:01:00 NodeList=n1"\n')
    assert main(args) == 2
    assert "job 77 of this run is still RUNNING" in capsys.readouterr().err


# -- status ----------------------------------------------------------------------------------------

SCONTROL_FAILED = (
    "JobId=51 JobName=binaryduo-tiny UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=1 Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode "
    "Dependency=(null) Requeue=1 Restarts=2 BatchFlag=1 Reboot=0 ExitCode=2:0 RunTime=00:00:09 "
    "TimeLimit=UNLIMITED NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=2 "
    "Command=/r/slurm/job.sbatch WorkDir=/r StdErr=STDERR StdIn=/dev/null StdOut=/r/out")


def _synthetic_run(run_dir: Path, job: str) -> None:
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "slurm" / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "stages": [{"name": "coupled", "variant": "coupled", "epochs": 2},
                                    {"name": "finetune", "variant": "decoupled", "epochs": 1}]}))
    (run_dir / "slurm" / "submission.json").write_text(json.dumps({"job_id": job, "cwd": "/x",
                                                                   "submitted": "then"}))
    (run_dir / "run_state.json").write_text(json.dumps({"parent_run_id": "abc",
                                                        "completed": ["coupled"]}))
    (run_dir / "checkpoints" / "coupled").mkdir(parents=True)
    (run_dir / "checkpoints" / "coupled" / "manifest.json").write_text(json.dumps({
        "epochs": [{"epoch": 1, "tag": "epoch-0001", "top1": 50.0},
                   {"epoch": 2, "tag": "epoch-0002", "top1": 55.5}],
        "latest": "epoch-0002", "best": {"epoch": 2, "tag": "epoch-0002", "top1": 55.5}}))
    (run_dir / "checkpoints" / "finetune").mkdir(parents=True)
    (run_dir / "checkpoints" / "finetune" / "manifest.json").write_text(json.dumps({
        "epochs": [], "latest": "epoch-0000-step-000003", "best": None,
        "mid_epoch": {"epoch": 0, "step": 3, "tag": "epoch-0000-step-000003"}}))
    (run_dir / "slurm" / "attempts.log").write_text(
        f"2026-01-01T00:00:00+0000 job={job} attempt=0 start nodes=vm tasks=2 master=vm:1\n"
        f"2026-01-01T00:01:00+0000 job={job} attempt=0 end status=75\n"
        f"2026-01-01T00:02:00+0000 job={job} attempt=1 start nodes=vm tasks=2 master=vm:1\n"
        f"2026-01-01T00:02:09+0000 job={job} attempt=1 end status=2\n")
    (run_dir / f"slurm-{job}.err").write_text(
        "binaryduo: preempted: checkpoint at stage 'finetune', epoch 1, step 3; requeued\n"
        "binaryduo: error: tiny.yaml:7: data.root: dataset directory /d does not exist\n"
        "binaryduo: error: tiny.yaml:7: data.root: dataset directory /d does not exist\n"
        "srun: error: vm: tasks 0-1: Exited with exit code 2\n")


def test_status_of_a_failed_job_shows_progress_and_the_error(workdir, fake_slurm, capsys):
    run_dir = workdir / "runs" / "failed"
    _synthetic_run(run_dir, "51")
    _bin(fake_slurm, "scontrol", f'echo "{SCONTROL_FAILED.replace("STDERR", str(run_dir / "slurm-51.err"))}"\n')
    assert main(["slurm", "status", "runs/failed"]) == 1
    out = capsys.readouterr().out
    assert "job 51: FAILED (NonZeroExitCode), exit code 2:0" in out and "[from scontrol]" in out
    assert ("attempts: 2 started (requeued 1 time); the last one started "
            "2026-01-01T00:02:00+0000, ended 2026-01-01T00:02:09+0000 with status 2") in out
    assert "stage coupled      coupled    epoch 2/2  last top-1  55.50  best  55.50  done" in out
    assert "stage finetune     decoupled  epoch 0/1" in out and "step 3 (mid-epoch" in out
    assert "MLflow parent run abc" in out
    # once (deduplicated) among the trainer's messages, twice in the tail of the file
    assert out.count("binaryduo: error: tiny.yaml:7: data.root: dataset directory /d does not "
                     "exist") == 3
    assert "| srun: error: vm: tasks 0-1: Exited with exit code 2" in out


def test_status_falls_back_to_the_run_directory_when_slurm_forgot_the_job(workdir, fake_slurm,
                                                                         capsys):
    run_dir = workdir / "runs" / "old"
    _synthetic_run(run_dir, "51")
    assert main(["slurm", "status", str(run_dir)]) == 1  # scontrol and sacct do not know job 51
    out = capsys.readouterr().out
    assert "job 51: FAILED, exit code 2:0" in out and "[from files]" in out
    (run_dir / "slurm" / "attempts.log").write_text(
        "2026-01-01T00:00:00+0000 job=51 attempt=0 start nodes=vm tasks=2 master=vm:1\n"
        "2026-01-01T00:05:00+0000 job=51 attempt=0 end status=0\n")
    assert main(["slurm", "status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "job 51: COMPLETED" in out
    assert "trainer messages (slurm-51.err):\n    binaryduo: preempted: checkpoint at" in out
    # sacct answers when accounting is on
    _bin(fake_slurm, "sacct", 'echo "51|TIMEOUT|0:0|1-00:00:00|vm"\n')
    assert main(["slurm", "status", str(run_dir)]) == 1
    assert "job 51: TIMEOUT" in capsys.readouterr().out


def test_status_without_run_dir_lists_the_runs_submitted_here(workdir, fake_slurm, capsys):
    assert main(["slurm", "status"]) == 0
    assert "no runs submitted from" in capsys.readouterr().out
    _bin(fake_slurm, "sbatch", 'echo 61\n')
    assert main(["slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "1",
                 "--output", "runs/a"]) == 0
    _bin(fake_slurm, "scontrol", 'echo "JobId=61 JobState=PENDING Reason=Priority Restarts=0"\n')
    capsys.readouterr()
    assert main(["slurm", "status"]) == 0
    out = capsys.readouterr().out
    assert "61  PENDING     runs/a" in out and "coupled 0/2, finetune 0/1" in out


def test_status_bad_input(workdir, capsys):
    assert main(["slurm", "status", "nowhere"]) == 2
    assert "binaryduo: error: slurm status: nowhere: no such run directory" in capsys.readouterr().err
    (workdir / "plain").mkdir()
    assert main(["slurm", "status", "plain"]) == 2
    assert "no Slurm job recorded" in capsys.readouterr().err


def test_parsers():
    fields = parse_scontrol_job(SCONTROL_FAILED)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "2"
    assert parse_job_id("123\n") == "123" and parse_job_id("124;cluster\n") == "124"
    with pytest.raises(SlurmError):
        parse_job_id("Submitted batch job 5")
    state = state_from_sacct("9", "9|PENDING|0:0|00:00:00|None assigned\n"
                                  "9|CANCELLED by 0|0:15|00:00:10|vm\n")
    assert state.state == "CANCELLED" and state.restarts == 1 and state.failed
    assert state_from_scontrol("8", SCONTROL_FAILED) is None  # another job's answer


# -- job arrays of seeds ---------------------------------------------------------------------------

ARRAY = ["--nodes", "1", "--gpus-per-node", "1"]


@pytest.fixture
def no_store(monkeypatch):
    """Submitting an array prepares the MLflow store (tests/slurm/test_slurm_cluster.py does it
    for real); here it would only create a sqlite file and take seconds."""
    made = []
    monkeypatch.setattr("binaryduo.trainer.cli.slurm._prepare_tracking_store",
                        lambda uri, recipe: made.append(uri))
    return made


def test_an_array_dry_run_is_one_script_whose_task_ids_are_the_seeds(workdir, capsys):
    before = _files(workdir)
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "0-2,7,9",
                 "--array-throttle", "2", "--output", "runs/seeds", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert _files(workdir) == before
    run_dir = workdir / "runs" / "seeds"
    for line in ["--array=0-2,7,9%2", f"--output={run_dir}/seed-%a/slurm-%A_%a.out",
                 f"--error={run_dir}/seed-%a/slurm-%A_%a.err", "--requeue",
                 "--signal=B:USR1@300"]:
        assert f"#SBATCH {line}\n" in script, line
    assert f"export RUN_DIR={run_dir}\n" in script
    assert re.search(r"^export SWEEP_ID=sweep-[0-9a-f]{12}$", script, re.M), script
    # the task id is the seed; each task has its own run directory and job id
    assert 'RUN_DIR=$RUN_DIR/seed-$seed' in script
    assert 'job=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID' in script
    assert '--set "seed=$seed" --tag "sweep_id=${SWEEP_ID:-slurm-$SLURM_ARRAY_JOB_ID}"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # the same recipe, without --seeds: no array, the script as before
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--output", "runs/one",
                 "--dry-run"]) == 0
    single = capsys.readouterr().out
    assert not [l for l in single.splitlines() if l.startswith("#SBATCH --array")]
    assert "export SWEEP_ID" not in single
    assert f"#SBATCH --output={workdir}/runs/one/slurm-%j.out\n" in single


def test_the_array_sweep_id_is_the_one_binaryduo_sweep_gives_the_recipe(workdir, capsys):
    from binaryduo.trainer.cli.sweep import plan_sweep

    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "3,4", "--smoke",
                 "--dry-run"]) == 0
    sweep, _ = plan_sweep(["tiny.yaml"], [0], [], output=None, smoke=True)
    assert f"export SWEEP_ID={sweep.sweep_id}\n" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--seeds", "3-1"], "range '3-1' ends before it starts"),
    (["--seeds", "1,x"], "'x' is not a seed or a range"),
    (["--seeds", "2,2"], "seed 2 given twice"),
    (["--seeds", "0-4", "--set", "seed=5"], "the seed is set per run by --seeds"),
    (["--seeds", "0-4", "--array-throttle", "0"], "--array-throttle 0: must be >= 1"),
    (["--array-throttle", "2"], "--array-throttle limits the tasks of a job array"),
])
def test_bad_seeds_are_one_line_exit_2_and_nothing_is_written_or_submitted(
        workdir, fake_slurm, no_store, capsys, args, message):
    _bin(fake_slurm, "sbatch", f"/usr/bin/touch {workdir}/SBATCH_CALLED; echo 1\n")
    before = _files(workdir)
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("binaryduo: error: ") and message in err[0], err
    assert _files(workdir) == before


def test_seeds_beyond_the_clusters_max_array_size_are_refused(workdir, fake_slurm, no_store,
                                                             capsys):
    _bin(fake_slurm, "sbatch", f"/usr/bin/touch {workdir}/SBATCH_CALLED; echo 1\n")
    _bin(fake_slurm, "scontrol", 'if [ "$1 $2" = "show config" ]; then '
                                 'echo "MaxArraySize            = 1001"; exit 0; fi; exit 1\n')
    before = _files(workdir)
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "999-1001"]) == 2
    err = capsys.readouterr().err
    assert "seed 1001 cannot be an array task id on this cluster (MaxArraySize=1001" in err
    assert _files(workdir) == before


def test_an_array_submission_records_its_seeds_and_makes_their_folders(
        workdir, fake_slurm, no_store, capsys, monkeypatch):
    _bin(fake_slurm, "sbatch", f'echo "$@" > {workdir}/sbatch.args; echo 900\n')
    monkeypatch.setattr("sys.argv", ["binaryduo", "slurm", "submit", "..."])
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "3,4", "--output",
                 "runs/seeds", "--tracking-uri", "sqlite:///x.db"]) == 0
    out = capsys.readouterr().out
    run_dir = workdir / "runs" / "seeds"
    assert "submitted job array 900: 2 tasks, seeds 3-4 (task 900_N trains seed N)" in out
    assert no_store == ["sqlite:///x.db"]
    record = json.loads((run_dir / "slurm" / "submission.json").read_text())
    assert record["job_id"] == "900" and record["seeds"] == [3, 4]
    assert record["sweep_id"].startswith("sweep-") and record["array_throttle"] is None
    assert f"--sweep {record['sweep_id']} --tracking-uri sqlite:///x.db" in out
    assert json.loads((run_dir / "sweep.json").read_text())["sweep_id"] == record["sweep_id"]
    assert (run_dir / "seed-3").is_dir() and (run_dir / "seed-4").is_dir()
    frozen = yaml.safe_load((run_dir / "slurm" / "recipe.yaml").read_text())
    assert "seed" not in frozen  # each task sets its own
    assert "#SBATCH --array=3-4\n" in (run_dir / "slurm" / "job.sbatch").read_text()
    index = [json.loads(l) for l in (workdir / "runs" / "slurm-jobs.jsonl").read_text()
             .splitlines()]
    assert index[-1]["seeds"] == [3, 4] and index[-1]["job_id"] == "900"

    # resubmitted: the finished seed is left out, the other one goes into a new array
    (run_dir / "seed-3" / "run_state.json").write_text(json.dumps({"finished": True}))
    _bin(fake_slurm, "sbatch", 'echo 901\n')
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "3-5", "--output",
                 "runs/seeds"]) == 0
    captured = capsys.readouterr()
    assert "seed 3 finished earlier" in captured.err
    assert "#SBATCH --array=4-5\n" in (run_dir / "slurm" / "job.sbatch").read_text()
    assert (run_dir / "seed-5").is_dir()
    from binaryduo.slurm.array import array_jobs
    assert array_jobs(run_dir) == {3: "900_3", 4: "901_4", 5: "901_5"}
    assert json.loads((run_dir / "sweep.json").read_text())["seeds"] == [3, 4, 5]
    # the same recipe with --smoke is another sweep: refused
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "3-5", "--smoke",
                 "--output", "runs/seeds"]) == 2
    assert "holds the seeds of sweep" in capsys.readouterr().err
    # every seed finished: nothing is submitted
    for seed in (4, 5):
        (run_dir / f"seed-{seed}" / "run_state.json").write_text(json.dumps({"finished": True}))
    _bin(fake_slurm, "sbatch", f"/usr/bin/touch {workdir}/SBATCH_CALLED; echo 902\n")
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "3-5", "--output",
                 "runs/seeds"]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    assert not (workdir / "SBATCH_CALLED").exists()


def test_arrays_and_single_runs_do_not_share_a_run_directory(workdir, fake_slurm, no_store,
                                                            capsys):
    _bin(fake_slurm, "sbatch", 'echo 910\n')
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--output", "runs/single"]) == 0
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "1", "--output",
                 "runs/single"]) == 2
    assert "holds a single job's run, not a job array" in capsys.readouterr().err
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "1", "--output",
                 "runs/array"]) == 0
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--output", "runs/array"]) == 2
    assert "holds a job array of seeds; continue it with --seeds" in capsys.readouterr().err
    # a different recipe into the array: refused, as for a single run
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "1", "--output",
                 "runs/array", "--set", "stages.coupled.epochs=3"]) == 2
    assert "holds a run of a different recipe" in capsys.readouterr().err
    # a task still pending: refused
    _bin(fake_slurm, "scontrol", 'echo "JobId=910 ArrayJobId=910 ArrayTaskId=1 '
                                 'JobState=PENDING Reason=Priority Restarts=0"\n')
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "1", "--output",
                 "runs/array"]) == 2
    assert "task 910_1 (seed 1) of this array is still PENDING" in capsys.readouterr().err


def test_a_refused_array_submission_leaves_nothing_behind(workdir, fake_slurm, no_store, capsys):
    _bin(fake_slurm, "sbatch", 'echo "sbatch: error: Invalid job array specification" >&2; '
                               'exit 1\n')
    assert main(["slurm", "submit", "tiny.yaml", *ARRAY, "--seeds", "0-2", "--output",
                 "runs/refused"]) == 1
    assert "Invalid job array specification" in capsys.readouterr().err
    assert not (workdir / "runs").exists()


SCONTROL_ARRAY = (
    "JobId=700 ArrayJobId=700 ArrayTaskId=5 ArrayTaskThrottle=0 JobState=PENDING "
    "Reason=Resources Restarts=0 ExitCode=0:0 RunTime=00:00:00 NodeList=\n"
    "JobId=701 ArrayJobId=700 ArrayTaskId=3 JobState=COMPLETED Reason=None Restarts=1 "
    "ExitCode=0:0 RunTime=00:01:10 NodeList=vm\n"
    "JobId=702 ArrayJobId=700 ArrayTaskId=4 JobState=FAILED Reason=NonZeroExitCode Restarts=0 "
    "ExitCode=2:0 RunTime=00:00:09 NodeList=vm\n")


def _synthetic_array(run_dir: Path, job: str, seeds: list[int]) -> None:
    _synthetic_run(run_dir / "template", job)  # a run's files, copied into each seed
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "slurm" / "recipe.yaml").write_text(
        (run_dir / "template" / "slurm" / "recipe.yaml").read_text())
    record = {"job_id": job, "cwd": "/x", "submitted": "then", "seeds": seeds,
              "sweep_id": "sweep-0123456789ab", "tracking_uri": "sqlite:///m.db"}
    (run_dir / "slurm" / "submission.json").write_text(json.dumps(record))
    (run_dir / "slurm" / "submissions.jsonl").write_text(json.dumps(record) + "\n")


def test_status_of_an_array_is_one_line_per_seed_and_exit_1_when_a_task_failed(
        workdir, fake_slurm, capsys):
    run_dir = workdir / "runs" / "arr"
    _synthetic_array(run_dir, "700", [3, 4, 5])
    template = run_dir / "template"
    import shutil
    for seed in (3, 4):
        shutil.copytree(template / "checkpoints", run_dir / f"seed-{seed}" / "checkpoints")
        (run_dir / f"seed-{seed}" / "slurm").mkdir()
    (run_dir / "seed-3" / "run_state.json").write_text(json.dumps(
        {"completed": ["coupled", "finetune"], "finished": True}))
    (run_dir / "seed-3" / "slurm" / "attempts.log").write_text(
        "2026-01-01T00:00:00+0000 job=700_3 attempt=0 start nodes=vm\n"
        "2026-01-01T00:00:30+0000 job=700_3 attempt=0 end status=75\n"
        "2026-01-01T00:00:40+0000 job=700_3 attempt=1 start nodes=vm\n"
        "2026-01-01T00:01:10+0000 job=700_3 attempt=1 end status=0\n")
    (run_dir / "seed-4" / "run_state.json").write_text(json.dumps({"completed": ["coupled"]}))
    (run_dir / "seed-4" / "slurm-700_4.err").write_text(
        "binaryduo: error: tiny.yaml:7: data.root: dataset directory /d does not exist\n")
    shutil.rmtree(template)
    _bin(fake_slurm, "scontrol", f"/bin/cat <<'END'\n{SCONTROL_ARRAY}END\n")
    assert main(["slurm", "status", "runs/arr"]) == 1
    out = capsys.readouterr().out
    assert f"array {run_dir} (recipe tiny): seeds 3-5, sweep_id sweep-0123456789ab" in out
    assert "job array 700: 3 tasks, 1 COMPLETED, 1 FAILED, 1 PENDING" in out
    assert re.search(r"^ +3  700_3 +COMPLETED +2  finetune +0/1 +- +done$", out, re.M), out
    assert re.search(r"^ +4  700_4 +FAILED +0  finetune +0/1 +- +stopped at step 3", out,
                     re.M), out
    assert re.search(r"^ +5  700_5 +PENDING +0  coupled +0/2 +- +\(Resources\)$", out, re.M), out
    assert "  seed 4 (job 700_4): FAILED, exit code 2:0" in out
    assert "      binaryduo: error: tiny.yaml:7: data.root: dataset directory /d" in out
    assert ("compare the seeds: binaryduo compare --by-seed --sweep sweep-0123456789ab "
            "--tracking-uri sqlite:///m.db") in out

    # the index: the array is one line, its tasks counted
    (workdir / "runs" / "slurm-jobs.jsonl").write_text(json.dumps(
        {"job_id": "700", "run_dir": str(run_dir), "recipe": "tiny", "seeds": [3, 4, 5]}) + "\n")
    assert main(["slurm", "status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"700_\* +PENDING +runs/arr +seeds 3-5: 1 COMPLETED, 1 FAILED, 1 PENDING",
                     out), out


def test_array_tasks_are_found_in_scontrol_and_sacct_answers():
    from binaryduo.slurm.status import state_from_sacct, state_from_scontrol, task_ids

    assert task_ids("3-5,7%2") == {3, 4, 5, 7} and task_ids("[4-5%1]") == {4, 5}
    assert task_ids("(null)") == set()
    assert state_from_scontrol("700_3", SCONTROL_ARRAY).state == "COMPLETED"
    assert state_from_scontrol("700_5", SCONTROL_ARRAY).reason == "Resources"
    assert state_from_scontrol("700_6", SCONTROL_ARRAY) is None
    assert state_from_scontrol("701", SCONTROL_ARRAY).state == "COMPLETED"  # by its own id
    sacct = "9_3|COMPLETED|0:0|00:01:00|vm\n9_[4-5%1]|PENDING|0:0|00:00:00|None assigned\n"
    assert state_from_sacct("9_3", sacct).state == "COMPLETED"
    assert state_from_sacct("9_5", sacct).state == "PENDING"
    assert state_from_sacct("9_6", sacct) is None


def test_an_array_task_requeues_itself_not_the_array():
    from binaryduo.trainer.runtime.preemption import slurm_job_id

    # the last task to start carries the array's own id as SLURM_JOB_ID: `scontrol requeue 81234`
    # would requeue every running task of the array
    assert slurm_job_id({"SLURM_JOB_ID": "81234", "SLURM_ARRAY_JOB_ID": "81234",
                         "SLURM_ARRAY_TASK_ID": "4"}) == "81234_4"
    assert slurm_job_id({"SLURM_JOB_ID": "81235"}) == "81235"
    assert slurm_job_id({}) is None
