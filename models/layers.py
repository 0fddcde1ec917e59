"""Building blocks shared by the architectures.

Besides the quantized layers, this module holds the small pieces a *decoupled* network is made of
(docs/method.md §3): ``Replicate`` (copy-major ``[z; z]``), ``DecoupledBatchNorm2d`` (a BN over the
two copies, which remembers the +-1/4 shift that decoupling applies to its beta), ``MeanOfCopies`` and
``ZeroPadChannels`` for ResNet shortcuts. A decoupled skeleton therefore *describes* how every
coupled parameter maps onto it, and ``decouple`` is one generic walk over matching module names.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import (DEFAULT_SWISHSIGN_BETA, STE, binarize_weight, binary_conv2d,
                         quantize_activation)

#: Copies per coupled channel after decoupling: T(y) = 1/2 [B(y - 1/4) + B(y + 1/4)].
COPIES = 2
#: Shift of beta for the two copies of a BN that feeds a ternary activation.
DECOUPLE_SHIFT = 0.25


class ActQuant(nn.Module):
    """Unsigned activation quantizer with ``levels`` steps; ``levels=None`` is full precision.

    Full precision here means ``clip(y, 0, 1)``: the limit of the staircase as levels grow, so the
    gradient-mismatch study compares activation types on one architecture.
    """

    def __init__(self, levels: int | None, ste: STE | str = STE.CLIPPED_IDENTITY,
                 beta: float = DEFAULT_SWISHSIGN_BETA):
        super().__init__()
        self.levels = levels
        self.ste = STE(ste)
        self.beta = float(beta)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.levels is None:
            return F.hardtanh(y, 0.0, 1.0)
        return quantize_activation(y, self.levels, self.ste, self.beta)

    def extra_repr(self) -> str:
        kind = "fp" if self.levels is None else f"levels={self.levels}"
        return f"{kind}, ste={self.ste.value}" + (
            f", beta={self.beta}" if self.ste is STE.SWISHSIGN else "")


class QConv2d(nn.Conv2d):
    """Convolution with optionally binarized weights (alpha * sign(W), alpha = mean|W|).

    ``input_copies`` is decoupling metadata: 2 when this conv reads a decoupled (replicated,
    binary) activation, in which case decoupling duplicates the coupled weights along the input
    axis and halves them. ``latent_clip`` bounds the latent weights (applied by the trainer to the
    fp32 master weights after each step, or by ``clip_latent_weights_``); off by default.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, *, weight_bits: int = 1, per_channel_scale: bool = False,
                 latent_clip: float | None = None, input_copies: int = 1):
        if weight_bits not in (1, 32):
            raise ValueError(f"weight_bits must be 1 or 32, got {weight_bits!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.weight_bits = weight_bits
        self.per_channel_scale = per_channel_scale
        self.latent_clip = latent_clip
        self.input_copies = input_copies

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_bits == 1:
            return binarize_weight(self.weight, self.per_channel_scale)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_bits == 1 and self.padding_mode == "zeros":
            # alpha * sign(W) recomputed in backward instead of kept (memory, see binary_conv2d)
            return binary_conv2d(x, self.weight, self.per_channel_scale, self.stride,
                                 self.padding, self.dilation, self.groups)
        return self._conv_forward(x, self.quantized_weight(), None)

    def extra_repr(self) -> str:
        extra = f", weight_bits={self.weight_bits}"
        if self.weight_bits == 1 and self.per_channel_scale:
            extra += ", per_channel_scale=True"
        if self.latent_clip is not None:
            extra += f", latent_clip={self.latent_clip}"
        if self.input_copies != 1:
            extra += f", input_copies={self.input_copies}"
        return super().extra_repr() + extra


class Replicate(nn.Module):
    """Copy-major channel replication: ``[z; z]`` (cat on dim 1)."""

    def __init__(self, copies: int = COPIES):
        super().__init__()
        self.copies = copies

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z] * self.copies, dim=1)

    def extra_repr(self) -> str:
        return f"copies={self.copies}"


