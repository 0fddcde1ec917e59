"""An exported IR as an MLflow ``pyfunc`` model: ``mlflow.pyfunc.load_model`` or
``mlflow models serve`` runs the binary network on CPU through OpenVINO.

The model is saved as a plain MLflow model directory (``save_pyfunc``) and logged into a run as
artifacts (``log_pyfunc``), so it can join an existing training run's record without MLflow's
fluent "active run"; ``runs:/<run id>/<name>`` then loads it.
"""
from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Mapping

#: The model's code, copied into the saved model by MLflow (it imports nothing of binaryduo).
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
#: The artifact folder of a logged model in its run.
ARTIFACT_NAME = "binary_model"


def save_pyfunc(ir_xml: Path, destination: Path, input_shape: tuple[int, int, int],
                num_classes: int, metadata: Mapping[str, Any] | None = None) -> Path:
    """Writes an MLflow model directory at ``destination`` (which must not exist) that serves
    the IR ``ir_xml`` (its ``.bin`` beside it): float32 N x C x H x W in, N x classes logits out."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    ir_xml = Path(ir_xml)
    # unnamed tensors: numpy in, numpy out (a named input would reach predict() as a dict)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
    mlflow.pyfunc.save_model(
        path=str(destination), python_model=str(MODEL_CODE),
        artifacts={"model_xml": str(ir_xml), "model_bin": str(ir_xml.with_suffix(".bin"))},
        signature=signature, metadata=dict(metadata or {}),
        # pinned as installed: the IR's opset and BinaryConvolution need this OpenVINO
        pip_requirements=[f"openvino=={version('openvino')}", f"numpy=={version('numpy')}",
                          f"mlflow=={version('mlflow')}"])
    return Path(destination)


def log_pyfunc(client, run_id: str, ir_xml: Path, input_shape: tuple[int, int, int],
               num_classes: int, metadata: Mapping[str, Any] | None = None,
               name: str = ARTIFACT_NAME) -> str:
    """Saves the pyfunc model and logs it into ``run_id`` under ``name``; returns the model URI
    (``runs:/<run_id>/<name>``)."""
    with tempfile.TemporaryDirectory(prefix="binaryduo-pyfunc-") as scratch:
        saved = save_pyfunc(ir_xml, Path(scratch) / name, input_shape, num_classes, metadata)
        client.log_artifacts(run_id, str(saved), artifact_path=name)
    return f"runs:/{run_id}/{name}"
