"""Rendering, submission records and status parsing without Slurm (fake sbatch/scontrol on PATH)."""
from __future__ import annotations

import json
import os
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
