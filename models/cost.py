"""Model size and FLOPs by the paper's counting rules (docs/method.md §5).

- MACs of a conv = Cin * Cout * kh * kw * Hout * Wout (per group), of a linear layer in * out,
  measured on the model as built (so decoupled layers count their doubled inputs).
- FLOPs = MACs of full-precision layers + MACs of binary-weight layers / 64. BN, pooling and
  additions are ignored.
- Size = binary weights x 1 bit + every full-precision parameter (BN gamma and beta and the
  classifier bias included) x 32 bits; 1 Mbit = 10^6 bits. ``mbit_weights_only`` leaves BN out.

A layer counts as binary when its weights are binarized (``QConv2d.weight_bits == 1``); its inputs
are then quantized activations by construction (ternary in a coupled model, which is never deployed;
its numbers say what the same shapes would cost binary).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import QConv2d

FP_BITS = 32
#: The paper's rule: 64 binary MACs (XNOR + popcount) per FLOP.
BINARY_MACS_PER_FLOP = 64


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    shape: str
    output: str
    weight_bits: int
    params: int
    macs: int

    @property
    def bits(self) -> int:
        return self.params * self.weight_bits


@dataclass(frozen=True)
class CostReport:
    model: str
    variant: str
    input_shape: tuple[int, int, int]
    layers: list[LayerCost] = field(default_factory=list)

    def _sum(self, attribute: str, *, bits: int | None = None, kind: str | None = None,
             exclude_kind: str | None = None) -> int:
        return sum(getattr(layer, attribute) for layer in self.layers
                   if (bits is None or layer.weight_bits == bits)
                   and (kind is None or layer.kind == kind)
                   and (exclude_kind is None or layer.kind != exclude_kind))

    @property
    def binary_params(self) -> int:
        return self._sum("params", bits=1)

    @property
    def fp_params(self) -> int:
        return self._sum("params", bits=FP_BITS)

    @property
    def binary_macs(self) -> int:
        return self._sum("macs", bits=1)

    @property
    def fp_macs(self) -> int:
        return self._sum("macs", bits=FP_BITS)

    @property
    def flops(self) -> float:
        return self.fp_macs + self.binary_macs / BINARY_MACS_PER_FLOP

    @property
    def mbit(self) -> float:
        return self._sum("bits") / 1e6

    @property
    def mbit_weights_only(self) -> float:
        return self._sum("bits", exclude_kind="bn") / 1e6

    @property
    def fp32_mbit(self) -> float:
        """Size of the same parameters all stored in float32."""
        return (self.binary_params + self.fp_params) * FP_BITS / 1e6

    @property
    def compression(self) -> float:
        return self.fp32_mbit / self.mbit

    def totals(self) -> dict[str, float | int]:
        return {
            "mbit": self.mbit,
            "mbit_weights_only": self.mbit_weights_only,
            "flops": self.flops,
            "binary_macs": self.binary_macs,
            "fp_macs": self.fp_macs,
            "binary_params": self.binary_params,
            "fp_params": self.fp_params,
            "fp32_mbit": self.fp32_mbit,
            "compression": self.compression,
        }

    def to_dict(self) -> dict:
        return {"model": self.model, "variant": self.variant,
                "input_shape": list(self.input_shape), **self.totals(),
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    def format_table(self) -> str:
        header = f"{'layer':<28} {'type':<7} {'shape':<24} {'output':<9} {'bits':>4} " \
                 f"{'params':>11} {'MACs':>14}"
        lines = [f"{self.model} ({self.variant}), input {'x'.join(map(str, self.input_shape))}",
                 header, "-" * len(header)]
        for layer in self.layers:
            lines.append(f"{layer.name:<28} {layer.kind:<7} {layer.shape:<24} {layer.output:<9} "
                         f"{layer.weight_bits:>4} {layer.params:>11,} {layer.macs:>14,}")
        lines.append("-" * len(header))
        lines.append(f"size {self.mbit:.2f} Mbit ({self.mbit_weights_only:.2f} without BN; "
                     f"FP32 {self.fp32_mbit:.1f} Mbit, {self.compression:.1f}x smaller) | "
                     f"FLOPs {self.flops / 1e6:.2f} M = FP MACs {self.fp_macs / 1e6:.2f} M + "
                     f"binary MACs {self.binary_macs / 1e6:.2f} M / {BINARY_MACS_PER_FLOP}")
        return "\n".join(lines)


def _weight_bits(module: nn.Module) -> int:
    return module.weight_bits if isinstance(module, QConv2d) else FP_BITS


def _layer_cost(name: str, module: nn.Module, output: torch.Tensor) -> list[LayerCost] | None:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        out_h, out_w = output.shape[-2:]
        macs = (module.in_channels // module.groups) * module.out_channels * kh * kw * out_h * out_w
        bits = _weight_bits(module)
        params = module.weight.numel()
        layers = [LayerCost(name, "conv", f"{module.in_channels}->{module.out_channels} "
                            f"{kh}x{kw}/{module.stride[0]}", f"{out_h}x{out_w}", bits, params, macs)]
        if module.bias is not None:
            layers.append(LayerCost(f"{name}.bias", "bias", f"{module.out_channels}", "",
                                    FP_BITS, module.bias.numel(), 0))
        return layers
    if isinstance(module, nn.Linear):
        layers = [LayerCost(name, "linear", f"{module.in_features}->{module.out_features}", "1x1",
                            FP_BITS, module.weight.numel(), module.in_features * module.out_features)]
        if module.bias is not None:
            layers.append(LayerCost(f"{name}.bias", "bias", f"{module.out_features}", "",
                                    FP_BITS, module.bias.numel(), 0))
        return layers
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return [LayerCost(name, "bn", f"{module.num_features}", "", FP_BITS,
                          module.weight.numel() + module.bias.numel(), 0)]
    return None


@torch.no_grad()
def cost_report(model: nn.Module) -> CostReport:
    """Per-layer parameters, weight bits and MACs of ``model`` (built by the registry)."""
    config = model.config
    shape = (config.in_channels, config.input_size, config.input_size)
    found: list[LayerCost] = []
    hooks = []
    for name, module in model.named_modules():
        def hook(mod, _inputs, output, name=name):
            costs = _layer_cost(name, mod, output)
            if costs:
                found.extend(costs)
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    reference = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, *shape, device=reference.device, dtype=reference.dtype))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    counted = {layer.name for layer in found}
    for name, parameter in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in counted and f"{owner}.bias" not in counted:
            raise RuntimeError(f"cost_report: parameter {name} belongs to no counted layer")
    return CostReport(config.name, config.variant, shape, found)