class MeanOfCopies(nn.Module):
    """Inverse of ``Replicate`` for a shifted pair: mean([s - 1/4; s + 1/4]) = s."""

    def __init__(self, copies: int = COPIES):
        super().__init__()
        self.copies = copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (self.copies, -1)).mean(dim=1)

    def extra_repr(self) -> str:
        return f"copies={self.copies}"


class ZeroPadChannels(nn.Module):
    """Zero-pads the channel axis up to ``out_channels`` (the last ResNet block, 360 -> 512)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = self.out_channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, missing))

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}"


class Float32BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises in float32 and returns float32, also under autocast.

    Mixed precision (bf16 autocast) must not reach the pre-activations: the quantizer compares
    them with 1/4, 3/4 (coupled) or 1/2 (decoupled, after BN's beta -+ 1/4), and rounding them to
    bfloat16 first rounds ``y`` and ``y - 1/4`` on different grids (steps of 2^-8 below 3/4 but
    2^-9 below 1/2), so the binary network would no longer fire where the ternary one does
    (docs/method.md, "Precision"). In float32 they agree except within float32 round-off of a
    threshold. Statistics stay float32 too: the parameters and buffers are never cast here.
    A float32 (or float64: a float64 model) input outside autocast takes the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == wide and not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(wide))


class DecoupledBatchNorm2d(Float32BatchNorm2d):
    """BN over ``copies`` copies of C channels (2C features) in a decoupled network.

    ``shift`` is what decoupling adds to beta: copy i of the coupled beta gets
    ``(i - (copies - 1) / 2) * 2 * shift``, i.e. ``[beta - 1/4; beta + 1/4]`` for shift 1/4, and
    ``[beta; beta]`` for shift 0 (a branch-final BN added to an identity shortcut).
    """

    def __init__(self, num_features: int, *, copies: int = COPIES, shift: float = DECOUPLE_SHIFT):
        if num_features % copies:
            raise ValueError(f"{num_features} features do not split into {copies} copies")
        super().__init__(num_features)
        self.copies = copies
        self.shift = shift

    def copy_offsets(self) -> list[float]:
        centre = (self.copies - 1) / 2
        return [(i - centre) * 2 * self.shift for i in range(self.copies)]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", copies={self.copies}, shift={self.shift}"


def latent_clipped_parameters(model: nn.Module) -> Iterator[tuple[nn.Parameter, float]]:
    """(latent weight, bound) for every quantized conv that asks for latent clipping."""
    for module in model.modules():
        if isinstance(module, QConv2d) and module.latent_clip is not None:
            yield module.weight, module.latent_clip


@torch.no_grad()
def clip_latent_weights_(model: nn.Module) -> None:
    """Clamps latent weights in place (outside DeepSpeed; under it, clamp the fp32 masters)."""
    for weight, bound in latent_clipped_parameters(model):
        weight.clamp_(-bound, bound)


#: The roles an optimizer can treat differently (``parameter_roles``), in a fixed order.
PARAMETER_ROLES = ("binary_layers", "norm_and_bias", "full_precision")


def parameter_roles(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter of ``model`` under exactly one role, in ``named_parameters``
    order within a role:

    - ``binary_layers``: the weights of the binary-activation layers (:class:`QConv2d`), the
      latent weights that become alpha*sign(W) with ``weight_bits: 1``;
    - ``norm_and_bias``: BatchNorm scales/shifts and every bias (1-D parameters);
    - ``full_precision``: the other weights: first conv, classifier, ResNet 1x1 shortcuts.
    """
    binary = {id(module.weight) for module in model.modules() if isinstance(module, QConv2d)}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in PARAMETER_ROLES}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in binary:
            roles["binary_layers"].append((name, parameter))
        elif parameter.ndim <= 1:
            roles["norm_and_bias"].append((name, parameter))
        else:
            roles["full_precision"].append((name, parameter))
    return roles
