"""Registry, layer order, full-precision layers and widths (docs/method.md §2), over every model."""
import pytest
import torch
from torch import nn

from binaryduo import models
from binaryduo.models import ActQuant, DecoupledBatchNorm2d, QConv2d, Replicate

# ResNets are fully convolutional up to global pooling: test them at 64 px to stay fast.
SMALL = {"resnet18": {"input_size": 64}, "resnet18_sc": {"input_size": 64}}
ALL = [(name, variant) for name in models.names() for variant in models.variants()]


def _build(name, variant, **options):
    return models.build(name, variant, **{**SMALL.get(name, {}), **options})


def _input(model, batch=2):
    c = model.config
    return torch.randn(batch, c.in_channels, c.input_size, c.input_size,
                       generator=torch.Generator().manual_seed(0))


def test_registry_names():
    assert models.names() == ["alexnet", "resnet18", "resnet18_sc", "vgg7"]
    assert models.variants() == ("fp", "bnn", "coupled", "decoupled")


@pytest.mark.parametrize("name,variant", ALL)
def test_forward_backward(name, variant):
    torch.manual_seed(0)
    model = _build(name, variant, num_classes=7)
    model.train()
    logits = model(_input(model))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
    with_grad = sum(int(p.grad.abs().sum() > 0) for p in model.parameters())
    assert with_grad > 0.9 * len(list(model.parameters()))


@pytest.mark.parametrize("name,variant", ALL)
def test_full_precision_layers_and_binary_weights(name, variant):
    model = _build(name, variant)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first_name, first = convs[0]
    assert type(first) is nn.Conv2d and first.bias is None, "first conv is full precision"
    if name.startswith("resnet"):
        assert isinstance(model.classifier, nn.Linear) and model.classifier.bias is not None
        fp_names = {n for n, m in convs if type(m) is nn.Conv2d}
        assert fp_names == {first_name} | {n for n, _ in convs if ".shortcut." in n}
        for n, m in convs:
            if ".shortcut." in n:
                assert m.kernel_size == (1, 1)
    else:
        assert type(model.classifier) is nn.Conv2d and model.classifier.bias is not None
    quantized = [m for _, m in convs if isinstance(m, QConv2d)]
    assert quantized and all(m.bias is None for m in quantized)
    expected_bits = 32 if variant == "fp" else 1
    assert {m.weight_bits for m in quantized} == {expected_bits}
    levels = {m.levels for m in model.modules() if isinstance(m, ActQuant)}
    assert levels == {"fp": set(), "bnn": {1}, "coupled": {2}, "decoupled": {1}}[variant]


# (conv in, conv out, BN width) per layer, for the decoupled tables of docs/method.md §2.
VGG7_TABLE = {
    "bnn": [(3, 64, 64), (64, 64, 64), (64, 128, 128), (128, 128, 128), (128, 512, 512),
            (512, 512, 512)],
    "coupled": [(3, 45, 45), (45, 45, 45), (45, 90, 90), (90, 90, 90), (90, 336, 336),
                (336, 512, 512)],
    "decoupled": [(3, 45, 90), (90, 45, 90), (90, 90, 180), (180, 90, 180), (180, 336, 672),
                  (672, 512, 512)],
}
ALEXNET_TABLE = {
    "bnn": [(3, 96, 96), (96, 256, 256), (256, 384, 384), (384, 384, 384), (384, 256, 256),
            (256, 4096, 4096), (4096, 4096, 4096)],
    "coupled": [(3, 88, 88), (88, 192, 192), (192, 256, 256), (256, 256, 256),
                (256, 192, 192), (192, 2400, 2400), (2400, 4096, 4096)],
    "decoupled": [(3, 88, 176), (176, 192, 384), (384, 256, 512), (512, 256, 512),
                  (512, 192, 384), (384, 2400, 4800), (4800, 4096, 4096)],
}


