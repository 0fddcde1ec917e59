"""MLflow records: one parent run per recipe run, one nested run per stage; rank 0 only.

The embedded default is a sqlite store ``./mlflow.db`` (artifacts beside it in ``./mlartifacts``),
shared by successive runs so they can be compared; ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``
point at a server instead. Run ids are kept in the run directory so a resumed run logs into the
same runs.

When the tracking server goes away (``binaryduo train`` gives the Tracker a run directory):

- at start, ``check_tracking_server`` asks an http(s) server one quick question before anything
  runs; no answer is a one-line error (or train with ``--offline``);
- every record is first appended to the run's journal (:mod:`.tracking_journal`), then sent. A
  send that fails because the server is unreachable (connection refused, time-out, HTTP 5xx, 401,
  403, 429) leaves the record pending: one warning line, training goes on. Later calls first send
  the backlog, in order, at most once per back-off interval (5 s doubling to 120 s, capped by
  ``BINARYDUO_TRACKING_RETRY_S``); every HTTP request gets a 10 s time-out and no MLflow retries
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` win when set) and a try
  stops at the first failure, so a dead server costs training seconds, not minutes;
- a run created while the server is away gets a placeholder id ``local-<hex>``, which is what
  ``run_state.json`` keeps; the journal maps it to the MLflow id once delivered (every run created
  through a journal carries the tag ``binaryduo.local_run_id``, so the mapping can also be found
  on the server, and a create that was sent but not acknowledged is not sent twice);
- a rejection (HTTP 4xx: bad value, unknown run) is not a reachability problem: it raises
  :class:`TrackingError` as before, and the record stays pending in the journal;
- at the end (``close``) the backlog is tried once more; what is still pending is counted, with
  the command that delivers it: ``binaryduo tracking replay RUN_DIR``. The training itself exits 0
  (its checkpoints and results are complete and nothing is lost). Replaying is idempotent: params
  already on the run are skipped, the store drops a metric identical in key, value, step and
  timestamp, tags and artifacts overwrite themselves, and creates look for their placeholder tag.

``Tracker.client`` is what ``plot_training_curves`` reads: with a journal, a run's metric history
comes from the journal when the journal created that run (it then holds all of it), so the curves
need no server.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from binaryduo.trainer.tracking.journal import Journal, JournalBusy

DEFAULT_DB = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
LOCAL_ID_TAG = "binaryduo.local_run_id"
LOCAL_PREFIX = "local-"
HTTP_TIMEOUT_S = 10
PREFLIGHT_TIMEOUT_S = 5
RETRY_ENV = "BINARYDUO_TRACKING_RETRY_S"


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer (pre-flight, or replay)."""


class TrackingError(RuntimeError):
    """The tracking store rejected a record (not a reachability problem)."""


