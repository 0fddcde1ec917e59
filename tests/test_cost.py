"""The paper's Mbit and FLOPs (docs/method.md §5), reproduced to +-0.1 from the models as built."""
import pytest

from binaryduo import models

EXPECTED = [  # model, variant, Mbit, Mbit without BN (None: not stated), MFLOPs
    ("alexnet", "decoupled", 189.4, 188.7, 119.0),
    ("alexnet", "bnn", 191.0, None, 125.5),
    ("resnet18", "decoupled", 31.9, None, 163.7),
    ("resnet18_sc", "decoupled", 31.9, None, 163.7),
    ("resnet18", "bnn", 33.5, None, 164.0),
]


@pytest.mark.parametrize("name,variant,mbit,mbit_no_bn,mflops", EXPECTED)
def test_paper_numbers(name, variant, mbit, mbit_no_bn, mflops):
    report = models.cost_report(models.build(name, variant))
    assert report.mbit == pytest.approx(mbit, abs=0.1)
    assert report.flops / 1e6 == pytest.approx(mflops, abs=0.1)
    if mbit_no_bn is not None:
        assert report.mbit_weights_only == pytest.approx(mbit_no_bn, abs=0.1)


def test_alexnet_decoupled_layers_by_hand():
    report = models.cost_report(models.build("alexnet", "decoupled"))
    layers = {layer.name: layer for layer in report.layers}
    conv2 = layers["features.conv2.conv"]
    assert (conv2.weight_bits, conv2.params, conv2.macs) == (1, 176 * 192 * 25, 176 * 192 * 25 * 27 * 27)
    conv1 = layers["features.conv1.conv"]
    assert (conv1.weight_bits, conv1.macs) == (32, 3 * 88 * 121 * 55 * 55)
    fc7 = layers["features.fc7.conv"]
    assert (fc7.params, fc7.macs) == (4800 * 4096, 4800 * 4096)
    assert layers["classifier.bias"].params == 1000
    assert layers["features.fc6.bn"].params == 2 * 4800
    binary_weights = 176 * 192 * 25 + 384 * 256 * 9 + 512 * 256 * 9 + 512 * 192 * 9 \
        + 384 * 2400 * 36 + 4800 * 4096
    assert report.binary_params == binary_weights
    bn = 2 * (176 + 384 + 512 + 512 + 384 + 4800 + 4096)
    assert report.fp_params == 3 * 88 * 121 + 4096 * 1000 + 1000 + bn
    assert report.mbit == pytest.approx((binary_weights + 32 * report.fp_params) / 1e6)
    assert report.flops == report.fp_macs + report.binary_macs / 64


def test_fp_reference_has_no_binary_layers_and_compression_one():
    report = models.cost_report(models.build("vgg7", "fp"))
    assert report.binary_macs == 0 and report.binary_params == 0
    assert report.compression == pytest.approx(1.0)
    binary = models.cost_report(models.build("vgg7", "bnn"))
    assert binary.compression > 20


def test_resnet_shortcut_convs_are_full_precision_macs():
    report = models.cost_report(models.build("resnet18", "decoupled"))
    shortcut = [layer for layer in report.layers if ".shortcut.conv" in layer.name]
    assert len(shortcut) == 3 and all(layer.weight_bits == 32 for layer in shortcut)
    assert {layer.shape for layer in shortcut} == {"64->90 1x1/1", "90->180 1x1/1", "180->360 1x1/1"}


def test_report_json_fields():
    data = models.cost_report(models.build("resnet18_sc", "decoupled")).to_dict()
    for key in ("mbit", "mbit_weights_only", "flops", "binary_macs", "fp_macs", "fp32_mbit",
                "compression", "layers"):
        assert key in data
    assert data["layers"][0]["name"] == "stem.conv"
