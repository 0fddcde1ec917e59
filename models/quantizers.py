"""Activation and weight quantizers of BinaryDuo (docs/method.md §1).

Activations are *unsigned*: ``a = floor(n * clip(y, 0, 1) + 0.5) / n`` with ``n`` levels above
zero (n = 1 binary {0, 1}; n = 2 ternary {0, 1/2, 1}; n = 2^k - 1 for k bits). Ties round up.
The straight-through estimator (STE) passes the gradient where 0 < y < 1 ("clipped identity");
two alternative backward shapes used by the gradient-mismatch study are selectable.

Weights are ``alpha * s(W)`` with ``s(w) = +1 if w >= 0 else -1`` and ``alpha = mean|W|`` over the
whole tensor (one scalar per layer), recomputed every forward; the gradient goes straight to the
latent ``W``.

Both are ``torch.autograd.Function``s that save only what their backward needs: the clipped-identity
activation saves a boolean mask (1 byte per element) rather than its float input, and the weight
binarizer saves nothing. A binary convolution (:func:`binary_conv2d`) goes one step further: it
does not keep ``alpha * s(W)`` for its input gradient (``F.conv2d`` would, one weight-sized tensor
per layer) but recomputes it from the latent ``W`` in the backward pass.
"""
from __future__ import annotations

from enum import Enum

import torch
from torch.nn.modules.utils import _pair

__all__ = [
    "STE",
    "quantize_activation",
    "activation_ste_gradient",
    "binarize_weight",
    "binary_conv2d",
    "weight_scale",
    "levels_for_bits",
]


class STE(str, Enum):
    """Backward shape of the activation quantizer (the forward is always the staircase)."""

    #: d a / d y = 1 on 0 < y < 1, else 0 (BinaryDuo's and the authors' choice).
    CLIPPED_IDENTITY = "clipped_identity"
    #: Bi-Real Net's ApproxSign: a triangle of area 1/n centred on each threshold, peak 2,
    #: base 1/n; for binary, 2 - 4|y - 1/2| on 0 < y < 1.
    APPROXSIGN = "approxsign"
    #: BNN+'s SwishSign derivative, beta * (2 - beta*x*tanh(beta*x/2)) / (1 + cosh(beta*x)),
    #: centred on each threshold with x = 2n (y - t); not windowed (non-zero outside [0, 1]).
    SWISHSIGN = "swishsign"


#: BNN+ trains beta; 5 is the value its authors report as a good fixed choice.
DEFAULT_SWISHSIGN_BETA = 5.0


def _staircase(y: torch.Tensor, levels: int, out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``floor(levels * clip(y, 0, 1) + 0.5) / levels``, with exact thresholds.

    For binary and ternary the thresholds (1/2; 1/4 and 3/4) are exact binary fractions, so the
    staircase is computed by comparison: a value exactly on a threshold goes up, and a value one ulp
    below stays down. (Evaluating ``floor(y + 0.5)`` literally in float32 rounds ``0.5 - 2**-25 + 0.5``
    up to 1.0 and would fire one ulp early.) For k-bit levels the formula is evaluated in float64,
    which is exact for float32/bfloat16/float16 inputs (a float64 input within an ulp of a k-bit
    threshold may land on either side).

    Written for few memory passes: the comparisons write straight into float buffers (``out``,
    and ``scratch`` for the ternary's second step; both like ``y``, fresh if not given), which takes
    the vectorized compare kernel (a bool result, or a bool operand later, runs a scalar loop or a
    hidden float conversion on CPU). The ternary's ``(a + b) / 2`` is one ``lerp(a, b, 1/2)``:
    exact, as every value involved is 0, 1/2 or 1.
    """
    y = y.detach()
    if out is None:
        out = torch.empty_like(y)
    if levels == 1:
        return torch.ge(y, 0.5, out=out)
    if levels == 2:
        if scratch is None:
            scratch = torch.empty_like(y)
        torch.ge(y, 0.25, out=out)
        torch.ge(y, 0.75, out=scratch)
        return out.lerp_(scratch, 0.5)
    wide = y.to(torch.float64)
    return out.copy_(torch.floor(wide.clamp(0.0, 1.0) * levels + 0.5) / levels)


def _clipped_identity_window(y: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Bool mask of ``0 < y < 1`` (NaN: False), using ``scratch`` (like ``y``) as float workspace.

    ``y - y*y > 0`` holds exactly on ``0 < y < 1`` in any binary floating-point format, with or
    without a fused multiply-add: inside, ``y*y < y`` and the rounded square stays below ``y``
    (the gap ``y (1 - y)`` exceeds half an ulp of ``y``), so the difference is positive (it equals
    ``y`` when the square underflows); for ``y < 0`` the square is positive, for ``y > 1`` the
    rounded square is above ``y``, at 0 and 1 the difference is 0, and +-inf and NaN give -inf or
    NaN. One vectorized pass plus one compare, instead of two compares and a logical and.
    """
    torch.addcmul(y, y, y, value=-1, out=scratch)
    return torch.gt(scratch, 0)


def _thresholds(levels: int, like: torch.Tensor) -> torch.Tensor:
    return (torch.arange(levels, dtype=like.dtype, device=like.device) + 0.5) / levels


def activation_ste_gradient(
    y: torch.Tensor, levels: int, ste: STE, beta: float = DEFAULT_SWISHSIGN_BETA
) -> torch.Tensor:
    """d a / d y that the chosen STE assigns at ``y`` (a pure function, also used by the analysis)."""
    ste = STE(ste)
    if ste is STE.CLIPPED_IDENTITY:
        return ((y > 0) & (y < 1)).to(y.dtype)
    if ste is STE.APPROXSIGN:
        # Distance to the nearest threshold, in units of the level spacing, is |frac(n y) - 1/2|.
        frac = torch.frac(y * levels)
        tri = 2.0 * (1.0 - 2.0 * (frac - 0.5).abs())
        return torch.where((y > 0) & (y < 1), tri, torch.zeros_like(y))
    # SwishSign: one bump per threshold; each step has height 1/n and x = 2n (y - t).
    x = 2.0 * levels * (y.unsqueeze(-1) - _thresholds(levels, y))
    bx = beta * x
    bump = beta * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))
    return bump.sum(dim=-1)


