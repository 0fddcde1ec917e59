"""Export to OpenVINO with bit-packed binary convolutions (issue 16): the IR computes what the
PyTorch model computes, on every architecture, with its binary layers on the binary kernel.

Bound: the binary layers are exact (integer counts against half-integer thresholds), so the IR
differs from the float64 PyTorch run only by float32 round-off in the full-precision layers
(first conv, residual stream, shortcuts, classifier): measured at most 2.6e-6 on these models
(logits of magnitude 1-5, 5 seeds x 16 images each). DLOGIT_BOUND leaves a margin of ~40x
and stays far below what one flipped binary activation does to a logit.
"""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset16 as ops
import pytest
import torch
from torch import nn

from binaryduo import models
from binaryduo.models.layers import ActQuant, QConv2d
from binaryduo.models.testing import firing_rates
from binaryduo.trainer.export import ExportRefused, ir_graph, to_openvino, verify
from binaryduo.trainer.export.ir_graph import Affine, ConvGeometry

DLOGIT_BOUND = 1e-4


def _binary_conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QConv2d) and m.weight_bits == 1]


def _float_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            or (isinstance(m, nn.Conv2d) and not isinstance(m, QConv2d))]


@pytest.mark.parametrize("variant", ["bnn", "decoupled"])
@pytest.mark.parametrize("name", models.names())
def test_ir_matches_pytorch_and_runs_binary_kernels(name, variant, make_model):
    model, images = make_model(name, variant)
    # the check is only as strong as the thresholds it crosses: every binary activation fires on
    # a good share of its inputs (random BN statistics near the data's, negative gammas included)
    assert all(0.1 < rate < 0.9 for rate in firing_rates(model, images, ActQuant))

    ir, summary = to_openvino(model, images.shape)
    report = verify(ir, model, images, max_abs_dlogit=DLOGIT_BOUND)

    assert report.passed, report.reason
    assert report.identical_predictions == report.samples == len(images)
    assert report.max_abs_dlogit <= DLOGIT_BOUND
    expected = _binary_conv_names(model)
    assert summary.binary_layers == expected
    assert report.binary_kernels == report.expected_binary_kernels == len(expected)
    assert sorted(report.binary_layers) == sorted(expected)
    assert report.missing_binary_layers == []
    # the plugin's packed 1-bit kernel (jit_avx2_u1 on this machine), not a float fallback
    assert report.binary_primitive_types and all(
        p.endswith("_u1") for p in report.binary_primitive_types)
    assert report.inference_precision == "f32"
    # what stays float: first conv, classifier, ResNet 1x1 shortcuts
    assert summary.float_layers == _float_layer_names(model)
    assert summary.exported_variant == variant


def test_per_channel_alpha_exports_exactly(make_model):
    model, images = make_model("resnet18", "bnn", per_channel_scale=True)
    ir, _ = to_openvino(model, images.shape)
    report = verify(ir, model, images, max_abs_dlogit=DLOGIT_BOUND)
    assert report.passed, report.reason


def test_coupled_model_is_exported_as_its_decoupling(make_model):
    coupled, images = make_model("vgg7", "coupled")
    ir, summary = to_openvino(coupled, images.shape)
    assert (summary.variant, summary.exported_variant) == ("coupled", "decoupled")
    assert any("decouple" in note for note in summary.notes)
    # the float64 coupled model equals its decoupling exactly, so it is the reference itself
    report = verify(ir, coupled, images, max_abs_dlogit=DLOGIT_BOUND)
    assert report.passed, report.reason
    # input channels of the binary convs are the doubled (replicated) activations
    assert [layer.in_channels for layer in summary.layers if layer.kind == "binary"][:2] == [18, 18]


