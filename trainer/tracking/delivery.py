"""Sending one tracking record to MLflow, safe to repeat.

A record is a plain dict (``{"op": "log_metrics", "run_id": ..., ...}``, see :mod:`.journal`):
the :class:`~.tracker.Tracker` builds it, journals it, and hands it here to be sent now or
later. A create looks for its placeholder tag first (a create that reached the server without
its acknowledgement is not sent twice); a run created while the server was away has the
placeholder id ``local-<hex>``, resolved here to its MLflow id.
"""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from binaryduo.trainer.tracking.journal import Journal

PARENT_TAG = "mlflow.parentRunId"
#: MLflow 3's experiment kind: its UI opens a "custom_model_development" experiment on the
#: training runs (without it, on the GenAI overview of traces and token usage)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
LOCAL_ID_TAG = "binaryduo.local_run_id"
LOCAL_PREFIX = "local-"


def open_client(uri: str):
    """An ``MlflowClient`` on ``uri`` whose store is open. A sqlite store is opened under an
    exclusive lock on ``<database>.lock`` beside it: opening a new database creates its tables by
    Alembic migrations, and two processes doing that at once make one fail ("Online migration
    expected to match one row ... in 'alembic_version'"; seen with two sweeps started together on
    one new database). Later opens skip the migrations; the lock only orders the first access."""
    from mlflow.tracking import MlflowClient

    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if database is None or not database.parent.is_dir():  # mlflow's own error names the folder
        return MlflowClient(tracking_uri=uri)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)  # opens the store: creates the tables if new


class TrackingError(RuntimeError):
    """The tracking store rejected a record (not a reachability problem)."""


class RecordSender:
    """The MlflowClient calls of each record, for one tracking URI and experiment; with a
    ``journal``, placeholder run ids and spooled artifacts are looked up in it."""

    def __init__(self, uri: str, experiment: str, journal: Journal | None):
        self.uri = uri
        self.experiment = experiment
        self.journal = journal
        self.experiment_id = None
        self._mlflow = None

    @property
    def mlflow(self):
        if self._mlflow is None:
            self._mlflow = open_client(self.uri)
        return self._mlflow

    def rejected(self, record: dict[str, Any], error: BaseException) -> TrackingError:
        """The one-line error for a record the store refused (says how to give up on it)."""
        where = (f" (journal record {record['seq']}, still pending; give up on it with: "
                 f"binaryduo tracking replay RUN_DIR --discard {record['seq']})"
                 if "seq" in record else "")
        from mlflow.exceptions import MlflowException

        kind = "" if isinstance(error, MlflowException) else f"{type(error).__name__}: "
        return TrackingError(f"tracking store {self.uri} rejected {record['op']} for run "
                             f"{record.get('run_id') or record.get('name')}{where}: "
                             f"{kind}{' '.join(str(error).split())[:300]}")

    def ensure_experiment(self) -> str:
        """The experiment's id, created (artifacts beside a sqlite store) if it does not exist.
        Another process may create it between the look-up and the create (the tasks of a Slurm
        array start together): then the create fails and the look-up is repeated."""
        from mlflow.exceptions import MlflowException

        if self.experiment_id is None:
            found = self.mlflow.get_experiment_by_name(self.experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:  # made before binaryduo set the kind
                    self.mlflow.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG,
                                                   EXPERIMENT_KIND)
            else:
                location = None
                if self.uri.startswith("sqlite:///"):
                    # keep artifacts beside the database, not wherever the process happens to run
                    db = Path(self.uri.removeprefix("sqlite:///"))
                    location = (db.parent / "mlartifacts" / self.experiment).resolve().as_uri()
                try:
                    self.experiment_id = self.mlflow.create_experiment(
                        self.experiment, artifact_location=location,
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except MlflowException:
                    found = self.mlflow.get_experiment_by_name(self.experiment)
                    if found is None:  # not the race: a real refusal
                        raise
                    self.experiment_id = found.experiment_id
        return self.experiment_id

    def canonical(self, run_id: str | None) -> str | None:
        """One name per run: the MLflow id once the journal knows it, else the id as given."""
        if self.journal is None or run_id is None:
            return run_id
        return self.journal.run_ids.get(run_id, run_id)

    def real_id(self, run_id: str | None) -> str | None:
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
        runs = self.mlflow.search_runs([self.ensure_experiment()],
                                       filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local_id}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def deliver(self, record: dict[str, Any]) -> str | None:
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
                tags[PARENT_TAG] = self.real_id(record["parent"])
            if local_id is not None:
                tags[LOCAL_ID_TAG] = local_id
            return client.create_run(self.ensure_experiment(), start_time=record["start_time"],
                                     tags=tags, run_name=record["name"]).info.run_id
        run_id = self.real_id(record["run_id"])
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
        elif op == "log_inputs":  # the store keeps one input per run, dataset name and digest
            from binaryduo.trainer.tracking.datasets import dataset_input

            client.log_inputs(run_id, datasets=[dataset_input(d) for d in record["datasets"]])
        elif op == "log_model":
            from binaryduo.trainer.tracking.models import deliver_model

            directory = (self.journal.model_source(record) if self.journal is not None
                         else Path(record["path"]))
            if not (directory / "MLmodel").is_file():
                from mlflow.exceptions import MlflowException
                from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

                raise MlflowException(f"model directory {directory} no longer exists",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            deliver_model(client, self.ensure_experiment(), run_id, record, directory)
        elif op == "register_model":
            from binaryduo.trainer.tracking.models import deliver_registration

            deliver_registration(client, self.ensure_experiment(), run_id, record)
        elif op == "set_terminated":
            client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")
        return None
