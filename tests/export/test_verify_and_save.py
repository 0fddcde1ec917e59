"""verify's verdicts (a float fallback and a foreign model fail) and the saved IR."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import openvino.opset16 as ops

from binaryduo.trainer.export import (compile_for_verification, ir_graph, save_ir, to_openvino,
                                      verify)
from binaryduo.trainer.export.ir_graph import Affine, Bits

DLOGIT_BOUND = 1e-4  # as in test_openvino_export.py


def test_saved_ir_round_trips_with_packed_weights_and_float32_layers(make_model, tmp_path):
    model, images = make_model("resnet18", "decoupled")
    ir, summary = to_openvino(model, images.shape)
    xml = save_ir(ir, tmp_path / "export")
    assert xml == tmp_path / "export" / "model.xml"
    assert (tmp_path / "export" / "model.bin").is_file()

    layers = ET.parse(xml).getroot().find("layers")
    types = [layer.get("type") for layer in layers]
    assert types.count("BinaryConvolution") == summary.binary_convolutions == 16
    precisions = {layer.find("data").get("element_type") for layer in layers
                  if layer.get("type") == "Const"}
    assert "u1" in precisions and "f16" not in precisions  # compress_to_fp16=False

    report = verify(xml, model, images, max_abs_dlogit=DLOGIT_BOUND)  # read back from disk
    assert report.passed, report.reason
    json.dumps(report.to_dict())
    json.dumps(summary.to_dict())


def test_a_compiled_model_is_run_in_chunks_of_its_batch(make_model):
    model, images = make_model("vgg7", "bnn")  # 8 images through a batch-3 model: 3 + 3 + 2
    ir, _ = to_openvino(model, (1, *images.shape[1:]))
    report = verify(compile_for_verification(ir, batch=3), model, images)
    assert report.passed, report.reason
    assert report.samples == len(images)


def _float_binarize(tensor, name):
    """{0, 1} by Greater/Select in float32 (a FakeQuantize(levels=2) output is bit-packed on the
    CPU plugin and only a BinaryConvolution can read it)."""
    threshold, low, high = ir_graph.binarization_thresholds(tensor.scale, tensor.shift,
                                                            tensor.integer_valued)
    per_channel = [ops.constant(v.reshape(1, -1, 1, 1)) for v in (threshold, high, low)]
    fires = ops.greater(tensor.value, per_channel[0])
    bits = ops.select(fires, per_channel[1], per_channel[2], name=name)
    return Bits(bits.output(0), tensor.channels, tensor.channels)


def _float_convolution(bits, weight, alpha, geometry, name):
    """The same z = conv(a, alpha * s(W)) by a float Convolution: numerically what a model whose
    binary layers fell back to float would compute."""
    binary = np.where(weight >= 0, 1.0, -1.0) * alpha.reshape(-1, 1, 1, 1)
    z = ops.convolution(bits.value, ops.constant(binary.astype(np.float32)), list(geometry.stride),
                        list(geometry.padding), list(geometry.padding), list(geometry.dilation),
                        name=name)
    return Affine.identity(z.output(0))


def test_a_binary_layer_that_runs_as_a_float_convolution_fails(make_model, monkeypatch):
    model, images = make_model("vgg7", "bnn")
    monkeypatch.setattr(ir_graph, "binarize", _float_binarize)
    monkeypatch.setattr(ir_graph, "binary_conv", _float_convolution)
    ir, _ = to_openvino(model, images.shape)
    report = verify(ir, model, images)
    assert report.identical_predictions == len(images)  # right numbers, wrong kernel
    assert not report.passed
    assert "do not run as BinaryConvolution" in report.reason
    assert report.binary_kernels == 0 and len(report.missing_binary_layers) == 5


def test_a_different_model_fails_with_a_one_line_reason(make_model):
    model, images = make_model("vgg7", "bnn", count=16)
    other, _ = make_model("vgg7", "bnn", seed=5)
    ir, _ = to_openvino(model, images.shape)
    report = verify(ir, other, images, max_abs_dlogit=DLOGIT_BOUND)
    assert not report.passed and report.reason and "\n" not in report.reason
