"""A stage's final network as an MLflow Model (MLflow 3 logged model), and its registration.

Two steps, so that a tracking server that is away loses nothing and a replay duplicates nothing:

1. :func:`save_stage_model` (rank 0, at the end of a stage) writes the model with the pytorch
   flavour's own ``mlflow.pytorch.save_model`` into ``RUN_DIR/mlflow-models/<stage>/``: the pickled
   module (``serialization_format="pickle"``: its classes import as ``binaryduo.models.*``; see
   the comment there for why not MLflow's "pt2" default), an ``MLmodel`` with a signature (float32
   images ``(-1, C, H, W)`` -> logits ``(-1, classes)``), an input example, fixed pip requirements
   (no inference: that costs seconds) and ``metadata`` (stage, variant, recipe, the decoupling
   check of a decoupled stage). No server is involved; the tracker journals a ``log_model`` record.
2. :func:`deliver_model` sends that record as ``mlflow.pytorch.log_model`` would (``Model.log``):
   a logged model in the run's experiment with the run as its source and the run's params, linked
   to the run as an output at the stage's last step, the run's metrics of that step linked to it
   (``model_id``), the artifacts uploaded, the model finalised READY. The logged model carries the
   tag ``binaryduo.model_key`` (``<run id>/<name>``): a delivery that is repeated finds it (READY:
   nothing to do; PENDING, an upload cut short: the rest is done) instead of making a second one.
   :func:`deliver_registration` (``register_model`` records, ``binaryduo train --register NAME``)
   creates the registered model if needed and one version from ``models:/<model id>``, unless a
   version of that model id exists already.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODELS_DIR = "mlflow-models"
MODEL_KEY_TAG = "binaryduo.model_key"
#: The model's pip requirements, pinned to the installed versions
PINNED = ("torch", "mlflow", "binaryduo")


def registered_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a registered model (MLflow's rules), or None."""
    if not name or not name.strip():
        return "--register: the registered model name is empty"
    if any(c in name for c in "/:") or name != name.strip() or len(name) > 256 \
            or any(ord(c) < 32 for c in name):
        return (f"--register {name!r}: not a registered model name (no '/' or ':', no leading "
                f"or trailing spaces, at most 256 characters)")
    return None


def save_stage_model(model, directory: Path, *, input_shape: tuple[int, ...],
                     metadata: dict[str, Any]) -> Path:
    """Writes ``model`` (on CPU, in eval mode) as an MLflow pytorch model into ``directory``
    (replaced when it exists); returns it."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = model.to("cpu").eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((1, *input_shape), generator=generator)
    with torch.no_grad():
        classes = model(example).shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "logits")]))
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _quick_requirement_check(), _quiet("mlflow.pytorch"):
        mlflow.pytorch.save_model(
            model, str(directory), signature=signature, input_example=example.numpy(),
            metadata=metadata, pip_requirements=_requirements(),
            # MLflow 3.17's default, "pt2" (torch.export), fixes the batch size to the example's
            # (1) and loads a traced graph; the pickled module loads as the binaryduo.models
            # class itself, any batch size, decouple-able and inspectable (MLflow warns that a
            # pickle runs code when loaded: load models from stores you trust)
            serialization_format="pickle")
    return directory


def _tracking_uri(client):
    """MLflow's own context for "the tracking URI is this client's" (a sqlite registry looks the
    logged model of a ``models:/`` source up with a default ``MlflowClient()``)."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        return _use_tracking_uri(client.tracking_uri)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _quick_requirement_check():
    """MLflow checks the pinned requirements against the installed packages by first mapping
    every installed distribution's files to modules (``packages_distributions``: 3.5 s here, on
    every training process). The three pins need no such map (their module is their name): it is
    given for the time of the save, then reset, so MLflow builds its full one if it needs it. On
    an MLflow without that private map this does nothing (the check is only slower)."""
    try:
        from mlflow.utils import requirements_utils as utils
    except ImportError:
        utils = None
    if utils is None or getattr(utils, "_MODULES_TO_PACKAGES", "absent") is not None:
        yield
        return
    utils._MODULES_TO_PACKAGES = {name: [name] for name in PINNED}
    try:
        yield
    finally:
        utils._MODULES_TO_PACKAGES = None
        if hasattr(utils, "_PACKAGES_TO_MODULES"):
            utils._PACKAGES_TO_MODULES = None


def _requirements() -> list[str]:
    from importlib import metadata

    pins = []
    for package in PINNED:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


# ------------------------------------------------------------------------------------ delivery


def _find_model(client, experiment_id: str, key: str):
    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{MODEL_KEY_TAG}` = '{key}'",
        max_results=10)
    from mlflow.entities import LoggedModelStatus

    found = sorted(found, key=lambda m: m.creation_timestamp)
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return (ready or found or [None])[0]


def deliver_model(client, experiment_id: str, run_id: str, record: dict[str, Any],
                  directory: Path) -> str:
    """Sends a ``log_model`` record (see the module docstring); returns the model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    key = f"{run_id}/{record['name']}"
    model = _find_model(client, experiment_id, key)
    if model is not None and model.status == LoggedModelStatus.READY:
        return model.model_id
    run = client.get_run(run_id)
    if model is None:
        model = client.create_logged_model(
            experiment_id=experiment_id, name=record["name"], source_run_id=run_id,
            tags={MODEL_KEY_TAG: key, **record.get("tags", {})},
            params={k: str(v) for k, v in run.data.params.items()}, model_type=None)
    step = int(record["step"])
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    if not any(o.model_id == model.model_id for o in outputs):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    # the run's metrics of the model's step, linked to it (what Model.log does)
    linked = []
    for name in run.data.metrics:
        linked += [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id,
                          run_id=run_id)
                   for m in client.get_metric_history(run_id, name)
                   if m.step == step and m.model_id is None]
    if linked:
        client.log_batch(run_id, metrics=linked)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "model"
        shutil.copytree(directory, local)
        mlmodel = Model.load(str(local / "MLmodel"))  # the ids it is known by in the store
        mlmodel.model_id = mlmodel.model_uuid = model.model_id
        mlmodel.run_id = run_id
        mlmodel.artifact_path = model.artifact_location
        mlmodel.save(str(local / "MLmodel"))
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def deliver_registration(client, experiment_id: str, run_id: str,
                         record: dict[str, Any]) -> None:
    """Sends a ``register_model`` record: one version of ``record['registered_name']`` from the
    run's logged model ``record['name']`` (none when that model id has a version already)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST,
                                              ErrorCode)

    name = record["registered_name"]
    model = _find_model(client, experiment_id, f"{run_id}/{record['name']}")
    if model is None:
        raise MlflowException(f"run {run_id} has no logged model {record['name']!r} to "
                              f"register", error_code=RESOURCE_DOES_NOT_EXIST)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    versions = client.search_model_versions(f"name = '{name}'")
    source = f"models:/{model.model_id}"
    if any(v.source == source or getattr(v, "model_id", None) == model.model_id
           for v in versions):
        return
    with _tracking_uri(client):  # a local registry resolves models:/ through the default URI
        version = client.create_model_version(name, source, run_id=run_id,
                                              model_id=model.model_id, await_creation_for=0)
    links = json.loads(client.get_logged_model(model.model_id).tags.get(
        "mlflow.modelVersions", "[]"))
    links.append({"name": version.name, "version": version.version})
    client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps(links)})