@pytest.mark.parametrize("name,table", [("vgg7", VGG7_TABLE), ("alexnet", ALEXNET_TABLE)])
@pytest.mark.parametrize("variant", ["bnn", "coupled", "decoupled"])
def test_chain_widths(name, table, variant):
    model = models.build(name, variant)
    got = [(b.conv.in_channels, b.conv.out_channels, b.bn.num_features) for b in model.features]
    assert got == table[variant]
    assert model.classifier.in_channels == table[variant][-1][1]


@pytest.mark.parametrize("name", ["vgg7", "alexnet"])
def test_chain_layer_order_pool_before_bn_and_relu_before_classifier(name):
    model = models.build(name, "decoupled")
    blocks = list(model.features)
    for block in blocks[:-1]:
        order = [k for k in block._modules if k != "dropout"]
        expected = ["conv", "pool", "replicate", "bn", "act"] if "pool" in order else \
            ["conv", "replicate", "bn", "act"]
        assert order == expected
        assert isinstance(block.bn, DecoupledBatchNorm2d) and block.bn.shift == 0.25
    last = blocks[-1]
    assert isinstance(last.act, nn.ReLU) and type(last.bn) is models.Float32BatchNorm2d
    pools = [name for name, block in model.features.named_children() if "pool" in block._modules]
    assert pools == (["conv2", "conv3", "conv4"] if name == "vgg7" else ["conv1", "conv2", "conv5"])


def test_alexnet_dropout_after_fc6_activation_and_fc7_relu():
    model = models.build("alexnet", "bnn")
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)] == \
        ["features.fc6.dropout", "features.fc7.dropout"]
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))
    assert list(model.features.fc6._modules) == ["conv", "bn", "act", "dropout"]
    assert not any(isinstance(m, nn.Dropout) for m in models.build("alexnet", "bnn", dropout=0).modules())


def _resnet_convs(model):
    return [(n, m.in_channels, m.out_channels, m.stride[0]) for n, m in model.named_modules()
            if isinstance(m, QConv2d)]


