"""The MLflow ``pyfunc`` model of an exported binary network (MLflow's "models from code").

MLflow copies this file into the saved model and runs it at load time, so it imports nothing of
binaryduo: a model logged by ``binaryduo export`` loads with ``mlflow.pyfunc.load_model`` (or
``mlflow models serve``) wherever ``mlflow``, ``numpy`` and ``openvino`` are installed. It is
passed to MLflow by path (``trainer/export/serving.py``), never imported by binaryduo.

Input: a float32 batch N x C x H x W, normalized as the training pipeline feeds the network (its
data preset's mean and std).
Output: the logits, N x classes (float32).
"""
import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class BinaryNetworkModel(PythonModel):
    """Compiles the IR once per batch size it is asked for: OpenVINO's CPU BinaryConvolution
    runs static shapes only, so the IR is reshaped to each request's batch (and cached)."""

    def load_context(self, context):
        import openvino

        self._core = openvino.Core()
        self._model = self._core.read_model(context.artifacts["model_xml"])
        self._compiled = {}

    def _for_batch(self, batch: int):
        if batch not in self._compiled:
            model = self._model.clone()
            model.reshape([batch, *list(model.input(0).get_shape())[1:]])
            # f32 inference: on CPUs with bf16 support OpenVINO would otherwise run the float
            # layers in bf16 and the logits would differ from the verified ones
            self._compiled[batch] = self._core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return self._compiled[batch]

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a named tensor, e.g. from a JSON request
            (model_input,) = model_input.values()
        images = np.ascontiguousarray(np.asarray(model_input, dtype=np.float32))
        compiled = self._for_batch(len(images))
        return np.array(compiled(images)[compiled.output(0)])


set_model(BinaryNetworkModel())