def resolve_tracking_uri(cli_uri: str | None, recipe_uri: str | None) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the recipe, then ./mlflow.db (sqlite)."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe_uri
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "s": [{"n": 2}]}`` -> ``{"a.b": "1", "s.0.n": "2"}`` (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{index}."))
        else:
            flat[name] = str(value)
    return flat


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def bound_http_requests() -> None:
    """One HTTP attempt with a 10 s time-out per MLflow request in this process, unless the user
    set MLflow's variables (its defaults retry with back-off for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))


def unreachable(error: BaseException) -> bool:
    """True when ``error`` says the server could not be reached or could not answer now (the
    record may succeed later); False for a rejection of the record itself."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in (401, 403, 408, 429)
    return False


def short_reason(error: BaseException) -> str:
    """A few words for a one-line message: ``connection refused``, ``timed out``, ``HTTP 503``."""
    text = str(error)
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "timed out" in lowered or "timeout" in lowered:
        return "timed out"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    for code in ("500", "502", "503", "504", "429", "401", "403"):
        if f"{code} error" in lowered or f"error code {code}" in lowered or \
                f"too many {code}" in lowered:
            return f"HTTP {code}"
    line = " ".join(text.split())
    return line[:160] + ("..." if len(line) > 160 else "")


TRAIN_HINT = ("start it, or train with --offline (records stay in the run directory; deliver them "
              "later with `binaryduo tracking replay RUN_DIR`)")


def check_tracking_server(uri: str, hint: str = TRAIN_HINT) -> None:
    """Pre-flight, before any compute: an http(s) tracking server must answer one API request
    within a few seconds, else :class:`TrackingUnavailable` (a one-line message). Only the rank
    that logs (global rank 0, read from RANK / SLURM_PROCID) asks. Other stores are local."""
    if not is_remote(uri):
        return
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    bound_http_requests()
    from mlflow.tracking import MlflowClient

    names = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PREFLIGHT_TIMEOUT_S)  # one quick question
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - every failure here means "not usable"
        raise TrackingUnavailable(
            f"tracking server {uri}: not reachable ({short_reason(error)}); {hint}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Metric:
    __slots__ = ("key", "value", "timestamp", "step")

    def __init__(self, key, value, timestamp, step):
        self.key, self.value, self.timestamp, self.step = key, value, timestamp, step


class JournalClient:
    """``get_metric_history`` from the journal for runs it created (all of their history is in
    it); everything else goes to the ``MlflowClient``."""

    def __init__(self, tracker: "Tracker"):
        self._tracker = tracker

    def get_metric_history(self, run_id: str, key: str):
        tracker = self._tracker
        canonical = tracker._canonical(run_id)
        created = {tracker._canonical(r["local_id"]) for r in tracker.journal.records.values()
                   if r["op"] == "create_run"}
        if canonical not in created:
            return tracker.mlflow.get_metric_history(tracker._real_id(run_id), key)
        return [_Metric(key, r["metrics"][key], r["timestamp"], r["step"])
                for r in (tracker.journal.records[s] for s in sorted(tracker.journal.records))
                if r["op"] == "log_metrics" and key in r["metrics"]
                and tracker._canonical(r["run_id"]) == canonical]

    def __getattr__(self, name):
        return getattr(self._tracker.mlflow, name)


class Tracker:
    """Thin wrapper over ``MlflowClient``; every method is a no-op when ``enabled`` is False.

    With ``journal_dir`` (the run directory) every record is journaled first and an unreachable
    server does not stop the caller (see the module docstring); ``offline`` journals without
    sending. Without it, records are sent directly and every error raises, as before."""

    def __init__(self, uri: str, experiment: str, *, enabled: bool,
                 journal_dir: Path | None = None, offline: bool = False):
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self.offline = offline
        self.experiment_id = None
        self.journal: Journal | None = None
        self._mlflow = None
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = 0.0
        self._delivered_while_down = 0
        self._direct_run_id = None
        if not enabled:
            return
        if journal_dir is not None:
            bound_http_requests()
            self.journal = Journal(Path(journal_dir))
            try:
                self.journal.open({"uri": uri, "experiment": experiment, "offline": offline})
            except JournalBusy as error:
                raise TrackingError(f"{error} (a `binaryduo tracking replay`, or another "
                                    f"training in the same run directory)") from None
        elif offline:
            raise ValueError("offline tracking needs a journal directory")

    # ------------------------------------------------------------------ clients
    @property
    def mlflow(self):
        if self._mlflow is None:
            from mlflow.tracking import MlflowClient

            self._mlflow = MlflowClient(tracking_uri=self.uri)
        return self._mlflow

    @property
    def client(self):
        """What readers use (``plot_training_curves``): the MlflowClient, or with a journal a
        :class:`JournalClient` over it; None when disabled."""
        if not self.enabled:
            return None
        return JournalClient(self) if self.journal is not None else self.mlflow

    # ------------------------------------------------------------------ the API (stages.py)
    def start_run(self, name: str, *, tags: Mapping[str, str] | None = None,
                  parent: str | None = None, run_id: str | None = None) -> str | None:
        """Creates a run (nested under ``parent``), or reopens ``run_id`` after a resume. Returns
        the MLflow run id, or a ``local-...`` placeholder while the server is unreachable."""
        if not self.enabled:
            return None
        if run_id is not None:
            self._submit("reopen_run", run_id=run_id)
            return run_id
        local_id = f"{LOCAL_PREFIX}{uuid.uuid4().hex}"
        self._submit("create_run", local_id=local_id, name=name,
                     tags={k: str(v) for k, v in (tags or {}).items()}, parent=parent,
                     start_time=int(time.time() * 1000))
        if self.journal is None:
            return self._direct_run_id
        return self.journal.run_ids.get(local_id, local_id)

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if self.enabled:
            self._submit("log_params", run_id=run_id,
                         params={k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            self._submit("log_metrics", run_id=run_id,
                         metrics={k: float(v) for k, v in metrics.items()}, step=int(step),
                         timestamp=int(time.time() * 1000))

    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        if self.enabled:
            self._submit("set_tags", run_id=run_id, tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._submit("log_artifact", run_id=run_id, path=str(Path(path).resolve()),
                         artifact_path=artifact_path)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self._submit("set_terminated", run_id=run_id, status=status,
                         end_time=int(time.time() * 1000))

    # ------------------------------------------------------------------ end of a run, replay
    def pending_count(self) -> int:
        return len(self.journal.pending()) if self.journal is not None else 0

    def close(self) -> int:
        """Tries the backlog once more, says what is still pending and how to deliver it, and
        releases the journal. Never raises (the training's result stands); returns the number of
        records still pending."""
        if not self.enabled or self.journal is None:
            return 0
        run_dir = self.journal.run_dir
        problem = None
        if not self.offline:
            try:
                self._drain(force=True)
            except TrackingError as error:
                problem = str(error)
        pending = self.pending_count()
        self.journal.close()
        replay = f"binaryduo tracking replay {run_dir}"
        if pending and self.offline:
            print(f"binaryduo: offline: {pending} tracking records kept in {self.journal.path}; "
                  f"deliver them to {self.uri} with: {replay} (or add --tracking-uri URI)",
                  file=sys.stderr, flush=True)
        elif pending:
            why = problem or f"tracking server {self.uri} not reachable"
            print(f"binaryduo: warning: {pending} tracking records not delivered ({why}); they "
                  f"are kept in {self.journal.path}; deliver them with: {replay}",
                  file=sys.stderr, flush=True)
        return pending

    def replay(self) -> dict[str, int]:
        """Sends every pending record now (no back-off); returns counts per operation. Raises
        :class:`TrackingUnavailable` when the server stops answering (what was sent stays sent)
        and :class:`TrackingError` on a rejection."""
        counts: dict[str, int] = {}
        for record in self.journal.pending():
            try:
                result = self._deliver(record)
            except Exception as error:  # noqa: BLE001 - classified below
                if unreachable(error):
                    raise TrackingUnavailable(
                        f"tracking server {self.uri}: not reachable ({short_reason(error)})"
                    ) from None
                raise self._rejected(record, error) from None
            self.journal.mark_done(record, result)
            counts[record["op"]] = counts.get(record["op"], 0) + 1
        return counts

    # ------------------------------------------------------------------ delivery
    def _submit(self, op: str, **fields: Any) -> None:
        if self.journal is None:  # direct: as before the journal existed, errors raise
            result = self._deliver({"op": op, **fields, "local_id": None})
            if op == "create_run":
                self._direct_run_id = result
            return
        record = self.journal.add(op, **fields)
        if not self.offline:
            self._drain()
        if op == "log_artifact" and self.journal.is_pending(record):
            self.journal.spool(record)

    def _retry_cap(self) -> float:
        raw = os.environ.get(RETRY_ENV)
        return float(raw) if raw else 120.0

    def _drain(self, force: bool = False) -> None:
        """Sends pending records in order until one fails for lack of a server."""
        pending = self.journal.pending()
        if not pending or (not force and time.monotonic() < self._next_try):
            return
        for record in pending:
            try:
                result = self._deliver(record)
            except Exception as error:  # noqa: BLE001 - classified below
                if not unreachable(error):
                    raise self._rejected(record, error) from None
                self._server_down(error)
                return
            self.journal.mark_done(record, result)
            if self._down_since is not None:
                self._delivered_while_down += 1
        if self._down_since is not None:
            print(f"binaryduo: tracking server {self.uri} is back; delivered "
                  f"{self._delivered_while_down} pending records", file=sys.stderr, flush=True)
            self._down_since = None
            self._delivered_while_down = 0
        self._delay = 0.0

    def _server_down(self, error: BaseException) -> None:
        cap = self._retry_cap()
        self._delay = min(cap, max(self._delay * 2, min(5.0, cap)))
        self._next_try = time.monotonic() + self._delay
        if self._down_since is None:
            self._down_since = time.monotonic()
            print(f"binaryduo: warning: tracking server {self.uri} not reachable "
                  f"({short_reason(error)}); training goes on, records are kept in "
                  f"{self.journal.path} and sent when it is back", file=sys.stderr, flush=True)

    def _rejected(self, record: dict[str, Any], error: BaseException) -> TrackingError:
        where = (f" (journal record {record['seq']}, still pending; give up on it with: "
                 f"binaryduo tracking replay RUN_DIR --discard {record['seq']})"
                 if "seq" in record else "")
        from mlflow.exceptions import MlflowException

        kind = "" if isinstance(error, MlflowException) else f"{type(error).__name__}: "
        return TrackingError(f"tracking store {self.uri} rejected {record['op']} for run "
                             f"{record.get('run_id') or record.get('name')}{where}: "
                             f"{kind}{' '.join(str(error).split())[:300]}")

    def _experiment_id(self) -> str:
        if self.experiment_id is None:
            found = self.mlflow.get_experiment_by_name(self.experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
            else:
                location = None
                if self.uri.startswith("sqlite:///"):
                    # keep artifacts beside the database, not wherever the process happens to run
                    db = Path(self.uri.removeprefix("sqlite:///"))
                    location = (db.parent / "mlartifacts" / self.experiment).resolve().as_uri()
                self.experiment_id = self.mlflow.create_experiment(
                    self.experiment, artifact_location=location)
        return self.experiment_id

    def _canonical(self, run_id: str | None) -> str | None:
        if self.journal is None or run_id is None:
            return run_id
        return self.journal.run_ids.get(run_id, run_id)

    def _real_id(self, run_id: str | None) -> str | None:
        """The MLflow id of ``run_id`` (a placeholder is looked up in the journal, then by its
        tag on the server: the journal may have lost the acknowledgement)."""
        if run_id is None or not run_id.startswith(LOCAL_PREFIX):
            return run_id
        if self.journal is not None and run_id in self.journal.run_ids:
            return self.journal.run_ids[run_id]
        found = self._find_by_local_id(run_id)
        if found is None:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

            raise MlflowException(f"run {run_id} was never delivered to {self.uri} and the "
                                  f"journal does not create it", error_code=RESOURCE_DOES_NOT_EXIST)
        return found

    def _find_by_local_id(self, local_id: str) -> str | None:
        runs = self.mlflow.search_runs([self._experiment_id()],
                                       filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local_id}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def _deliver(self, record: dict[str, Any]) -> str | None:
        """Sends one record; returns the MLflow run id for a create. Safe to repeat."""
        from mlflow.entities import Metric, Param, RunTag

        op, client = record["op"], self.mlflow
        if op == "create_run":
            local_id = record["local_id"]
            if local_id is not None:  # journaled: this create may have reached the server before
                existing = self._find_by_local_id(local_id)
                if existing is not None:
                    return existing
            tags = dict(record["tags"])
            if record["parent"] is not None:
                tags[PARENT_TAG] = self._real_id(record["parent"])
            if local_id is not None:
                tags[LOCAL_ID_TAG] = local_id
            return client.create_run(self._experiment_id(), start_time=record["start_time"],
                                     tags=tags, run_name=record["name"]).info.run_id
        run_id = self._real_id(record["run_id"])
        if op == "reopen_run":
            client.update_run(run_id, status="RUNNING")
        elif op == "log_params":
            existing = client.get_run(run_id).data.params
            fresh = [Param(k, v) for k, v in record["params"].items() if k not in existing]
            for start in range(0, len(fresh), 100):
                client.log_batch(run_id, params=fresh[start:start + 100])
        elif op == "log_metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, record["timestamp"], record["step"])
                                              for k, v in record["metrics"].items()])
        elif op == "set_tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif op == "log_artifact":
            path = record["path"]
            if self.journal is not None:
                path = self.journal.artifact_source(record)
            if not Path(path).is_file():
                from mlflow.exceptions import MlflowException
                from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

                raise MlflowException(f"artifact file {path} no longer exists",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            client.log_artifact(run_id, path, record["artifact_path"])
        elif op == "set_terminated":
            client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")
        return None
