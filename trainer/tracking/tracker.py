"""MLflow records: one parent run per recipe run, one nested run per stage; rank 0 only.

Where the records go (the sqlite store ``./mlflow.db`` by default, or a server) and whether that
server answers is :mod:`.server`; sending one record is :mod:`.delivery`. Run ids are kept in the
run directory so a resumed run logs into the same runs.

When the tracking server goes away (``binaryduo train`` gives the Tracker a run directory):

- at start, ``check_tracking_server`` asks an http(s) server one quick question before anything
  runs; no answer is a one-line error (or train with ``--offline``);
- every record is first appended to the run's journal (:mod:`.journal`), then sent. A
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

Records may come from two threads (the training and the system-metrics sampler,
:mod:`.system_metrics`): journaling and sending are serialised by one lock, so a record is never
half written and the backlog keeps its order (a send the sampler makes can delay the training's
next record by as long as that send takes: with the server away, once per back-off interval, as
the training's own send would).

``Tracker.client`` is what ``plot_training_curves`` reads: with a journal, a run's metric history
comes from the journal when the journal created that run (it then holds all of it), so the curves
need no server (the runner stops the sampler before it reads them).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from binaryduo.trainer.tracking.delivery import LOCAL_PREFIX, RecordSender, TrackingError
from binaryduo.trainer.tracking.journal import Journal, JournalBusy
from binaryduo.trainer.tracking.server import (TrackingUnavailable, bound_http_requests,
                                               check_tracking_server, resolve_tracking_uri,
                                               short_reason, unreachable)

#: What callers import from here: the Tracker and its errors, and the server checks it runs with.
__all__ = ["JournalClient", "Tracker", "TrackingError", "TrackingUnavailable",
           "check_tracking_server", "flatten", "resolve_tracking_uri"]

RETRY_ENV = "BINARYDUO_TRACKING_RETRY_S"


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


class _Metric:
    __slots__ = ("key", "value", "timestamp", "step")

    def __init__(self, key, value, timestamp, step):
        self.key, self.value, self.timestamp, self.step = key, value, timestamp, step


class JournalClient:
    """``get_metric_history`` from the journal for runs it created (all of their history is in
    it); everything else goes to the ``MlflowClient``."""

    def __init__(self, journal: Journal, sender: RecordSender):
        self._journal, self._sender = journal, sender

    def get_metric_history(self, run_id: str, key: str):
        journal, sender = self._journal, self._sender
        canonical = sender.canonical(run_id)
        created = {sender.canonical(r["local_id"]) for r in journal.records.values()
                   if r["op"] == "create_run"}
        if canonical not in created:
            return sender.mlflow.get_metric_history(sender.real_id(run_id), key)
        return [_Metric(key, r["metrics"][key], r["timestamp"], r["step"])
                for r in (journal.records[s] for s in sorted(journal.records))
                if r["op"] == "log_metrics" and key in r["metrics"]
                and sender.canonical(r["run_id"]) == canonical]

    def __getattr__(self, name):
        return getattr(self._sender.mlflow, name)


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
        self.journal: Journal | None = None
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = 0.0
        self._delivered_while_down = 0
        self._direct_run_id = None
        self._lock = threading.RLock()  # one record at a time (the sampler thread logs too)
        if enabled and journal_dir is not None:
            bound_http_requests()
            self.journal = Journal(Path(journal_dir))
            try:
                self.journal.open({"uri": uri, "experiment": experiment, "offline": offline})
            except JournalBusy as error:
                raise TrackingError(f"{error} (a `binaryduo tracking replay`, or another "
                                    f"training in the same run directory)") from None
        elif enabled and offline:
            raise ValueError("offline tracking needs a journal directory")
        self._sender = RecordSender(uri, experiment, self.journal)

    # ------------------------------------------------------------------ clients
    @property
    def mlflow(self):
        return self._sender.mlflow

    @property
    def client(self):
        """What readers use (``plot_training_curves``): the MlflowClient, or with a journal a
        :class:`JournalClient` over it; None when disabled."""
        if not self.enabled:
            return None
        return (JournalClient(self.journal, self._sender) if self.journal is not None
                else self.mlflow)

    # ------------------------------------------------------------------ the API (the runner)
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

    def log_inputs(self, run_id: str | None, datasets: list[dict[str, str]]) -> None:
        """Dataset inputs (:func:`.datasets.describe_datasets`' records) of ``run_id``."""
        if self.enabled and datasets:
            self._submit("log_inputs", run_id=run_id, datasets=list(datasets))

    def log_model(self, run_id: str | None, name: str, directory: Path, step: int,
                  tags: Mapping[str, str] | None = None) -> None:
        """The MLflow model saved in ``directory`` (:func:`.models.save_stage_model`, inside the
        run directory) as the logged model ``name`` of ``run_id``, linked at ``step``."""
        if self.enabled:
            self._submit("log_model", run_id=run_id, name=name,
                         path=str(Path(directory).resolve()), step=int(step),
                         tags={k: str(v) for k, v in (tags or {}).items()})

    def register_model(self, run_id: str | None, name: str, registered_name: str) -> None:
        """A Model Registry version of ``registered_name`` from the logged model ``name``."""
        if self.enabled:
            self._submit("register_model", run_id=run_id, name=name,
                         registered_name=registered_name)

    def last_step(self, run_id: str | None, prefix: str) -> int | None:
        """The largest step of the metrics named ``prefix...`` that the journal holds for
        ``run_id`` (a resumed run's system metrics continue after it); None without any."""
        if self.journal is None or run_id is None:
            return None
        with self._lock:
            canonical = self._sender.canonical(run_id)
            steps = [r["step"] for r in self.journal.records.values()
                     if r["op"] == "log_metrics" and any(k.startswith(prefix) for k in r["metrics"])
                     and self._sender.canonical(r["run_id"]) == canonical]
        return max(steps, default=None)

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
        with self._lock:
            return self._close_locked()

    def _close_locked(self) -> int:
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
                result = self._sender.deliver(record)
            except Exception as error:  # noqa: BLE001 - classified below
                if unreachable(error):
                    raise TrackingUnavailable(
                        f"tracking server {self.uri}: not reachable ({short_reason(error)})"
                    ) from None
                raise self._sender.rejected(record, error) from None
            self.journal.mark_done(record, result)
            counts[record["op"]] = counts.get(record["op"], 0) + 1
        return counts

    # ------------------------------------------------------------------ delivery
    def _submit(self, op: str, **fields: Any) -> None:
        with self._lock:
            self._submit_locked(op, **fields)

    def _submit_locked(self, op: str, **fields: Any) -> None:
        if self.journal is None:  # direct: as before the journal existed, errors raise
            result = self._sender.deliver({"op": op, **fields, "local_id": None})
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
                result = self._sender.deliver(record)
            except Exception as error:  # noqa: BLE001 - classified below
                if not unreachable(error):
                    raise self._sender.rejected(record, error) from None
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