class _ActivationQuantizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, levels: int, ste: STE, beta: float):  # noqa: D102 (see quantize_activation)
        ctx.levels, ctx.ste, ctx.beta = levels, ste, beta
        if ste is STE.CLIPPED_IDENTITY:
            # Float workspace for the window: the ternary's second buffer once the staircase is
            # done with it, else the output buffer before the staircase fills it.
            out = torch.empty_like(y)
            if levels == 2:
                scratch = torch.empty_like(y)
                _staircase(y, levels, out, scratch)
                ctx.save_for_backward(_clipped_identity_window(y, scratch))
                return out
            ctx.save_for_backward(_clipped_identity_window(y, out))
            return _staircase(y, levels, out)
        ctx.save_for_backward(y)
        return _staircase(y, levels)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (saved,) = ctx.saved_tensors
        if ctx.ste is STE.CLIPPED_IDENTITY:
            # ReLU's backward kernel, ``window <= 1/2 ? 0 : grad``, run in place on the window cast
            # to the gradient's dtype: two vectorized passes and one buffer (where / masked_fill
            # are scalar loops; a bool or uint8 operand is cast to a hidden float temporary).
            # Exactly masked_fill's result: +0.0 outside the window, whatever the upstream value.
            if torch.is_grad_enabled() and grad_output.requires_grad:
                grad = torch.where(saved, grad_output, 0.0)  # create_graph: differentiable form
            else:
                window = saved.to(grad_output.dtype)
                grad = torch.ops.aten.threshold_backward.grad_input(
                    grad_output, window, 0.5, grad_input=window)
        else:
            grad = grad_output * activation_ste_gradient(saved, ctx.levels, ctx.ste, ctx.beta)
        return grad, None, None, None


def quantize_activation(
    y: torch.Tensor,
    levels: int,
    ste: STE | str = STE.CLIPPED_IDENTITY,
    beta: float = DEFAULT_SWISHSIGN_BETA,
) -> torch.Tensor:
    """Unsigned ``levels``-step activation quantizer with a straight-through backward."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"activation levels must be an integer >= 1, got {levels!r}")
    return _ActivationQuantizer.apply(y, levels, STE(ste), float(beta))


def weight_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """alpha = mean|W| over the whole tensor, or per output channel (dim 0) when ``per_channel``."""
    if per_channel:
        dims = tuple(range(1, weight.dim()))
        return weight.abs().mean(dim=dims, keepdim=True)
    return weight.abs().mean()


def _alpha_sign(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``alpha * s(W)`` as a new tensor (no autograd). One fresh buffer holds |W| (alpha is its
    mean, the same reduction as weight_scale), then s(W) in {0, 1} -> {-1, +1}, then
    alpha * s(W); every step is exact and vectorized, so a recomputation is bit-identical."""
    out = torch.empty_like(weight)
    torch.abs(weight, out=out)
    if per_channel:
        alpha = out.mean(dim=tuple(range(1, weight.dim())), keepdim=True)
    else:
        alpha = out.mean()
    torch.ge(weight, 0, out=out)  # s(0) = s(-0) = +1
    return out.mul_(2).sub_(1).mul_(alpha)


