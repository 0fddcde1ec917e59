"""Gradient mismatch: the STE ("coarse") gradient against the coordinate discrete gradient (CDG).

docs/method.md §7. For a sampled set of coordinates ``i`` of one layer's weight tensor ``w``::

    CDG_i = [L(w + delta e_i) - L(w - delta e_i)] / (2 delta)

on one fixed batch with BN in eval mode (running statistics: every forward is the same function of
the weights, and samples do not interact, so batch halves are independent estimates). ``L`` is the
mean cross-entropy (the training loss without weight decay). ``delta`` is chosen large enough to
cross activation thresholds, so CDG is the gradient of a loss smoothed over a window of width
``2 delta``; the STE gradient is what autograd returns through the quantizers' straight-through
backward (clipped identity, ApproxSign or SwishSign shape). Their cosine similarity over the sampled
coordinates is the gradient-mismatch measure; 1 means the STE points where the smoothed loss falls.

Everything here is a pure function of (model, batch, coordinates, delta):

- :func:`ste_gradients`: autograd gradients of the mean loss (full batch and both halves);
- :func:`loss_differences_naive`: ``L_b(w + delta e_i) - L_b(w - delta e_i)`` per sample ``b``, one
  forward pass per coordinate and sign on the model as is (the literal definition; the reference);
- :func:`loss_differences_batched`: the same numbers with every +-delta perturbation of a chunk
  evaluated in one vectorised pass (``torch.func.vmap`` over the perturbations). Two things make it
  fast: (1) a weight coordinate perturbs the layer output *linearly*,
  ``conv(x, W + d e_i) = conv(x, W) + d conv(x, e_i)``, and ``conv(x, e_i)`` is one column of the
  layer's unfolded input placed in one output channel, so no perturbed weight tensor or grouped conv
  is formed; (2) under vmap everything before the perturbed layer is unbatched, so it is computed
  once per chunk, and only the layers after it run on the (perturbations x batch) stack (residual
  shortcuts from before the layer broadcast). The quantizers' autograd Functions cannot run under
  vmap, so the batched pass uses a forward-only copy of the model (:func:`forward_only_copy`) whose
  staircase is bit-identical to ``quantize_activation``'s forward (tested). Float rounding of the
  linear form differs from the perturbed conv in the last bits, so the two estimators agree to
  float64 rounding (tested at 1e-9), not bit for bit.
- :func:`cosine`, :func:`layer_mismatch`: the summary numbers, with the estimate's own noise.

Only full-precision weights are analysed (the authors' CIFAR VGG-7 keeps weights FP,
docs/method.md §4): with ``alpha * sign(W)`` a +-delta step on a latent weight changes the forward only through a sign
flip or through alpha, so CDG with respect to latent binary weights is not the quantity the paper
measures. :func:`weight_layers` refuses binary-weight layers.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from binaryduo.models.layers import ActQuant, QConv2d

__all__ = [
    "WeightLayer", "weight_layers", "sample_coordinates", "forward_only_copy", "staircase",
    "ste_gradients", "loss_differences_naive", "loss_differences_batched", "cosine",
    "LayerMismatch", "layer_mismatch",
]


# --------------------------------------------------------------------------------------------
# Layers and coordinates
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightLayer:
    """A conv or linear layer whose weight coordinates are perturbed."""

    name: str          # module name, e.g. ``features.conv3.conv``
    shape: tuple[int, ...]

    @property
    def param(self) -> str:
        return f"{self.name}.weight"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    """Conv2d / Linear layers of ``model`` in module order; binary-weight layers are refused."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(module, QConv2d) and module.weight_bits != 32:
            raise ValueError(
                f"layer {name!r} has binary weights: the gradient-mismatch analysis measures FP "
                "weights (the authors' VGG-7 setting); build the model with weight_bits=32")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str)):
            raise ValueError(f"layer {name!r}: only ungrouped, zero-padded convs are supported")
        layers.append(WeightLayer(name, tuple(module.weight.shape)))
    return layers


