"""Jobs on a real single-node Slurm 22.05 cluster (tests/slurm/conftest.py starts it).

The first tests use the template by hand (``RECIPE=... sbatch slurm/binaryduo.sbatch``) with a
stand-in trainer (a bash script: starts in milliseconds) to pin down signal forwarding, requeue
and failure handling; the last ones train the tiny recipe through ``binaryduo slurm submit``.
"""
from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "binaryduo.sbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

pytestmark = pytest.mark.slow

# A tiny training job takes 30-60 s on 2 idle cores; generous limits for loaded machines (a first
# DeepSpeed op build alone can take minutes there).
JOB_TIMEOUT = 600

# A stand-in for `binaryduo train RECIPE --output|--resume RUN_DIR`: records what it was given and
# the signals it gets; FAKE_MODE=preempt: the first attempt waits for a signal, then (rank 0)
# requeues the job and exits 75 as the trainer does; a requeued attempt exits 0.
# FAKE_MODE=fail: rank 1 fails at once, rank 0 would run for two minutes.
FAKE_TRAINER = r"""#!/bin/bash
out="$FAKE_OUT/attempt-${SLURM_RESTART_COUNT:-0}-rank-$SLURM_PROCID"
{ echo "argv $*"
  echo "slurm procid=$SLURM_PROCID ntasks=$SLURM_NTASKS localid=$SLURM_LOCALID"
  echo "master $MASTER_ADDR:$MASTER_PORT"
  echo "rank ${RANK-unset} world_size ${WORLD_SIZE-unset} omp ${OMP_NUM_THREADS-unset}"
} > "$out.info"
stop=0
trap 'echo USR1 >> "$out.signals"; stop=1' USR1
trap 'echo TERM >> "$out.signals"; stop=1' TERM
touch "$out.ready"
case "$FAKE_MODE:${SLURM_RESTART_COUNT:-0}:$SLURM_PROCID" in
  fail:*:1) echo "binaryduo: error: rank 1 failed on purpose" >&2; exit 3 ;;
  preempt:0:*) ;;
  preempt:*) echo "resumed attempt ${SLURM_RESTART_COUNT}"; exit 0 ;;
esac
for i in $(seq 1 600); do
  sleep 0.2
  if [ "$stop" = 1 ] && [ "$FAKE_MODE" = preempt ]; then
    sleep 1  # a duplicated signal would arrive (and be counted) meanwhile
    if [ "$SLURM_PROCID" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
    echo "binaryduo: preempted: fake checkpoint; Slurm job $SLURM_JOB_ID requeued" >&2
    exit 75
  fi
done
exit 0
"""



def _fake_trainer(directory: Path) -> Path:
    path = directory / "fake-binaryduo"
    path.write_text(FAKE_TRAINER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _submit_by_hand(cluster, tmp_path: Path, mode: str, *sbatch_args: str) -> tuple[str, Path, Path]:
    """``RECIPE=... RUN_DIR=... sbatch ... slurm/binaryduo.sbatch``, as slurm/README.md shows."""
    run_dir, out = tmp_path / "run", tmp_path / "fake"
    run_dir.mkdir()
    out.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: unused-by-the-fake\n")
    env = {**cluster.env, "RECIPE": str(recipe), "RUN_DIR": str(run_dir),
           "BINARYDUO": str(_fake_trainer(tmp_path)), "FAKE_MODE": mode, "FAKE_OUT": str(out)}
    done = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", f"--output={run_dir}/slurm-%j.out",
         f"--error={run_dir}/slurm-%j.err", *sbatch_args, str(TEMPLATE)],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], run_dir, out


