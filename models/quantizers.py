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
binarizer saves nothing.
"""
from __future__ import annotations

from enum import Enum

import torch

__all__ = [
    "STE",
    "quantize_activation",
    "activation_ste_gradient",
    "binarize_weight",
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


class _WeightBinarizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, per_channel: bool):  # noqa: D102 (see binarize_weight)
        # One fresh buffer holds |W| (alpha is its mean, the same reduction as weight_scale), then
        # s(W) in {0, 1} -> {-1, +1}, then alpha * s(W); every step is exact and vectorized.
        out = torch.empty_like(weight)
        torch.abs(weight, out=out)
        if per_channel:
            alpha = out.mean(dim=tuple(range(1, weight.dim())), keepdim=True)
        else:
            alpha = out.mean()
        torch.ge(weight, 0, out=out)  # s(0) = s(-0) = +1
        return out.mul_(2).sub_(1).mul_(alpha)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        # Straight through to the latent weight: no |W| <= 1 gate, no gradient through alpha.
        return grad_output, None


def binarize_weight(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``alpha * s(W)`` with s(0) = +1 and alpha = mean|W| (per layer, or per output channel)."""
    return _WeightBinarizer.apply(weight, bool(per_channel))


def levels_for_bits(bits: int) -> int:
    """Number of non-zero levels of a k-bit unsigned quantizer: 2^k - 1."""
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"activation bits must be an integer >= 1, got {bits!r}")
    return 2**bits - 1