@pytest.mark.parametrize("name", ["resnet18", "resnet18_sc"])
def test_resnet_widths(name):
    bnn = _resnet_convs(models.build(name, "bnn"))
    coupled = _resnet_convs(models.build(name, "coupled"))
    decoupled = _resnet_convs(models.build(name, "decoupled"))
    assert len(bnn) == len(coupled) == len(decoupled) == 16
    assert [c[2] for c in bnn] == [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4
    assert [c[2] for c in coupled] == [64] * 4 + [90] * 4 + [180] * 4 + [360] * 3 + [512]
    assert [c[2] for c in decoupled] == [c[2] for c in coupled]
    assert [c[1] for c in decoupled] == [2 * c[1] for c in coupled]
    assert decoupled[-1][1:3] == (720, 512)
    assert [c[3] for c in decoupled] == [c[3] for c in bnn]
    assert sum(c[3] == 2 for c in bnn) == 3


@pytest.mark.parametrize("name", ["resnet18", "resnet18_sc"])
def test_resnet_decoupled_stream_rules(name):
    model = models.build(name, "decoupled")
    assert isinstance(model.stem.stream_bn, DecoupledBatchNorm2d)
    assert model.stem.stream_bn.num_features == 128 and model.stem.stream_bn.shift == 0.25
    assert isinstance(model.stem.rep, Replicate)
    units = list(model.units)
    for index, unit in enumerate(units):
        shortcut = list(unit.shortcut._modules)
        bns = [(k, m) for k, m in unit.branch.named_children() if isinstance(m, nn.BatchNorm2d)]
        inner, (final_key, final) = bns[:-1], bns[-1]
        for _, bn in inner:
            assert isinstance(bn, DecoupledBatchNorm2d) and bn.shift == 0.25
        if index == len(units) - 1:
            assert shortcut == ["mean", "pad"]
            assert type(final) is models.Float32BatchNorm2d and final.num_features == 512
        elif "conv" in shortcut:
            assert shortcut == ["mean", "pool", "conv", "bn", "rep"]
            assert final.shift == 0.25
        else:
            assert shortcut == []
            assert final.shift == 0.0
    # the stream is never quantized: no activation quantizer outside the branches
    for n, m in model.named_modules():
        if isinstance(m, ActQuant):
            assert ".branch.act" in n


def test_resnet_coupled_last_shortcut_zero_pads():
    model = models.build("resnet18", "coupled", input_size=64)
    last = model.units[-1]
    assert list(last.shortcut._modules) == ["pad"]
    stream = torch.randn(1, 360, 2, 2)
    padded = last.shortcut(stream)
    assert padded.shape == (1, 512, 2, 2)
    assert torch.equal(padded[:, :360], stream) and not padded[:, 360:].any()


def test_resnet_baseline_structure():
    model = models.build("resnet18", "bnn")
    assert list(model.stem._modules) == ["conv", "bn", "relu", "pool", "stream_bn"]
    assert model.stem.stream_bn.num_features == 64
    first = model.units[0].branch
    assert list(first._modules) == ["act1", "conv1", "bn1", "act2", "conv2", "bn2"]
    assert list(model.units[2].shortcut._modules) == ["pool", "conv", "bn"]
    assert isinstance(model.head.relu, nn.ReLU) and model.classifier.in_features == 512
    sc = models.build("resnet18_sc", "bnn")
    assert len(sc.units) == 16 and list(sc.units[0].branch._modules) == ["act1", "conv1", "bn1"]


def test_half_width_vgg7_matches_prototype_widths():
    bnn = models.build("vgg7", "bnn", width_mult=0.5)
    coupled = models.build("vgg7", "coupled", width_mult=0.5)
    assert [b.conv.out_channels for b in bnn.features] == [32, 32, 64, 64, 256, 256]
    assert [b.conv.out_channels for b in coupled.features] == [23, 23, 45, 45, 168, 256]


def test_options_change_the_model():
    model = models.build("vgg7", "bnn", weight_bits=32, act_bits=2, in_channels=1,
                         num_classes=4, ste="swishsign", per_channel_scale=True, latent_clip=1.0)
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    assert {m.levels for m in acts} == {3} and {m.ste.value for m in acts} == {"swishsign"}
    assert {m.weight_bits for m in model.modules() if isinstance(m, QConv2d)} == {32}
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert {m.levels for m in models.build("vgg7", "bnn", act_bits=32).modules()
            if isinstance(m, ActQuant)} == {None}
    assert models.build("resnet18", "bnn", input_size=96).config.input_size == 96


@pytest.mark.parametrize("call,message", [
    (lambda: models.build("vgg8"), "unknown model 'vgg8'; valid models: alexnet, resnet18"),
    (lambda: models.build("vgg7", "ternary"), "unknown variant 'ternary' .* valid variants: fp, bnn"),
    (lambda: models.build("vgg7", "bnn", width=2), "unknown option.*width.*valid options: act_bits"),
    (lambda: models.build("vgg7", "bnn", dropout=0.1), "unknown option.*dropout"),
    (lambda: models.build("vgg7", "bnn", input_size=64), "input_size=64 is not possible"),
    (lambda: models.build("alexnet", "bnn", dropout=1.5), "dropout=1.5"),
    (lambda: models.build("resnet18", "bnn", input_size=16), "too small"),
    (lambda: models.build("vgg7", "bnn", weight_bits=8), "weight_bits=8 must be 1 or 32"),
    (lambda: models.build("vgg7", "bnn", act_bits=2, act_levels=3), "exclusive"),
    (lambda: models.build("vgg7", "bnn", act_bits=0), "act_bits=0"),
    (lambda: models.build("vgg7", "bnn", ste="tanh"), "ste='tanh' must be one of clipped_identity"),
    (lambda: models.build("vgg7", "decoupled", act_bits=2), "binary by construction"),
    (lambda: models.build("vgg7", "bnn", num_classes=0), "num_classes=0"),
    (lambda: models.build("vgg7", "bnn", width_mult=-1), "width_mult=-1"),
    (lambda: models.build("vgg7", "bnn", latent_clip=True), "latent_clip=True"),
])
def test_bad_build_arguments_say_what_is_valid(call, message):
    with pytest.raises(ValueError, match=message):
        call()
