"""Decoupling is exact (docs/method.md §3): float64 logits equal, in eval and train mode, every model."""
import copy

import pytest
import torch
from torch import nn

from binaryduo import models
from binaryduo.models import decoupling as decouple_module
from binaryduo.models.layers import ActQuant, DecoupledBatchNorm2d

SMALL = {"resnet18": {"input_size": 64}, "resnet18_sc": {"input_size": 64}}


def _coupled(name, generator, **options):
    torch.manual_seed(0)
    model = models.build(name, "coupled", **{**SMALL.get(name, {}), **options})
    return models.randomize_batchnorm_(model, generator)


def _batch(model, generator, n=3):
    c = model.config
    return torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=generator)


def _activation_count(model, batch):
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()) and None)
             for m in model.modules() if isinstance(m, ActQuant)]
    with torch.no_grad():
        model.eval()(batch)
    for hook in hooks:
        hook.remove()
    return sum(sizes)


def _level_fractions(model, batch):
    """Fractions of ternary outputs at 0, 1/2, 1 over every activation of ``model``."""
    counts = torch.zeros(3)

    def count(_module, _inputs, out):
        counts.add_(torch.stack([(out == v).sum() for v in (0, 0.5, 1)]))

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, ActQuant)]
    with torch.no_grad():
        model.eval()(batch)
    for hook in hooks:
        hook.remove()
    return counts / counts.sum()


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_decoupling_is_exact_in_float64(name, mode, generator):
    coupled = _coupled(name, generator)
    batch = _batch(coupled, generator, n=2 if name == "alexnet" else 3)
    decoupled = models.decouple(coupled)
    check = models.check_decoupling(coupled, decoupled, batch, mode)
    assert check.max_abs_dlogit <= 1e-9
    assert check.changed_predictions == 0
    assert check.parameter_deviation == 0.0
    assert check.passed()
    # float32 is reported beside it: a pre-activation within an ulp of a threshold can flip, and a
    # flip early in the network changes everything downstream of it, so it is a count, not a bound
    assert check.native_dtype == "float32"
    assert 0 <= check.native_activation_flips < check.activations_compared
    assert check.activations_compared == _activation_count(coupled, batch)
    # the check is not trivially satisfied: every ternary level occurs often
    assert (_level_fractions(coupled, batch) > 0.02).all()


@pytest.mark.parametrize("options", [{"per_channel_scale": True}, {"weight_bits": 32},
                                     {"width_mult": 0.5, "in_channels": 1}])
def test_decoupling_exact_with_options(options, generator):
    coupled = _coupled("vgg7", generator, **options)
    decoupled = models.decouple(coupled)
    assert decoupled.config.variant == "decoupled"
    assert decoupled.config.act_levels == 1
    check = models.check_decoupling(coupled, decoupled, _batch(coupled, generator))
    assert check.passed(), check


@pytest.mark.parametrize("name", models.names())
def test_decoupled_shapes_equal_registry_decoupled(name):
    coupled = models.build(name, "coupled", **SMALL.get(name, {}))
    made = models.decouple(coupled).state_dict()
    built = models.build(name, "decoupled", **SMALL.get(name, {})).state_dict()
    assert made.keys() == built.keys()
    assert all(made[k].shape == built[k].shape for k in made)


def test_decouple_leaves_the_input_untouched(generator):
    coupled = _coupled("resnet18", generator)
    before = copy.deepcopy(coupled.state_dict())
    decoupled = models.decouple(coupled)
    after = coupled.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    coupled_ptrs = {p.data_ptr() for p in coupled.parameters()}
    assert not coupled_ptrs & {p.data_ptr() for p in decoupled.parameters()}


def test_decouple_rules_on_parameters(generator):
    coupled = _coupled("vgg7", generator)
    decoupled = models.decouple(coupled)
    bn_c, bn_d = coupled.features.conv2.bn, decoupled.features.conv2.bn
    assert torch.equal(bn_d.bias, torch.cat([bn_c.bias - 0.25, bn_c.bias + 0.25]))
    assert torch.equal(bn_d.running_mean, torch.cat([bn_c.running_mean] * 2))  # mean unshifted
    assert torch.equal(bn_d.weight, torch.cat([bn_c.weight] * 2))
    w_c, w_d = coupled.features.conv3.conv.weight, decoupled.features.conv3.conv.weight
    assert torch.equal(w_d, torch.cat([w_c / 2, w_c / 2], dim=1))
    assert torch.equal(decoupled.features.conv1.conv.weight, coupled.features.conv1.conv.weight)
    assert torch.equal(decoupled.features.conv6.bn.bias, coupled.features.conv6.bn.bias)
    assert torch.equal(decoupled.classifier.weight, coupled.classifier.weight)


