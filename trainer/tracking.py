"""MLflow records: one parent run per recipe run, one nested run per stage; rank 0 only.

The embedded default is a sqlite store ``./mlflow.db`` (artifacts beside it in ``./mlartifacts``),
shared by successive runs so they can be compared; ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``
point at a server instead. Run ids are kept in the run directory so a resumed run logs into the
same runs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"


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


class Tracker:
    """Thin wrapper over ``MlflowClient``; every method is a no-op when ``enabled`` is False."""

    def __init__(self, uri: str, experiment: str, *, enabled: bool):
        self.uri = uri
        self.enabled = enabled
        self.client = None
        self.experiment_id = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:///"):
                # keep artifacts beside the database, not wherever the process happens to run
                db = Path(uri.removeprefix("sqlite:///"))
                location = (db.parent / "mlartifacts" / experiment).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=location)

    def start_run(self, name: str, *, tags: Mapping[str, str] | None = None,
                  parent: str | None = None, run_id: str | None = None) -> str | None:
        """Creates a run (nested under ``parent``), or reopens ``run_id`` after a resume."""
        if not self.enabled:
            return None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start:start + 100])

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                               for k, v in metrics.items()])

    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_artifact(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self.client.set_terminated(run_id, status=status)
