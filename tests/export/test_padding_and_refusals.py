"""The {0, 1} <-> +-1 mapping at the border (pad_value), the CPU plugin's filter bit order, and the
models export refuses."""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset16 as ops
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binaryduo import models
from binaryduo.trainer.export import ExportRefused, ir_graph, to_openvino, verify
from binaryduo.trainer.export.ir_graph import Affine, ConvGeometry

DLOGIT_BOUND = 1e-4  # as in test_openvino_export.py


def _single_binary_conv(activation: np.ndarray, weight: np.ndarray, padding: int) -> np.ndarray:
    """z = conv(a, alpha * s(W)) of a {0, 1} input through the exporter's pieces (binarize,
    binary_conv, materialize) on the CPU plugin."""
    image = ops.parameter(list(activation.shape), np.float32)
    bits = ir_graph.binarize(Affine.identity(image.output(0)), "act")
    alpha = np.full(weight.shape[0], np.abs(weight).mean())  # one per layer
    z = ir_graph.binary_conv(bits, weight, alpha, ConvGeometry((1, 1), (padding, padding), (1, 1)),
                             "conv")
    out = ir_graph.materialize(z)
    compiled = ov.Core().compile_model(ov.Model([ops.result(out)], [image]), "CPU")
    return compiled(activation.astype(np.float32))[0].astype(np.float64)


def test_zero_padding_of_a_binary_input_is_bit_zero(monkeypatch):
    """An all-ones {0, 1} input: PyTorch pads it with 0, i.e. x = -1 in xnor-popcount terms. With
    pad_value -1 every output pixel is exact; with the naive pad_value 0 (PyTorch's zero copied
    literally; the CPU plugin then leaves padded taps out of the count) the interior is still
    right but every border pixel whose padded taps do not sum to zero is wrong."""
    rng = np.random.default_rng(0)
    activation = np.ones((1, 16, 6, 7))
    weight = rng.standard_normal((5, 16, 3, 3))
    binary = np.where(weight >= 0, 1.0, -1.0) * np.abs(weight).mean()
    expected = F.conv2d(torch.tensor(activation), torch.tensor(binary), padding=1).numpy()
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    border = np.ones(expected.shape, dtype=bool)
    border[interior] = False

    exact = _single_binary_conv(activation, weight, padding=1)
    assert np.abs(exact - expected).max() < 1e-5

    monkeypatch.setattr(ir_graph, "ZERO_PAD_VALUE", 0.0)
    naive = _single_binary_conv(activation, weight, padding=1)
    assert np.abs(naive - expected)[interior].max() < 1e-5
    assert (np.abs(naive - expected)[border] > 1e-3).mean() > 0.5


@torch.no_grad()
def test_border_of_ones_after_the_first_activation(make_model, monkeypatch):
    """The whole model: half of conv1's channels fire everywhere (BN gamma 0, beta 1), so conv2
    sees a border of ones. The exact export matches PyTorch; the naive pad_value 0 does not."""
    model, images = make_model("vgg7", "bnn", seed=1)
    bn = model.features.conv1.bn
    always_on = torch.arange(bn.num_features) % 2 == 0
    bn.weight[always_on] = 0.0
    bn.bias[always_on] = 1.0

    ir, _ = to_openvino(model, images.shape)
    exact = verify(ir, model, images, max_abs_dlogit=DLOGIT_BOUND)
    assert exact.passed, exact.reason

    monkeypatch.setattr(ir_graph, "ZERO_PAD_VALUE", 0.0)
    naive_ir, _ = to_openvino(model, images.shape)
    naive = verify(naive_ir, model, images, max_abs_dlogit=DLOGIT_BOUND)
    assert not naive.passed
    assert naive.max_abs_dlogit > 100 * DLOGIT_BOUND


def _count_through_cpu(bits_constant: ov.Output, activation: np.ndarray) -> np.ndarray:
    image = ops.parameter(list(activation.shape), np.float32)
    quantized = ops.fake_quantize(image, np.float32(0.5), np.float32(0.5), np.float32(0.0),
                                  np.float32(1.0), 2)
    count = ops.binary_convolution(quantized, bits_constant, [1, 1], [0, 0], [0, 0], [1, 1],
                                   "xnor-popcount", -1.0)
    compiled = ov.Core().compile_model(ov.Model([count.output(0)], [image]), "CPU")
    return compiled(activation.astype(np.float32))[0]


def test_cpu_plugin_reads_packed_filters_least_significant_bit_first():
    """Pins the bit order ir_graph.pack_filter_bits writes: OpenVINO's own u1 constant packs the
    most significant bit first, and the CPU plugin then convolves with bit-reversed filters."""
    rng = np.random.default_rng(1)
    activation = (rng.random((2, 16, 5, 5)) < 0.5).astype(np.float64)
    filters = rng.random((6, 16, 3, 3)) < 0.5
    signs = np.where(filters, 1.0, -1.0)
    expected = F.conv2d(torch.tensor(2 * activation - 1), torch.tensor(signs)).numpy()

    ours = _count_through_cpu(ir_graph.pack_filter_bits(filters), activation)
    assert np.array_equal(ours, expected)
    openvino_packed = ops.constant(filters.astype(np.uint8), dtype=ov.Type.u1).output(0)
    assert not np.array_equal(_count_through_cpu(openvino_packed, activation), expected)


REFUSALS = [
    ("vgg7", "bnn", {"weight_bits": 32}, "weight_bits=32: full-precision weights"),
    ("resnet18", "fp", {}, "weight_bits=32"),
    ("vgg7", "bnn", {"act_bits": 2}, "4-level (2-bit) activations"),
    ("alexnet", "bnn", {"act_bits": 32}, "full-precision activations"),
    ("vgg7", "coupled", {"act_bits": 2}, "only ternary coupled models decouple"),
]


@pytest.mark.parametrize("name, variant, options, reason", REFUSALS,
                         ids=[f"{n}-{v}-{o}" for n, v, o, _ in REFUSALS])
def test_models_without_a_binary_form_are_refused(name, variant, options, reason):
    model = models.build(name, variant, **options, width_mult=0.1,
                         **({"input_size": 32} if name.startswith("resnet") else {}))
    with pytest.raises(ExportRefused, match=reason.replace("(", r"\(").replace(")", r"\)")) as info:
        to_openvino(model, (1, 3, model.config.input_size, model.config.input_size))
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_a_model_not_built_by_the_registry_is_refused():
    with pytest.raises(ExportRefused, match="not built by binaryduo.models.build"):
        to_openvino(nn.Sequential(nn.Conv2d(3, 8, 3)), (1, 3, 32, 32))