def _wait_for_files(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not created within {timeout} s: {paths}"
        time.sleep(0.2)


def test_by_hand_usr1_reaches_every_task_once_and_the_requeued_job_resumes(
        slurm_cluster, tmp_path, binaryduo):
    job, run_dir, out = _submit_by_hand(slurm_cluster, tmp_path, "preempt")
    _wait_for_files([out / "attempt-0-rank-0.ready", out / "attempt-0-rank-1.ready"], 60)
    # what Slurm's --signal=B:USR1@lead does ahead of the time limit: the batch shell only
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    fields = slurm_cluster.wait_for(job, TERMINAL, timeout=90)
    assert fields["JobState"] == "COMPLETED", fields
    assert fields["Restarts"] == "1"

    for rank in (0, 1):
        signals = (out / f"attempt-0-rank-{rank}.signals").read_text().split()
        assert signals.count("USR1") == 1, (rank, signals)  # forwarded by srun exactly once
        first = (out / f"attempt-0-rank-{rank}.info").read_text()
        again = (out / f"attempt-1-rank-{rank}.info").read_text()
        assert f"argv train {tmp_path / 'recipe.yaml'} --output {run_dir}" in first
        assert f"argv train {tmp_path / 'recipe.yaml'} --resume {run_dir}" in again
        assert f"master {socket.gethostname()}:{15000 + int(job) % 20000}" in first
        assert "rank unset world_size unset omp 1" in first  # ranks come from SLURM_PROCID
        assert f"slurm procid={rank} ntasks=2 localid={rank}" in first

    attempts = (run_dir / "slurm" / "attempts.log").read_text()
    assert re.search(rf"job={job} attempt=0 end status=75", attempts), attempts
    assert re.search(rf"job={job} attempt=1 end status=0", attempts), attempts
    output = (run_dir / f"slurm-{job}.out").read_text()  # --open-mode=append: both attempts
    assert f"job {job} attempt 0" in output and "resumed attempt 1" in output

    status = binaryduo("slurm", "status", run_dir, cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"job {job}: COMPLETED" in status.stdout
    assert "attempts: 2 started (requeued 1 time)" in status.stdout
    assert "binaryduo: preempted: fake checkpoint" in status.stdout  # the trainer's messages


def test_a_failing_rank_ends_the_job_promptly_and_status_reports_it(slurm_cluster, tmp_path,
                                                                    binaryduo):
    started = time.monotonic()
    job, run_dir, out = _submit_by_hand(slurm_cluster, tmp_path, "fail")
    fields = slurm_cluster.wait_for(job, TERMINAL, timeout=60)
    assert fields["JobState"] == "FAILED", fields
    assert time.monotonic() - started < 45  # rank 0 alone would have run for 120 s
    status = binaryduo("slurm", "status", run_dir, cwd=tmp_path)
    assert status.returncode == 1, status.stdout + status.stderr
    assert f"job {job}: FAILED" in status.stdout
    assert "binaryduo: error: rank 1 failed on purpose" in status.stdout
    # srun --kill-on-bad-exit stops the surviving rank with SIGTERM first
    assert (out / "attempt-0-rank-0.signals").read_text().split() == ["TERM"]


# -- the real trainer through `binaryduo slurm submit` ---------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fashion_mnist, tiny_recipe_text):
    path = tmp_path_factory.mktemp("slurm-submit")
    (path / "tiny.yaml").write_text(tiny_recipe_text.replace("name: tiny-duo", "name: tiny-slurm")
                                    .replace("DATA", str(fashion_mnist)))
    return path


def _submit(binaryduo, workdir: Path, run: str, *extra: str) -> str:
    done = binaryduo("slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                     "--tasks-per-node", "2", "--output", f"runs/{run}",
                     "--tracking-uri", f"sqlite:///{workdir / run}.db", *extra, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"^submitted job (\d+)$", done.stdout, re.M)
    assert match and f"run directory {workdir / 'runs' / run}" in done.stdout, done.stdout
    return match.group(1)


def _manifest_top1(run_dir: Path) -> dict[str, float]:
    return {stage: json.loads((run_dir / "checkpoints" / stage / "manifest.json").read_text())
            ["epochs"][-1]["top1"] for stage in ("coupled", "finetune")}


def _mlflow_record(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags.get("stage"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    final = {}
    for stage, run in children.items():
        history = client.get_metric_history(run.info.run_id, "val_top1")
        final[stage] = max(history, key=lambda m: m.step).value
    return {"parents": parents, "children": children, "final_top1": final}


def _job_report(run_dir: Path, job: str) -> str:
    text = []
    for name in (f"slurm-{job}.out", f"slurm-{job}.err", "slurm/attempts.log"):
        if (run_dir / name).exists():
            text.append(f"--- {name}\n" + (run_dir / name).read_text()[-3000:])
    return "\n".join(text)


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, workdir, binaryduo):
    """The tiny recipe, 2 tasks, never interrupted."""
    job = _submit(binaryduo, workdir, "reference")
    fields = slurm_cluster.wait_for(job, TERMINAL, timeout=JOB_TIMEOUT)
    run_dir = workdir / "runs" / "reference"
    assert fields["JobState"] == "COMPLETED", _job_report(run_dir, job)
    return job, run_dir


def test_submit_trains_the_recipe_into_one_mlflow_record(reference_run, workdir, binaryduo):
    job, run_dir = reference_run
    record = _mlflow_record(f"sqlite:///{workdir / 'reference'}.db")
    assert len(record["parents"]) == 1
    parent = record["parents"][0]
    assert set(record["children"]) == {"coupled", "finetune"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id
               for r in record["children"].values())
    assert all(r.info.status == "FINISHED" for r in [parent, *record["children"].values()])
    assert parent.data.tags["world_size"] == "2"
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["parent_run_id"] == parent.info.run_id
    assert state["completed"] == ["coupled", "finetune"]
    assert _manifest_top1(run_dir) == pytest.approx(record["final_top1"], abs=0)
    for stage, epochs in (("coupled", 2), ("finetune", 1)):
        manifest = json.loads((run_dir / "checkpoints" / stage / "manifest.json").read_text())
        assert manifest["epochs"][-1]["epoch"] == epochs
        assert (run_dir / "checkpoints" / stage / manifest["latest"] / "model_state.pt").is_file()
    # the job trained the frozen copy, and the submit-time record is there
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["recipe_file"] == str(run_dir / "slurm" / "recipe.yaml")
    submission = json.loads((run_dir / "slurm" / "submission.json").read_text())
    assert submission["job_id"] == job and submission["command"][1:3] == ["slurm", "submit"]

    status = binaryduo("slurm", "status", run_dir, cwd=workdir)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"job {job}: COMPLETED" in status.stdout
    assert re.search(r"stage coupled +coupled +epoch 2/2 .* done", status.stdout), status.stdout
    listing = binaryduo("slurm", "status", cwd=workdir)
    assert re.search(rf"{job} +COMPLETED +runs/reference ", listing.stdout), listing.stdout


def test_a_preempted_job_requeues_and_ends_like_an_uninterrupted_one(
        slurm_cluster, reference_run, workdir, binaryduo):
    job = _submit(binaryduo, workdir, "preempted")
    run_dir = workdir / "runs" / "preempted"
    manifest = run_dir / "checkpoints" / "coupled" / "manifest.json"
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:  # signal as soon as the first epoch is checkpointed: stage 'coupled' is running
        try:
            if json.loads(manifest.read_text())["epochs"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        fields = slurm_cluster.job_fields(job)
        assert fields.get("JobState") not in TERMINAL, _job_report(run_dir, job)
        assert time.monotonic() < deadline, f"no epoch ended within {JOB_TIMEOUT} s"
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    fields = slurm_cluster.wait_for(job, TERMINAL, timeout=JOB_TIMEOUT)
    report = _job_report(run_dir, job)
    assert fields["JobState"] == "COMPLETED", report
    assert fields["Restarts"] == "1", report

    errors = (run_dir / f"slurm-{job}.err").read_text()
    assert re.search(r"binaryduo: preempted: .*stage 'coupled'.*requeued", errors), report
    # attempt 0 ends with 75, or 143 when Slurm's SIGTERM for the requeue beats a rank's exit
    attempts = (run_dir / "slurm" / "attempts.log").read_text()
    assert re.search(rf"job={job} attempt=0 end status=(75|143)\b", attempts), report
    assert re.search(rf"job={job} attempt=1 start.*\n.*job={job} attempt=1 end status=0\n",
                     attempts), report

    reference = _mlflow_record(f"sqlite:///{workdir / 'reference'}.db")
    record = _mlflow_record(f"sqlite:///{workdir / 'preempted'}.db")
    assert len(record["parents"]) == 1 and set(record["children"]) == {"coupled", "finetune"}
    assert record["final_top1"] == reference["final_top1"]
    assert _manifest_top1(run_dir) == _manifest_top1(reference_run[1])
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["parent_run_id"] == record["parents"][0].info.run_id
    status = binaryduo("slurm", "status", run_dir, cwd=workdir)
    assert status.returncode == 0 and "requeued 1 time)" in status.stdout, status.stdout


def test_a_job_whose_data_vanished_fails_and_status_shows_the_error(slurm_cluster, workdir,
                                                                    fashion_mnist, binaryduo,
                                                                    tiny_recipe_text):
    link = workdir / "data-link"
    link.symlink_to(fashion_mnist)
    (workdir / "vanishing.yaml").write_text(tiny_recipe_text.replace("DATA", str(link)))
    done = binaryduo("slurm", "submit", "vanishing.yaml", "--nodes", "1", "--gpus-per-node", "0",
                     "--tasks-per-node", "2", "--output", "runs/vanishing", "--smoke",
                     "--sbatch-option=--hold", cwd=workdir)
    assert done.returncode == 0, done.stderr
    job = re.search(r"^submitted job (\d+)$", done.stdout, re.M).group(1)
    link.unlink()  # after the submit-time validation, before the job starts
    slurm_cluster.run("scontrol", "release", job)
    fields = slurm_cluster.wait_for(job, TERMINAL, timeout=300)
    assert fields["JobState"] == "FAILED"
    status = binaryduo("slurm", "status", "runs/vanishing", cwd=workdir)
    assert status.returncode == 1, status.stdout + status.stderr
    assert f"job {job}: FAILED" in status.stdout
    assert re.search(r"binaryduo: error: .*data.root: dataset directory .*data-link does not exist",
                     status.stdout), status.stdout


# -- a job array of seeds --------------------------------------------------------------------------


def _wait_for_epoch(slurm_cluster, run_dir: Path, job: str) -> None:
    """Until the run's first coupled epoch is checkpointed (the job must not end meanwhile)."""
    manifest = run_dir / "checkpoints" / "coupled" / "manifest.json"
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        try:
            if json.loads(manifest.read_text())["epochs"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert slurm_cluster.job_fields(job).get("JobState") not in TERMINAL, \
            _job_report(run_dir, job)
        assert time.monotonic() < deadline, f"no epoch ended within {JOB_TIMEOUT} s"
        time.sleep(0.1)


def test_an_array_trains_each_seed_into_its_own_run_and_requeues_only_the_preempted_task(
        slurm_cluster, workdir, binaryduo, monkeypatch, capsys):
    started = time.monotonic()
    uri = f"sqlite:///{workdir / 'array'}.db"
    done = binaryduo("slurm", "submit", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                     "--tasks-per-node", "1", "--seeds", "3,4", "--output", "runs/array",
                     "--tracking-uri", uri, cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    array = re.search(r"^submitted job array (\d+): 2 tasks, seeds 3-4", done.stdout, re.M)
    assert array, done.stdout
    array = array.group(1)
    run_dir = workdir / "runs" / "array"
    task = {seed: f"{array}_{seed}" for seed in (3, 4)}
    for seed in (3, 4):  # one CPU each: both run at once on the 2-CPU node
        slurm_cluster.wait_for(task[seed], {"RUNNING"}, timeout=120)
    # Preempt the task that carries the array's own job id as its SLURM_JOB_ID (the last one to
    # start): `scontrol requeue <that id>` would requeue every running task of the array.
    ids = {seed: slurm_cluster.job_fields(task[seed])["JobId"] for seed in (3, 4)}
    target = next(seed for seed in (3, 4) if ids[seed] == array)
    other = 7 - target
    _wait_for_epoch(slurm_cluster, run_dir / f"seed-{target}", task[target])
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", task[target])
    fields = {seed: slurm_cluster.wait_for(task[seed], TERMINAL, timeout=JOB_TIMEOUT)
              for seed in (3, 4)}
    reports = {seed: _job_report(run_dir / f"seed-{seed}", task[seed]) for seed in (3, 4)}
    assert fields[target]["JobState"] == "COMPLETED", reports[target]
    assert fields[other]["JobState"] == "COMPLETED", reports[other]
    assert fields[target]["Restarts"] == "1" and fields[other]["Restarts"] == "0", reports

    # each task in its own run directory, with its own attempts and output files
    errors = (run_dir / f"seed-{target}" / f"slurm-{task[target]}.err").read_text()
    assert re.search(rf"binaryduo: preempted: .*stage 'coupled'.*Slurm job {task[target]} "
                     rf"requeued", errors), reports[target]
    attempts = (run_dir / f"seed-{target}" / "slurm" / "attempts.log").read_text()
    # attempt 0 ends with 75, or 143 when Slurm's SIGTERM for the requeue beats a rank's exit, or
    # records no end when the batch shell is killed (KillWait) before srun has returned
    assert re.search(rf"job={task[target]} attempt=0 start", attempts), attempts
    assert not re.search(rf"job={task[target]} attempt=0 end status=(?!(75|143)\b)", attempts), \
        attempts
    assert re.search(rf"job={task[target]} attempt=1 start.*\n.*job={task[target]} attempt=1 "
                     rf"end status=0\n", attempts), attempts
    attempts = (run_dir / f"seed-{other}" / "slurm" / "attempts.log").read_text().splitlines()
    assert [l.split(" ", 1)[1] for l in attempts if " end " in l] == [
        f"job={task[other]} attempt=0 end status=0"], attempts
    for seed in (3, 4):
        resolved = yaml.safe_load((run_dir / f"seed-{seed}" / "recipe.resolved.yaml").read_text())
        assert resolved["seed"] == seed

    # MLflow: one parent run per seed, both FINISHED, one sweep id; the preempted one continued
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    parents = {int(r.data.tags["seed"]): r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents) == [3, 4] and len(runs) == 6, [r.data.tags for r in runs]
    submission = json.loads((run_dir / "slurm" / "submission.json").read_text())
    for seed, parent in parents.items():
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["sweep_id"] == submission["sweep_id"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["stage"] for r in children) == ["coupled", "finetune"]
        assert all(r.info.status == "FINISHED" for r in children)
        state = json.loads((run_dir / f"seed-{seed}" / "run_state.json").read_text())
        assert state["parent_run_id"] == parent.info.run_id and state["finished"]

    from binaryduo.trainer.cli.main import main  # in this process: no second start-up

    monkeypatch.chdir(workdir)
    capsys.readouterr()
    assert main(["slurm", "status", "runs/array"]) == 0
    status = capsys.readouterr().out
    assert f"job array {array}: 2 tasks, 2 COMPLETED" in status, status
    for seed in (3, 4):
        assert re.search(rf"^ +{seed}  {task[seed]} +COMPLETED +{2 if seed == target else 1}  "
                         rf"finetune +1/1 +\d+\.\d\d  done$", status, re.M), status
    assert f"--sweep {submission['sweep_id']} --tracking-uri {uri}" in status
    assert main(["slurm", "status"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"{array}_\* +COMPLETED +runs/array +seeds 3-4: 2 COMPLETED", listing), \
        listing
    with capsys.disabled():
        print(f"\n[array test] 2 seeds, one preempted and requeued: "
              f"{time.monotonic() - started:.0f} s\n{status}")
