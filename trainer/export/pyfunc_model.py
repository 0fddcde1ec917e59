"""The MLflow ``pyfunc`` model of an exported binary network (MLflow's "models from code").

MLflow copies this file into the saved model and runs it at load time, so it imports nothing of
binaryduo: a model logged by ``binaryduo export`` loads with ``mlflow.pyfunc.load_model`` (or
``mlflow models serve``) wherever ``mlflow``, ``numpy`` and ``openvino`` are installed. It is
passed to MLflow by path (``trainer/export/serving.py``), never imported by binaryduo.

Input: a float32 batch N x C x H x W, normalized as the training pipeline feeds the network (the
mean/std are in the model's metadata); a single image C x H x W is taken as a batch of one.
Output: the logits, N x classes (float32).
"""
import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class BinaryNetworkModel(PythonModel):
    def load_context(self, context):
        import openvino

        # f32 inference: on CPUs with bf16 support OpenVINO would otherwise run the float
        # layers in bf16 and the logits would differ from the verified ones
        self._compiled = openvino.Core().compile_model(
            context.artifacts["model_xml"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a named tensor, e.g. from a JSON request
            (model_input,) = model_input.values()
        images = np.ascontiguousarray(np.asarray(model_input, dtype=np.float32))
        if images.ndim == 3:
            images = images[None]
        return self._compiled(images)[self._compiled.output(0)]


set_model(BinaryNetworkModel())
