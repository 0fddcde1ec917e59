"""A tracking server that goes away (issue 5), against a real ``mlflow server`` on 127.0.0.1 that
the tests stop and restart on the same port, sqlite store and artifact folder.

- down at start: one line, non-zero exit, within seconds, nothing written;
- Tracker calls while the server is hung or refusing: bounded cost, records kept;
- stopped mid-run (a stage run is created while it is down) and restarted: training goes on and
  delivers the backlog itself; the server ends with exactly what the journal holds;
- ``--offline``, then ``binaryduo tracking replay`` into a fresh server: the full record; replaying
  again (also with the acknowledgements lost) adds nothing; resuming the run, whose run_state.json
  holds placeholder ids, logs into the same runs.

"The full record" is checked against the journal (every metric value, step and timestamp, each
exactly once; params; tags; nesting; artifact sizes) and against the epoch summaries the training
printed, which do not come from the journal.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from binaryduo.trainer.tracking.tracker import Tracker
from binaryduo.trainer.tracking.journal import Journal

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).with_name("binaryduo")
MLFLOW = Path(sys.executable).with_name("mlflow")
SUMMARY = re.compile(r"^\[(\w+)\] epoch (\d+)/\d+  loss \S+  val top-1 (\S+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real ``mlflow server`` that can be stopped and started again with the same port, store
    and artifact folder."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "Server":
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("mlflow server did not come up within 60 s")
            time.sleep(0.3)

    def signal(self, sig) -> None:
        os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        self.process = None

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.url)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    made = Server(root)
    yield made
    made.stop()


def _env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _binaryduo(*args, cwd, **env):
    return subprocess.run([str(BIN), *map(str, args)], cwd=cwd, env=_env(**env), text=True,
                          capture_output=True, timeout=600)


class Training:
    """``binaryduo train`` in the background; stdout and stderr read line by line as they come."""

    def __init__(self, *args, cwd, **env):
        self.process = subprocess.Popen([str(BIN), "train", *map(str, args)], cwd=cwd,
                                        env=_env(**env), text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.stdout),
                                               (self.process.stderr, self.stderr))]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, lines: list[str], pattern: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if re.search(pattern, line):
                    return line
            if self.process.poll() is not None and not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; stdout:\n" + "\n".join(self.stdout)
                             + "\nstderr:\n" + "\n".join(self.stderr[-40:]))

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=10)
        return code


def summaries(stdout: str | list[str]) -> dict[tuple[str, int], float]:
    """{(stage, epoch): val top-1} from the epoch summary lines the training printed."""
    lines = stdout.splitlines() if isinstance(stdout, str) else stdout
    return {(m.group(1), int(m.group(2))): float(m.group(3))
            for m in map(SUMMARY.match, lines) if m}


def assert_server_holds_the_journal(client: MlflowClient, run_dir: Path,
                                    printed: dict[tuple[str, int], float]) -> dict:
    """Every record of the run's journal is on the server exactly once; returns a snapshot of the
    server's record (to compare after a second replay)."""
    journal = Journal(run_dir)
    assert journal.pending() == []
    records = [journal.records[s] for s in sorted(journal.records)]
    creates = [r for r in records if r["op"] == "create_run"]
    assert len(creates) == 3  # the parent and two stages: a resume reopens, it never creates
    real = {r["local_id"]: journal.run_ids[r["local_id"]] for r in creates}

    def canonical(run_id):
        return real.get(run_id, run_id)

    experiment = client.get_experiment_by_name("binaryduo").experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert set(runs) == set(real.values())  # no duplicate runs, none missing
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    stages = {r.data.tags["stage"]: r for r in runs.values() if r is not parent}
    assert set(stages) == {"coupled", "finetune"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    assert all(r.info.status == "FINISHED" for r in runs.values())
    state = json.loads((run_dir / "run_state.json").read_text())
    assert canonical(state["parent_run_id"]) == parent.info.run_id
    assert {k: canonical(v) for k, v in state["stage_run_ids"].items()} == {
        k: r.info.run_id for k, r in stages.items()}

    expected: dict[tuple[str, str], list] = {}
    for record in records:
        run = runs[canonical(record.get("run_id") or real.get(record.get("local_id")))]
        if record["op"] == "log_metrics":
            for key, value in record["metrics"].items():
                expected.setdefault((run.info.run_id, key), []).append(
                    (record["step"], value, record["timestamp"]))
        elif record["op"] == "log_params":
            for key, value in record["params"].items():
                assert run.data.params[key] == value
        elif record["op"] == "create_run":
            assert {k: run.data.tags[k] for k in record["tags"]} == record["tags"]
        elif record["op"] == "log_artifact":
            listed = {Path(a.path).name: a.file_size
                      for a in client.list_artifacts(run.info.run_id, record["artifact_path"])}
            assert listed[Path(record["path"]).name] == Path(record["path"]).stat().st_size
    snapshot = {}
    for (run_id, key), points in expected.items():
        history = sorted((m.step, m.value, m.timestamp)
                         for m in client.get_metric_history(run_id, key))
        assert history == sorted(points), (key, history, points)  # each exactly once
        snapshot[(run_id, key)] = history
    # the journal is complete: every epoch the training printed is on the server, same value
    for (stage, epoch), top1 in printed.items():
        values = {s: v for s, v, _ in snapshot[(stages[stage].info.run_id, "val_top1")]}
        assert round(values[epoch], 2) == top1
    assert {s for s, _ in printed} == {"coupled", "finetune"} and len(printed) == 3
    assert sorted(s for s, *_ in snapshot[(stages["coupled"].info.run_id, "val_top1")]) == [1, 2]
    assert sorted(s for s, *_ in snapshot[(stages["finetune"].info.run_id, "val_top1")]) == [0, 1]
    assert {"recipe.resolved.yaml", "provenance.json", "training_curves.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "model" in {a.path for a in client.list_artifacts(stages["finetune"].info.run_id)}
    # dataset inputs and logged models: what the journal holds, each exactly once
    inputs: dict[str, set] = {}
    for record in records:
        if record["op"] == "log_inputs":
            run = runs[canonical(record["run_id"])]
            inputs.setdefault(run.info.run_id, set()).update(
                (d["name"], d["digest"], d["context"]) for d in record["datasets"])
    assert set(inputs) == set(runs)  # the parent and every stage
    for run_id, expected_inputs in inputs.items():
        found = [(i.dataset.name, i.dataset.digest, i.tags[0].value)
                 for i in client.get_run(run_id).inputs.dataset_inputs]
        assert sorted(found) == sorted(expected_inputs)  # no duplicate after any replay
        assert [c for *_, c in sorted(found)] == ["training", "validation"]
    model_records = [r for r in records if r["op"] == "log_model"]
    # a resume of the finished run logs them again: still one model per stage on the server
    assert {r["name"] for r in model_records} == {"coupled", "finetune"}
    logged = client.search_logged_models([experiment])
    assert sorted((m.source_run_id, m.name) for m in logged) == sorted(
        {(stages[r["name"]].info.run_id, r["name"]) for r in model_records})  # one each
    assert all(str(m.status).endswith("READY") for m in logged)
    for model in logged:
        outputs = client.get_run(model.source_run_id).outputs.model_outputs
        assert [o.model_id for o in outputs] == [model.model_id]
        assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    snapshot["models"] = sorted(m.model_id for m in logged)
    snapshot["runs"] = sorted(runs)
    snapshot["params"] = {r: runs[r].data.params for r in runs}
    return snapshot


# ----------------------------------------------------------------------------------- the tests

def test_server_down_at_start_is_one_line_before_any_compute(tmp_path, tiny_recipe):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    result = _binaryduo("train", tiny_recipe, "--output", "run", "--tracking-uri", url,
                        cwd=tmp_path)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"binaryduo: error: tracking server {url}: not reachable (connection "
                     f"refused); start it, or train with --offline (records stay in the run "
                     f"directory; deliver them later with `binaryduo tracking replay RUN_DIR`)"]
    assert seconds < 20, seconds  # no MLflow retry storm (its default: minutes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # nothing written


def test_tracker_calls_stay_cheap_while_the_server_is_away(tmp_path, server, monkeypatch, capfd):
    """In process: a hung server (SIGSTOP: connections accepted, never answered) costs one
    time-out per back-off interval, a stopped one nothing measurable; nothing is lost; the end of
    the run names the replay command."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("BINARYDUO_TRACKING_RETRY_S", "60")
    server.start()
    run_dir = tmp_path / "run"
    tracker = Tracker(server.url, "binaryduo", enabled=True, journal_dir=run_dir)
    parent = tracker.start_run("parent", tags={"stage": "none"})
    assert not parent.startswith("local-")
    tracker.log_metrics(parent, {"m": 0.0}, step=0)

    server.signal(signal.SIGSTOP)  # hung
    started = time.monotonic()
    child = tracker.start_run("child", parent=parent)
    first = time.monotonic() - started
    assert child.startswith("local-")  # a placeholder, mapped once delivered
    started = time.monotonic()
    for step in range(1, 101):
        tracker.log_metrics(child, {"m": float(step)}, step=step)
    # bounds 5-10x above what it takes, far below MLflow's default retry storm (minutes)
    assert first < 10 and time.monotonic() - started < 5, first  # no retry storm, no re-tries
    server.signal(signal.SIGCONT)
    server.stop()  # gone

    artifact = tmp_path / "notes.txt"
    artifact.write_text("as logged")
    started = time.monotonic()
    tracker.log_artifact(child, artifact)
    artifact.write_text("changed later")  # the journal kept a copy of the file as logged
    tracker.finish(child)
    assert time.monotonic() - started < 5
    assert tracker.close() == 103  # child create, 100 metrics, artifact, finish
    err = capfd.readouterr().err
    assert err.count("not reachable") == 2  # the warning (once), then the end-of-run line
    assert "103 tracking records not delivered" in err
    assert f"deliver them with: binaryduo tracking replay {run_dir}" in err

    server.start()
    replay = _binaryduo("tracking", "replay", run_dir, cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert "delivered 103 records" in replay.stdout and "nothing pending" in replay.stdout
    client = server.client()
    real = Journal(run_dir).run_ids[child]
    assert client.get_run(real).data.tags["mlflow.parentRunId"] == parent
    assert [m.step for m in client.get_metric_history(real, "m")] == list(range(1, 101))
    downloaded = client.download_artifacts(real, "notes.txt", str(tmp_path))
    assert Path(downloaded).read_text() == "as logged"
    assert not list((run_dir / "mlflow-journal" / "spool").rglob("*.txt"))  # copy removed


def test_server_stopped_mid_run_and_restarted(tmp_path, tiny_recipe, server):
    """The server dies after the first epoch (the second stage's run is created while it is
    down), comes back while training goes on: training delivers the backlog itself."""
    server.start()
    training = Training(tiny_recipe, "--output", "run", "--tracking-uri", server.url,
                        cwd=tmp_path, BINARYDUO_TRACKING_RETRY_S="1")
    training.wait_for(training.stdout, r"^\[coupled\] epoch 1/2 ")
    server.stop()
    journal = tmp_path / "run" / "mlflow-journal" / "journal.jsonl"
    deadline = time.monotonic() + 120  # until the fine-tune stage's run exists (as placeholder)
    while journal.read_text().count('"op":"create_run"') < 3:
        assert time.monotonic() < deadline and training.process.poll() is None
        time.sleep(0.05)
    training.process.send_signal(signal.SIGSTOP)  # hold training while the server restarts
    try:
        warning = training.wait_for(training.stderr, "not reachable", timeout=30)
        server.start()
    finally:
        training.process.send_signal(signal.SIGCONT)
    code = training.finish()
    err = "\n".join(training.stderr)
    assert code == 0, err[-3000:]
    assert warning.startswith(f"binaryduo: warning: tracking server {server.url} not reachable "
                              f"(connection refused); training goes on")
    assert re.search(r"tracking server \S+ is back; delivered \d+ pending records", err)
    assert "not delivered" not in err
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["stage_run_ids"]["finetune"].startswith("local-")
    assert_server_holds_the_journal(server.client(), tmp_path / "run",
                                    summaries(training.stdout))


def test_offline_then_replay_into_a_fresh_server(tmp_path, tiny_recipe, server):
    """--offline contacts no server (none runs); replay delivers the full record; replaying again
    adds nothing, even with every acknowledgement lost; the resumed run uses the same runs."""
    trained = _binaryduo("train", tiny_recipe, "--output", "run", "--offline",
                         "--tracking-uri", server.url, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    offline_line = [line for line in trained.stderr.splitlines() if "offline" in line]
    assert len(offline_line) == 1 and offline_line[0].startswith("binaryduo: offline: ")
    assert offline_line[0].endswith(f"deliver them to {server.url} with: binaryduo tracking "
                                    f"replay run (or add --tracking-uri URI)")
    assert (tmp_path / "run" / "training_curves.png").is_file()  # drawn from the journal
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert all(i.startswith("local-") for i in [state["parent_run_id"],
                                                 *state["stage_run_ids"].values()])

    down = _binaryduo("tracking", "replay", "run", cwd=tmp_path)  # server not started yet
    assert down.returncode == 1 and "not reachable (connection refused)" in down.stderr

    server.start()
    replay = _binaryduo("tracking", "replay", "run", cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert re.search(r"delivered \d+ records to .*3 create_run.*; nothing pending", replay.stdout)
    client = server.client()
    printed = summaries(trained.stdout)
    before = assert_server_holds_the_journal(client, tmp_path / "run", printed)

    again = _binaryduo("tracking", "replay", "run", cwd=tmp_path)
    assert again.returncode == 0 and "nothing pending" in again.stdout

    # acknowledgements lost (a replay killed between sending and writing them): all of it again.
    # Not those of spooled artifacts: their copy is removed only after the acknowledgement is
    # written, so a lost acknowledgement always comes with its copy still there.
    journal = tmp_path / "run" / "mlflow-journal" / "journal.jsonl"
    spooled = set(Journal(tmp_path / "run").spooled)
    journal.write_text("".join(line for line in journal.read_text().splitlines(keepends=True)
                               if not line.startswith('{"done"')
                               or json.loads(line)["done"] in spooled))
    repeated = _binaryduo("tracking", "replay", "run", cwd=tmp_path)
    assert repeated.returncode == 0, repeated.stderr
    resent = int(re.search(r"delivered (\d+) records", repeated.stdout).group(1))
    assert resent == len(Journal(tmp_path / "run").records) - len(spooled) > 20
    assert assert_server_holds_the_journal(client, tmp_path / "run", printed) == before

    # the run directory keeps its placeholder ids; a resume maps them, creates nothing new
    resumed = _binaryduo("train", tiny_recipe, "--resume", "run", "--tracking-uri", server.url,
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not delivered" not in resumed.stderr
    after = assert_server_holds_the_journal(client, tmp_path / "run", printed)
    assert after["runs"] == before["runs"]


def _offline_journal(tmp_path: Path) -> tuple[Path, str, str, Tracker]:
    """An offline run directory whose journal holds a parent run with a metric; returns
    (run directory, sqlite URI, the parent's placeholder id, the tracker)."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    run_dir = tmp_path / "run"
    tracker = Tracker(uri, "binaryduo", enabled=True, journal_dir=run_dir, offline=True)
    parent = tracker.start_run("parent")
    tracker.log_metrics(parent, {"m": 1.0}, step=1)
    return run_dir, uri, parent, tracker


def test_a_rejected_record_can_be_discarded_and_the_rest_delivered(tmp_path):
    run_dir, uri, parent, tracker = _offline_journal(tmp_path)
    tracker.log_metrics("0123456789abcdef0123456789abcdef", {"m": 2.0}, step=2)  # no such run
    tracker.log_metrics(parent, {"m": 3.0}, step=3)
    tracker.close()
    bad = next(r["seq"] for r in Journal(run_dir).pending()
               if r.get("run_id") == "0123456789abcdef0123456789abcdef")

    stuck = _binaryduo("tracking", "replay", run_dir, cwd=tmp_path)
    assert stuck.returncode == 1
    assert f"binaryduo tracking replay RUN_DIR --discard {bad}" in stuck.stderr
    done = _binaryduo("tracking", "replay", run_dir, "--discard", bad, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"discarded record {bad}" in done.stdout and "nothing pending" in done.stdout
    journal = Journal(run_dir)
    assert not journal.pending() and journal.discarded == {bad}
    real = journal.run_ids[parent]
    history = MlflowClient(tracking_uri=uri).get_metric_history(real, "m")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (3, 3.0)]


def test_a_crafted_journal_cannot_upload_or_delete_files_outside_the_run(tmp_path):
    run_dir, uri, parent, tracker = _offline_journal(tmp_path)
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("private")
    tracker.log_artifact(parent, secret)  # a path outside the run directory
    tracker.close()
    seq = next(r["seq"] for r in Journal(run_dir).pending() if r["op"] == "log_artifact")
    with open(run_dir / "mlflow-journal" / "journal.jsonl", "a") as journal:  # and a spool line
        journal.write(json.dumps({"spool": seq, "path": str(secret)}) + "\n")
    refused = _binaryduo("tracking", "replay", run_dir, cwd=tmp_path)
    assert refused.returncode == 1
    assert f"refusing to upload {secret}: outside the run directory" in refused.stderr
    assert secret.read_text() == "private"  # not deleted either
    real = Journal(run_dir).run_ids[parent]
    assert not MlflowClient(tracking_uri=uri).list_artifacts(real)


def test_a_model_logged_and_registered_while_away_is_delivered_once(tmp_path,
                                                                   mlflow_global_uri):
    """``log_model`` / ``register_model`` records of an offline run: replay makes one logged
    model (READY, linked to the run, loadable) and one registered version; replaying again with
    every acknowledgement lost, or after a delivery cut short (a PENDING model without
    artifacts), adds nothing."""
    import mlflow.pytorch
    import torch

    from binaryduo import models
    from binaryduo.trainer.tracking.models import MODEL_KEY_TAG, save_stage_model

    run_dir, uri, parent, tracker = _offline_journal(tmp_path)
    network = models.build("vgg7", "bnn", width_mult=0.25, num_classes=10, in_channels=1)
    saved = save_stage_model(network, run_dir / "mlflow-models" / "bnn", input_shape=(1, 32, 32),
                             metadata={"stage": "bnn"})
    tracker.log_model(parent, "bnn", saved, step=1)
    tracker.register_model(parent, "bnn", "tiny-bnn")
    tracker.finish(parent)
    assert tracker.close() == 5  # create, metric, model, registration, finish

    # a first delivery cut short: the run and a PENDING logged model without artifacts exist
    client = MlflowClient(tracking_uri=uri)
    partial = Tracker(uri, "binaryduo", enabled=True, journal_dir=run_dir)
    partial._sender.deliver(Journal(run_dir).pending()[0])  # creates the run, not acknowledged
    real = partial._sender.real_id(parent)
    experiment = partial._sender.ensure_experiment()
    client.create_logged_model(experiment, name="bnn", source_run_id=real,
                               tags={MODEL_KEY_TAG: f"{real}/bnn"})
    partial.close()

    for attempt in range(3):
        if attempt == 2:  # every acknowledgement lost
            journal = run_dir / "mlflow-journal" / "journal.jsonl"
            journal.write_text("".join(line for line in journal.read_text().splitlines(True)
                                       if not line.startswith('{"done"')))
        replay = _binaryduo("tracking", "replay", run_dir, cwd=tmp_path)
        assert replay.returncode == 0, replay.stderr
        logged = client.search_logged_models([experiment])
        assert [(m.name, m.source_run_id, str(m.status)) for m in logged] == [
            ("bnn", real, "READY")]
        assert [o.model_id for o in client.get_run(real).outputs.model_outputs] == [
            logged[0].model_id]
        versions = client.search_model_versions("name = 'tiny-bnn'")
        assert [(int(v.version), v.source) for v in versions] == [
            (1, f"models:/{logged[0].model_id}")]
    mlflow_global_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/{logged[0].model_id}", dst_path=str(tmp_path))
    images = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), network.eval()(images))