def sample_coordinates(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``min(count, numel)`` distinct flat indices of a weight tensor, in random order."""
    return torch.randperm(numel, generator=generator)[:min(count, numel)]


# --------------------------------------------------------------------------------------------
# Forward-only staircase (vmap-compatible)
# --------------------------------------------------------------------------------------------
def staircase(y: torch.Tensor, levels: int) -> torch.Tensor:
    """``floor(levels * clip(y, 0, 1) + 1/2) / levels`` with plain tensor ops (vmap-compatible).

    The same evaluation as ``models.quantizers``' forward: comparisons for binary and ternary
    (exact thresholds, ties up), the float64 formula for k bits.
    """
    if levels == 1:
        return (y >= 0.5).to(y.dtype)
    if levels == 2:
        return ((y >= 0.25).to(y.dtype) + (y >= 0.75).to(y.dtype)) * 0.5
    wide = y.to(torch.float64)
    return (torch.floor(wide.clamp(0.0, 1.0) * levels + 0.5) / levels).to(y.dtype)


class _Staircase(nn.Module):
    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return staircase(y, self.levels)


def forward_only_copy(model: nn.Module) -> nn.Module:
    """A deep copy, in eval mode, whose activation quantizers are plain-op staircases."""
    clone = copy.deepcopy(model).eval()
    for module in list(clone.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ActQuant) and child.levels is not None:
                setattr(module, child_name, _Staircase(child.levels))
    return clone


# --------------------------------------------------------------------------------------------
# The two gradients
# --------------------------------------------------------------------------------------------
def _per_sample_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels, reduction="none")


def ste_gradients(model: nn.Module, params: Sequence[str], images: torch.Tensor,
                  labels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Flat autograd (STE) gradients of the mean loss for each parameter name, BN in eval mode.

    Returns ``{param: [full batch, first half, second half]}``.
    """
    model.eval()
    named = dict(model.named_parameters())
    tensors = [named[p] for p in params]
    half = images.shape[0] // 2
    parts = [slice(None), slice(0, half), slice(half, None)]
    out: dict[str, list[torch.Tensor]] = {p: [] for p in params}
    with torch.enable_grad():
        for part in parts:
            loss = _per_sample_loss(model, images[part], labels[part]).mean()
            grads = torch.autograd.grad(loss, tensors)
            for p, g in zip(params, grads):
                out[p].append(g.detach().flatten().clone())
    return out


@torch.no_grad()
def loss_differences_naive(model: nn.Module, layer: WeightLayer, coordinates: torch.Tensor,
                           delta: float, images: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """``(N, B)``: ``L_b(w + delta e_i) - L_b(w - delta e_i)``, one forward per coordinate and sign.

    The literal definition on the model as given (its own quantizer Functions); the weight is
    restored exactly after each coordinate.
    """
    model.eval()
    flat = model.get_parameter(layer.param).view(-1)
    rows = []
    for index in coordinates.tolist():
        original = flat[index].clone()
        flat[index] = original + delta
        plus = _per_sample_loss(model, images, labels)
        flat[index] = original - delta
        minus = _per_sample_loss(model, images, labels)
        flat[index] = original
        rows.append(plus - minus)
    return torch.stack(rows)


def _output_perturbation(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor,
                         out_index: torch.Tensor, in_index: torch.Tensor,
                         step: torch.Tensor) -> torch.Tensor:
    """``step * (d output / d W[out_index, in_index])`` for one (batched) coordinate: the input
    column that weight multiplies, placed in output channel ``out_index``."""
    channels = torch.arange(output.shape[1], device=output.device)
    mask = (channels == out_index).to(output.dtype)                     # (C_out,)
    if isinstance(module, nn.Conv2d):
        columns = F.unfold(inputs, module.kernel_size, module.dilation, module.padding,
                           module.stride)                                 # (B, C_in*k*k, L)
        column = columns.index_select(1, in_index.reshape(1))            # (B, 1, L)
        delta = (mask.view(1, -1, 1) * column).view(output.shape)
    else:
        column = inputs.index_select(1, in_index.reshape(1))             # (B, 1)
        delta = mask.view(1, -1) * column
    return output + step * delta


@torch.no_grad()
def loss_differences_batched(model: nn.Module, layer: WeightLayer, coordinates: torch.Tensor,
                             delta: float, images: torch.Tensor, labels: torch.Tensor, *,
                             chunk_size: int | None = None,
                             forward_model: nn.Module | None = None) -> torch.Tensor:
    """The same ``(N, B)`` matrix as :func:`loss_differences_naive`, vectorised (see the module
    docstring). ``chunk_size`` perturbations (of the 2N) run per vmap call (None: automatic, see
    :func:`_auto_chunk`); ``forward_model`` reuses a :func:`forward_only_copy`."""
    from torch.func import vmap

    pure = forward_model if forward_model is not None else forward_only_copy(model)
    module = pure.get_submodule(layer.name)
    fan_in = layer.numel // layer.shape[0]
    count = coordinates.numel()
    out_index = (coordinates // fan_in).repeat(2)
    in_index = (coordinates % fan_in).repeat(2)
    dtype = images.dtype
    steps = torch.cat([torch.full((count,), delta, dtype=dtype),
                       torch.full((count,), -delta, dtype=dtype)]).to(images.device)
    current: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        return _output_perturbation(mod, args[0], output, current["out"], current["in"],
                                    current["step"])

    def losses(out_i, in_i, step):
        current.update({"out": out_i, "in": in_i, "step": step})
        return _per_sample_loss(pure, images, labels)

    if chunk_size is None:
        chunk_size = _auto_chunk(pure, module, images)
    indices = (out_index.to(images.device), in_index.to(images.device), steps)
    chain = _chain_losses(pure, layer, images, labels)
    if chain is not None:
        per_sample = vmap(chain, chunk_size=chunk_size)(*indices)
        return per_sample[:count] - per_sample[count:]
    handle = module.register_forward_hook(hook)
    try:
        per_sample = vmap(losses, chunk_size=chunk_size)(*indices)
    finally:
        handle.remove()
    return per_sample[:count] - per_sample[count:]


#: Modules through which a change in one channel stays in that channel (eval mode).
_CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d, nn.ReLU, nn.Hardtanh, nn.Dropout,
                ActQuant, _Staircase)


def _chain_losses(pure: nn.Module, layer: WeightLayer, images: torch.Tensor,
                  labels: torch.Tensor):
    """A sparser per-perturbation forward for the feed-forward chains (VGG-7, AlexNet), or None.

    A coordinate of block i's conv changes one output channel ``co``; pooling, BN (eval) and the
    activation act channel by channel, so only channel ``co`` of the next conv's input changes
    and the next conv's output is ``base + conv(change, W_next[:, co])``, a one-input-channel
    conv. The perturbed block is therefore evaluated on channel ``co`` alone, the next conv on
    the change alone, and only the layers after it at full width. Decoupled blocks
    (``Replicate``) and any other structure take the general path.
    """
    from binaryduo.models.chain import ChainNet

    if not isinstance(pure, ChainNet):
        return None
    names = list(pure.features._modules)
    block_name = layer.name.removeprefix("features.").removesuffix(".conv")
    if layer.name != f"features.{block_name}.conv" or block_name not in names:
        return None
    index = names.index(block_name)
    block = pure.features[index]
    parts = list(block._modules.items())[1:]
    if not all(isinstance(m, _CHANNELWISE) for _, m in parts):
        return None
    if index + 1 < len(names):
        following = pure.features[index + 1]
        next_conv, rest = following.conv, list(following._modules.values())[1:]
        later = [pure.features[k] for k in range(index + 2, len(names))]
    else:
        next_conv, rest, later = pure.classifier, [], []
    if not isinstance(next_conv, nn.Conv2d) or next_conv.groups != 1:
        return None

    captured: dict[str, torch.Tensor] = {}
    hooks = [block.conv.register_forward_hook(
                 lambda m, a, out: captured.update(x=a[0], z=out)),
             next_conv.register_forward_hook(
                 lambda m, a, out: captured.update(a=a[0], n=out))]
    try:
        pure(images)
    finally:
        for hook in hooks:
            hook.remove()
    conv = block.conv
    columns = F.unfold(captured["x"], conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    z, base_in, base_out = captured["z"], captured["a"], captured["n"]
    next_weight = next_conv.quantized_weight() if isinstance(next_conv, QConv2d) \
        else next_conv.weight

    def losses(out_i, in_i, step):
        channel = out_i.reshape(1)
        t = z.index_select(1, channel) + step * columns.index_select(1, in_i.reshape(1)).view(
            z.shape[0], 1, *z.shape[2:])
        for _, part in parts:
            if isinstance(part, nn.BatchNorm2d):
                t = F.batch_norm(t, part.running_mean.index_select(0, channel),
                                 part.running_var.index_select(0, channel),
                                 part.weight.index_select(0, channel),
                                 part.bias.index_select(0, channel), False, 0.0, part.eps)
            elif not isinstance(part, nn.Dropout):  # eval: dropout is the identity
                t = part(t)
        change = F.unfold(t - base_in.index_select(1, channel), next_conv.kernel_size,
                          next_conv.dilation, next_conv.padding, next_conv.stride)
        # (C_out, k*k) @ (B, k*k, L): a batched matmul under vmap (a K-group conv is slower)
        weight = next_weight.index_select(1, channel).reshape(next_weight.shape[0], -1)
        out = base_out + (weight @ change).view(base_out.shape)
        for module in rest:
            if not isinstance(module, nn.Dropout):
                out = module(out)
        for module in later:
            out = module(out)
        if later or rest:
            out = pure.classifier(out)
        return F.cross_entropy(out.flatten(1), labels, reduction="none")

    return losses


def _auto_chunk(model: nn.Module, module: nn.Module, images: torch.Tensor,
                budget_bytes: int = 128 * 2**20) -> int:
    """Perturbations per vmap call: about ``budget_bytes`` of stacked layer output, at least 4.

    Each call recomputes the layers before the perturbed one once, so tiny chunks waste that
    (and vmap's per-call overhead: chunks of 1 were several times slower than the naive loop);
    large ones run memory-bound ops (max-pooling, BN, the staircase) on tensors far beyond the
    caches, which on 2 CPU cores was slower per sample than the naive loop's small batches.
    Measured on VGG-7 at half width: 4-16 perturbations per call were best.
    """
    seen: dict[str, int] = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.update(n=out.numel()))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        handle.remove()
    per_perturbation = seen["n"] * images.shape[0] * images.element_size()
    return max(4, min(256, budget_bytes // max(1, per_perturbation)))


# --------------------------------------------------------------------------------------------
# Summary numbers
# --------------------------------------------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity in float64; NaN when either vector is zero (e.g. no threshold crossed)."""
    a, b = a.double(), b.double()
    norm = a.norm() * b.norm()
    if norm == 0:
        return float("nan")
    return float(a @ b / norm)


@dataclass(frozen=True)
class LayerMismatch:
    """One layer, one activation type, one STE shape; CDG noise indicators alongside.

    - ``cosine``: STE gradient vs CDG over all sampled coordinates, full batch;
    - ``cosine_coordinate_halves``: the same on two disjoint halves of the coordinate sample;
    - ``cosine_batch_halves``: STE gradient vs CDG, both on batch half A, and both on half B;
    - ``cdg_batch_agreement``: cosine between the CDG of half A and of half B (1 = the estimate is
      reproducible on independent data; the STE's own agreement is ``ste_batch_agreement``);
    - ``crossed``: fraction of sampled coordinates whose CDG is not exactly 0 (a threshold crossed
      somewhere in the batch, for quantized activations).
    """

    activation: str
    ste: str
    layer: str
    delta: float
    coordinates: int
    crossed: float
    cosine: float
    cosine_coordinate_halves: tuple[float, float]
    cosine_batch_halves: tuple[float, float]
    cdg_batch_agreement: float
    ste_batch_agreement: float
    cdg_rms: float
    ste_rms: float

    @property
    def spread(self) -> float:
        """max - min over the four split estimates: a rough size of the noise on ``cosine``."""
        values = [*self.cosine_coordinate_halves, *self.cosine_batch_halves]
        if any(math.isnan(v) for v in values):
            return float("nan")
        return max(values) - min(values)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["cosine_coordinate_halves"] = list(self.cosine_coordinate_halves)
        out["cosine_batch_halves"] = list(self.cosine_batch_halves)
        out["spread"] = self.spread
        return out


def layer_mismatch(*, activation: str, ste: str, layer: WeightLayer, coordinates: torch.Tensor,
                   differences: torch.Tensor, delta: float,
                   gradients: Sequence[torch.Tensor]) -> LayerMismatch:
    """Summary of one layer from its per-sample loss differences ``(N, B)`` and its STE gradients
    ``[full, half A, half B]`` (flat, as :func:`ste_gradients` returns them)."""
    batch = differences.shape[1]
    half = batch // 2
    cdg = differences.double().mean(dim=1) / (2 * delta)
    cdg_a = differences[:, :half].double().mean(dim=1) / (2 * delta)
    cdg_b = differences[:, half:].double().mean(dim=1) / (2 * delta)
    full, grad_a, grad_b = (g[coordinates].double() for g in gradients)
    n = coordinates.numel()
    first, second = slice(0, n // 2), slice(n // 2, None)
    return LayerMismatch(
        activation=activation, ste=ste, layer=layer.name, delta=float(delta), coordinates=n,
        crossed=float((differences != 0).any(dim=1).double().mean()),
        cosine=cosine(full, cdg),
        cosine_coordinate_halves=(cosine(full[first], cdg[first]),
                                  cosine(full[second], cdg[second])),
        cosine_batch_halves=(cosine(grad_a, cdg_a), cosine(grad_b, cdg_b)),
        cdg_batch_agreement=cosine(cdg_a, cdg_b), ste_batch_agreement=cosine(grad_a, grad_b),
        cdg_rms=float(cdg.pow(2).mean().sqrt()), ste_rms=float(full.pow(2).mean().sqrt()))