@torch.no_grad()
def test_ties_fire_as_in_pytorch(make_model):
    """y == 1/2 exactly fires (floor(y + 1/2)); a threshold one count off would flip every tie.
    conv2 gets weights +-1 (alpha = 1) and a BN with eps 0, var 1, mean 0, gamma 1 and
    beta = 1/2 - k: y = z + 1/2 - k hits 1/2 exactly wherever the integer z equals k."""
    model, images = make_model("vgg7", "bnn", seed=3)
    conv, bn = model.features.conv2.conv, model.features.conv2.bn
    conv.weight.copy_(torch.where(torch.rand_like(conv.weight) < 0.5, -1.0, 1.0))
    captured = {}
    hook = conv.register_forward_hook(lambda _m, _i, out: captured.setdefault("z", out))
    model(images)
    hook.remove()
    k = captured["z"].transpose(0, 1).flatten(1).median(dim=1).values  # typical count per channel
    bn.eps = 0.0
    bn.running_mean.zero_(), bn.running_var.fill_(1.0), bn.weight.fill_(1.0)
    bn.bias.copy_(0.5 - k)
    pre_activations = {}
    hook = bn.register_forward_hook(lambda _m, _i, out: pre_activations.setdefault("y", out))
    model.double()(images.double())  # float64, as verify's reference runs
    hook.remove()
    model.float()
    ties = int((pre_activations["y"] == 0.5).sum())
    assert ties > 100

    ir, _ = to_openvino(model, images.shape)
    report = verify(ir, model, images, max_abs_dlogit=DLOGIT_BOUND)
    assert report.passed, report.reason


def _binarized_channels(values: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The {0, 1} bits OpenVINO's CPU plugin produces for ``scale * values + shift >= 1/2``,
    read back through a 1x1 BinaryConvolution (a FakeQuantize(levels=2) cannot be a model output
    on the CPU plugin: it leaves a bit-packed buffer). Filter o is -1 everywhere but +1 at o, so
    P_o = 2 x_o - T with T the sum of x = 2a - 1 over all channels, n always-0 padding channels
    included; summing over the C outputs, T = (sum P - 2n) / (2 - C)."""
    channels = len(values)
    image = ops.parameter([1, channels, 1, 1], np.float32)
    bits = ir_graph.binarize(Affine(image.output(0), scale, shift, False), "act")
    filters = np.zeros((channels, bits.padded_channels, 1, 1), dtype=bool)
    filters[np.arange(channels), np.arange(channels)] = True
    count = ops.binary_convolution(bits.value, ir_graph.pack_filter_bits(filters), [1, 1],
                                   [0, 0], [0, 0], [1, 1], "xnor-popcount", -1.0)
    compiled = ov.Core().compile_model(ov.Model([count.output(0)], [image]), "CPU")
    p = compiled(values.reshape(1, -1, 1, 1).astype(np.float32))[0].ravel().astype(np.float64)
    padding = bits.padded_channels - channels
    total = (p.sum() - 2 * padding) / (2 - channels)
    return ((p + total) / 2 + 1) / 2


def test_float_thresholds_fire_on_ties_in_the_cpu_plugin():
    """A float pre-activation fires at >= its threshold, also when the BN scale is negative
    (FakeQuantize output levels swapped) or zero (a constant unit)."""
    half = np.float32(0.5)
    below, above = np.nextafter(half, np.float32(0)), np.nextafter(half, np.float32(1))
    values = np.array([half, below, above, half, below, above, 7.0, -7.0], np.float32)
    scale = np.array([1.0, 1.0, 1.0, -2.0, -2.0, -2.0, 0.0, 0.0])
    shift = np.array([0.0, 0.0, 0.0, 1.5, 1.5, 1.5, 0.5, 0.25])
    # y = v: fires at v >= 1/2; y = 1.5 - 2v: fires at v <= 1/2; constants 1/2 (fires), 1/4
    assert _binarized_channels(values, scale, shift).tolist() == [1, 0, 1, 1, 1, 0, 1, 0]
    threshold, _, _ = ir_graph.binarization_thresholds(np.array([1.0]), np.array([0.0]), False)
    assert threshold[0] == below  # 0.49999997: v > it is exactly v >= 1/2 in float32


def test_threshold_rounding_is_exact_around_random_thresholds():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 3, 200) * rng.choice([-1, 1], 200)
    shift = rng.normal(0, 2, 200)
    t = (0.5 - shift) / scale
    for integer_valued in (False, True):
        threshold, low, high = ir_graph.binarization_thresholds(scale, shift, integer_valued)
        for step in range(-3, 4):
            if integer_valued:
                v = np.floor(t) + step
            else:
                v = t.astype(np.float32)
                for _ in range(abs(step)):
                    v = np.nextafter(v, np.float32(np.sign(step) * np.inf))
            fires = np.where(v.astype(np.float32) > threshold, high, low)
            expected = np.where(scale > 0, v >= t, v <= t)
            assert np.array_equal(fires == 1, expected)