class _WeightBinarizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, per_channel: bool):  # noqa: D102 (see binarize_weight)
        return _alpha_sign(weight, per_channel)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        # Straight through to the latent weight: no |W| <= 1 gate, no gradient through alpha.
        return grad_output, None


def binarize_weight(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``alpha * s(W)`` with s(0) = +1 and alpha = mean|W| (per layer, or per output channel)."""
    return _WeightBinarizer.apply(weight, bool(per_channel))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a convolution of ``x`` in, or None (no cast)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point() \
            or x.dtype == torch.float64:  # autocast never casts float64
        return None
    return torch.get_autocast_dtype(device)


class _BinaryConv2d(torch.autograd.Function):
    """``conv2d(x, alpha * s(W))`` that saves the input and the latent weight (a parameter,
    resident anyway) and recomputes ``alpha * s(W)`` in backward. Autocast is applied by hand
    exactly as it would be to ``F.conv2d`` (both operands cast to its dtype, float64 never), and
    the backward calls the same kernel autograd calls for a convolution, so outputs and
    gradients are bit-identical to ``F.conv2d(x, binarize_weight(W))``."""

    @staticmethod
    def forward(ctx, x, weight, per_channel: bool, stride, padding, dilation, groups):  # noqa: D102
        compute = _autocast_dtype(x)
        ctx.input_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if compute is not None:
                x = x.to(compute)
            binary = _alpha_sign(weight.detach(), per_channel)
            if compute is not None:
                binary = binary.to(compute)
            out = torch.nn.functional.conv2d(x, binary, None, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.compute, ctx.per_channel = compute, per_channel
        ctx.conv = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        conv = (_pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups)
        grad_input = grad_binary = None
        with torch.no_grad(), torch.autocast(grad_output.device.type, enabled=False):
            # Two calls of the kernel instead of one: the input gradient needs alpha * s(W), the
            # weight gradient only its shape and dtype. Freeing the recomputed copy in between
            # means it never coexists with the weight gradient (same size), so a binary layer
            # peaks no higher than a plain one: AlexNet's FC6 copy alone is 151 MB. Each
            # gradient comes from the same kernel as in the single call, bit for bit (tested).
            if ctx.needs_input_grad[0]:
                binary = _alpha_sign(weight, ctx.per_channel)
                if ctx.compute is not None:
                    binary = binary.to(ctx.compute)
                grad_input = torch.ops.aten.convolution_backward(
                    grad_output, x, binary, None, *conv, [True, False, False])[0]
                del binary
            if ctx.needs_input_grad[1]:
                # a stand-in of the weight's shape and the compute dtype, no copy (as
                # torch.nn.grad.conv2d_weight does): the kernel reads only its shape
                shaped = grad_output.new_empty(1).expand(weight.shape)
                grad_binary = torch.ops.aten.convolution_backward(
                    grad_output, x, shaped, None, *conv, [False, True, False])[1]
        if grad_input is not None:  # through autocast's cast of the input, to its dtype
            grad_input = grad_input.to(ctx.input_dtype)
        # straight through alpha * s(.) to the latent weight, in its own dtype (autocast's cast)
        grad_weight = None if grad_binary is None else grad_binary.to(weight.dtype)
        return grad_input, grad_weight, None, None, None, None, None


def binary_conv2d(x: torch.Tensor, weight: torch.Tensor, per_channel: bool = False, stride=1,
                  padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, binarize_weight(weight, per_channel), ...)``, bit for bit, without keeping
    the binarized weight for backward. Outside autograd (no gradient needed, or under a
    ``torch.func`` transform such as the mismatch analysis's vmap) it is exactly that composite."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) \
            or torch._C._are_functorch_transforms_active():
        return torch.nn.functional.conv2d(x, binarize_weight(weight, per_channel), None, stride,
                                          padding, dilation, groups)
    return _BinaryConv2d.apply(x, weight, bool(per_channel), stride, padding, dilation, groups)


def levels_for_bits(bits: int) -> int:
    """Number of non-zero levels of a k-bit unsigned quantizer: 2^k - 1."""
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"activation bits must be an integer >= 1, got {bits!r}")
    return 2**bits - 1
