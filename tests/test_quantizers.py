"""Quantizer values at and around every threshold, STE gradients, weight scaling (docs/method.md §1)."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from binaryduo.models import STE, activation_ste_gradient, binarize_weight, quantize_activation
from binaryduo.models.layers import ActQuant, QConv2d, clip_latent_weights_

DTYPES = [torch.float32, torch.float64]


def _exact(y: float, levels: int) -> float:
    """floor(n * clip(y, 0, 1) + 1/2) / n in exact rational arithmetic."""
    clipped = min(max(Fraction(y), Fraction(0)), Fraction(1))
    return float(Fraction(math.floor(levels * clipped + Fraction(1, 2)), levels))


def _around(threshold: float, dtype: torch.dtype) -> torch.Tensor:
    t = torch.tensor(threshold, dtype=dtype)
    below = torch.nextafter(t, torch.tensor(-1.0, dtype=dtype))
    above = torch.nextafter(t, torch.tensor(2.0, dtype=dtype))
    return torch.stack([below, t, above])


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_fires_at_half_ties_up_and_not_one_ulp_below(dtype):
    y = _around(0.5, dtype)
    assert quantize_activation(y, 1).tolist() == [0.0, 1.0, 1.0]
    far = torch.tensor([-3.0, -0.0, 0.0, 0.25, 0.99, 1.0, 7.0], dtype=dtype)
    assert quantize_activation(far, 1).tolist() == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_levels_and_thresholds(dtype):
    assert quantize_activation(_around(0.25, dtype), 2).tolist() == [0.0, 0.5, 0.5]
    assert quantize_activation(_around(0.75, dtype), 2).tolist() == [0.5, 1.0, 1.0]
    y = torch.tensor([-1.0, 0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 1.0, 1.5], dtype=dtype)
    assert quantize_activation(y, 2).tolist() == [0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1]


@pytest.mark.parametrize("levels,dtype", [
    (1, torch.float32), (1, torch.float64), (2, torch.float32), (2, torch.float64),
    # k-bit levels are evaluated in float64: exact for float32 inputs (float64 ones may be an ulp
    # off at a threshold, which the k-bit study, run in float32, never sees).
    (3, torch.float32), (7, torch.float32), (15, torch.float32)])
def test_staircase_matches_exact_rational_formula(levels, dtype, generator):
    thresholds = [(k + 0.5) / levels for k in range(levels)]
    near = torch.cat([_around(t, dtype) for t in thresholds])
    spread = torch.rand(2000, generator=generator, dtype=torch.float64).to(dtype) * 1.6 - 0.3
    y = torch.cat([near, spread])
    got = quantize_activation(y, levels)
    want = torch.tensor([_exact(float(v), levels) for v in y], dtype=torch.float64).to(dtype)
    assert torch.equal(got, want)
    assert got.dtype == dtype
    assert len(torch.unique(got)) == levels + 1  # every level is reachable


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_clipped_identity_gradient_window(levels):
    y = torch.tensor([-0.5, 0.0, 1e-6, 0.25, 0.5, 0.75, 1 - 1e-6, 1.0, 1.5], requires_grad=True)
    upstream = torch.arange(1.0, 10.0)
    quantize_activation(y, levels).backward(upstream)
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(y.grad, upstream * inside)


def test_clipped_identity_saves_only_a_bool_mask():
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.shape))
        return tensor

    y = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = quantize_activation(y * 1.0, 2)
    assert saved == [(torch.bool, torch.Size([4, 8]))]
    out.sum().backward()


def test_approxsign_shape():
    y = torch.tensor([-0.1, 0.0, 0.25, 0.5, 0.75, 1.0, 1.2])
    grad = activation_ste_gradient(y, 1, STE.APPROXSIGN)
    assert torch.allclose(grad, torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0]))
    # ternary: peaks of 2 at 1/4 and 3/4, zero half-way between them
    grad3 = activation_ste_gradient(torch.tensor([0.25, 0.5, 0.75]), 2, STE.APPROXSIGN)
    assert torch.allclose(grad3, torch.tensor([2.0, 0.0, 2.0]))


@pytest.mark.parametrize("ste", [STE.CLIPPED_IDENTITY, STE.APPROXSIGN, STE.SWISHSIGN])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_every_backward_shape_integrates_to_the_total_rise(ste, levels):
    """Each STE is the derivative of a smooth function rising by 1 overall, like the staircase."""
    y = torch.linspace(-3, 4, 700_001, dtype=torch.float64)
    grad = activation_ste_gradient(y, levels, ste)
    integral = torch.trapezoid(grad, y)
    assert integral.item() == pytest.approx(1.0, abs=1e-3)


def test_swishsign_peak_is_beta_at_threshold_and_symmetric():
    beta = 5.0
    g = activation_ste_gradient(torch.tensor([0.5, 0.4, 0.6], dtype=torch.float64), 1,
                                STE.SWISHSIGN, beta)
    assert g[0].item() == pytest.approx(beta)
    assert g[1].item() == pytest.approx(g[2].item())
    assert 0 < g[1].item() < beta


@pytest.mark.parametrize("ste", [STE.APPROXSIGN, STE.SWISHSIGN])
def test_alternative_ste_used_in_backward(ste):
    y = torch.linspace(-0.5, 1.5, 41, requires_grad=True)
    quantize_activation(y, 1, ste).sum().backward()
    assert torch.allclose(y.grad, activation_ste_gradient(y.detach(), 1, ste))
    module = ActQuant(1, ste)
    z = y.detach().clone().requires_grad_()
    module(z).sum().backward()
    assert torch.equal(z.grad, y.grad)


def test_activation_rejects_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        quantize_activation(torch.zeros(2), 0)


def test_full_precision_actquant_is_clip():
    y = torch.tensor([-1.0, 0.3, 2.0])
    assert ActQuant(None)(y).tolist() == pytest.approx([0.0, 0.3, 1.0])


def test_weight_binarizer_alpha_sign_and_zero():
    w = torch.tensor([[0.5, -0.25], [0.0, -1.25]], requires_grad=True)
    q = binarize_weight(w)
    alpha = (0.5 + 0.25 + 0.0 + 1.25) / 4
    assert torch.equal(q, torch.tensor([[alpha, -alpha], [alpha, -alpha]]))  # sign(0) = +1
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q.backward(upstream)
    assert torch.equal(w.grad, upstream)  # straight through, no gate, nothing through alpha


def test_weight_binarizer_per_channel():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q = binarize_weight(w, per_channel=True)
    assert torch.equal(q, torch.tensor([[2.0, -2.0], [0.5, 0.5]]))


def test_qconv_binarizes_and_halving_is_exact():
    torch.manual_seed(0)
    conv = QConv2d(4, 3, 3, padding=1)
    q = conv.quantized_weight()
    assert torch.equal(q.abs(), torch.full_like(q, conv.weight.abs().mean().item()))
    halved = QConv2d(8, 3, 3, padding=1)
    with torch.no_grad():
        halved.weight.copy_(torch.cat([conv.weight / 2, conv.weight / 2], dim=1))
    assert torch.equal(halved.quantized_weight(), torch.cat([q / 2, q / 2], dim=1))
    fp = QConv2d(4, 3, 3, weight_bits=32)
    assert fp.quantized_weight() is fp.weight
    with pytest.raises(ValueError, match="weight_bits"):
        QConv2d(4, 3, 3, weight_bits=2)


def test_latent_clip_applies_only_when_asked():
    clipped = QConv2d(2, 2, 1, latent_clip=0.1)
    free = QConv2d(2, 2, 1)
    with torch.no_grad():
        clipped.weight.fill_(0.5)
        free.weight.fill_(0.5)
    net = torch.nn.Sequential(clipped, free)
    clip_latent_weights_(net)
    assert torch.all(clipped.weight == 0.1)
    assert torch.all(free.weight == 0.5)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True),
                                            (torch.float64, False), (torch.float64, True)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_binary_conv_recomputes_the_binarized_weight_bit_for_bit(dtype, autocast, per_channel):
    """QConv2d's binary path (alpha * s(W) recomputed in backward) gives exactly the outputs and
    gradients of F.conv2d on binarize_weight(W) -- under bf16 autocast too (float64 is never
    cast) -- and autograd keeps no weight-sized tensor beyond the parameter itself."""
    generator = torch.Generator().manual_seed(3)
    conv = QConv2d(6, 8, 3, stride=2, padding=1, per_channel_scale=per_channel).to(dtype)
    images = torch.randn(4, 6, 9, 9, dtype=dtype, generator=generator)
    upstream = torch.randn(4, 8, 5, 5, generator=generator)
    results = []
    for recompute in (False, True):
        x = images.clone().requires_grad_()
        conv.zero_grad()
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = conv(x) if recompute else F.conv2d(
                x, binarize_weight(conv.weight, per_channel), None, 2, 1)
        out.backward(upstream.to(out.dtype))
        results.append((out, x.grad, conv.weight.grad.clone()))
        weight_sized = [t for t in saved if t.shape == conv.weight.shape
                        and t.data_ptr() != conv.weight.data_ptr()]
        assert bool(weight_sized) is (not recompute)  # F.conv2d keeps the binarized copy
    for reference, recomputed in zip(*results):
        assert reference.dtype == recomputed.dtype
        assert torch.equal(reference, recomputed)
    assert results[0][0].dtype == (torch.bfloat16 if autocast and dtype == torch.float32 else dtype)