def test_decoupled_mode_follows_coupled(generator):
    coupled = _coupled("alexnet", generator).eval()
    assert not models.decouple(coupled).training
    assert models.decouple(coupled.train()).training


def test_fine_tuning_moves_the_copies_apart(generator):
    decoupled = models.decouple(_coupled("vgg7", generator))
    decoupled.train()
    decoupled(_batch(decoupled, generator, n=8)).logsumexp(1).mean().backward()
    bn = decoupled.features.conv3.bn
    half = bn.num_features // 2
    assert not torch.equal(bn.weight.grad[:half], bn.weight.grad[half:])


@pytest.mark.parametrize("variant", ["fp", "bnn", "decoupled"])
def test_decouple_refuses_non_coupled_variants(variant):
    with pytest.raises(ValueError, match=f"needs a coupled model.*variant '{variant}'"):
        models.decouple(models.build("vgg7", variant))


def test_decouple_refuses_non_ternary_and_foreign_models():
    with pytest.raises(ValueError, match="ternary"):
        models.decouple(models.build("vgg7", "coupled", act_bits=2))
    with pytest.raises(TypeError, match="built by binaryduo.models.build"):
        models.decouple(nn.Sequential(nn.Linear(2, 2)))


def test_check_catches_a_wrong_rule(monkeypatch, generator):
    """Shifting the running mean instead of beta (a known trap) must fail the float64 check."""
    original = decouple_module._transform

    def wrong(module, key, value):
        if isinstance(module, DecoupledBatchNorm2d) and module.shift and key == "running_mean":
            return torch.cat([value + 0.25, value - 0.25])
        if isinstance(module, DecoupledBatchNorm2d) and key == "bias":
            return torch.cat([value] * module.copies)
        return original(module, key, value)

    coupled = _coupled("vgg7", generator)
    batch = _batch(coupled, generator, n=8)
    monkeypatch.setattr(decouple_module, "_transform", wrong)
    check = models.check_decoupling(coupled, models.decouple(coupled), batch)
    assert check.max_abs_dlogit > 1e-3
    assert not check.passed()


def test_check_catches_a_tampered_decoupled_model(generator):
    coupled = _coupled("vgg7", generator)
    decoupled = models.decouple(coupled)
    with torch.no_grad():
        decoupled.features.conv2.bn.bias.add_(0.05)
    check = models.check_decoupling(coupled, decoupled, _batch(coupled, generator, n=8))
    assert check.parameter_deviation == pytest.approx(0.05, rel=1e-4)
    assert check.native_activation_flips > 0
    assert check.native_max_abs_dlogit > 1e-4
    assert not check.passed()


def test_check_rejects_a_model_of_other_shapes(generator):
    coupled = _coupled("vgg7", generator)
    other = models.build("vgg7", "decoupled", width_mult=0.5)
    with pytest.raises(ValueError, match="shapes"):
        models.check_decoupling(coupled, other, _batch(coupled, generator))


@pytest.mark.parametrize("name", ["vgg7", "resnet18"])
def test_decoupling_flips_nothing_under_bf16_autocast(name, generator, monkeypatch):
    """Mixed precision (bf16 autocast, float32 BN: models.Float32BatchNorm2d): the binary network
    still fires exactly where the ternary one does -- the bf16 convolutions of {0, 1/2, 1} and
    [W/2, W/2] sum the same multiples of alpha/2 exactly, and the thresholds compare float32
    pre-activations. The control: BN output rounded to bf16 puts y and y - 1/4 on different
    grids, and activations flip (measured: 3.3e-3 of them on VGG-7, 2.4e-3 on ResNet-18)."""
    coupled = _coupled(name, generator).eval()
    decoupled = models.decouple(coupled)
    batch = _batch(coupled, generator, n=16 if name == "vgg7" else 4)
    check = models.check_decoupling(coupled, decoupled, batch, autocast=torch.bfloat16)
    assert check.native_dtype == "float32 (autocast bfloat16)"
    assert check.native_activation_flips == 0 and check.native_changed_predictions == 0
    assert check.passed()
    monkeypatch.setattr(models.Float32BatchNorm2d, "forward", nn.BatchNorm2d.forward)
    rounded = models.check_decoupling(coupled, decoupled, batch, autocast=torch.bfloat16)
    assert rounded.native_flip_fraction > 1e-3, rounded


def test_float32_batchnorm_keeps_float32_under_autocast():
    bn = models.Float32BatchNorm2d(4).train()
    x = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x)
    assert y.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert torch.allclose(y, nn.functional.batch_norm(x.float(), None, None, bn.weight, bn.bias,
                                                      training=True), atol=1e-6)
