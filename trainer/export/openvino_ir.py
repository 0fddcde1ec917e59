"""A ``bnn`` or ``decoupled`` binaryduo model as an OpenVINO IR whose binary layers are
BinaryConvolutions (xnor-popcount, 1-bit packed weights).

The algebra. A binary activation is ``a`` in {0, 1}; xnor-popcount reads bit ``a`` as
``x = 2a - 1`` in {-1, +1} and weight bit ``[W >= 0]`` as ``s`` in {-1, +1}; the
BinaryConvolution outputs ``P = sum_k s_k x_k`` over the ``K = Cin*kh*kw`` taps of a window::

  (1) z = alpha sum_k s_k a_k = alpha/2 sum_k s_k (x_k + 1) = alpha/2 (P + S),   S = sum_k s_k
  (2) PyTorch pads with a = 0, which is x = -1: pad_value -1 (bit 0) keeps P and S summing over
      all K taps of every window, so S is one constant per filter. (The CPU plugin's pad_value 0
      drops padded taps from P: S would have to change at the border, and the naive map is wrong.)
  (3) BN(z) = m P + b,  m = gamma alpha / (2 sigma),  b = m S + beta - gamma mu / sigma,  sigma =
      sqrt(var + eps);  [BN(z) >= 1/2] = [P >= t] (m > 0), [P <= t] (m < 0),  t = (1/2 - b) / m

So alpha (per layer or per channel) and the BatchNorm fold into one per-channel FakeQuantize
(levels=2) threshold on an integer count: ``ceil(t) - 1/2``, or ``floor(t) + 1/2`` with the output
levels swapped, computed in float64 and never closer than 1/2 to a count. The binary layers are
thus exact, ties included (``BN(z) == 1/2`` fires, as ``floor(y + 1/2)`` does). A BatchNorm whose
output stays real (ResNet's branch-final BN added to the stream, the penultimate BN before ReLU)
becomes a per-channel Multiply/Add of ``m``, ``b`` on P. Max pooling between conv and BN (VGG-7,
AlexNet) acts on P, as ``P -> z`` is increasing (alpha > 0). Decoupled models replicate P
copy-major ``[P; P]`` and threshold each copy with its own beta.

Full-precision layers (first conv, classifier, ResNet's 1x1 shortcuts, the residual stream) are
float32 Convolution/MatMul/Add; a threshold on a float ``v`` fires at ``v > pred32(ceil32(t))``,
i.e. ``v >= t`` for every float32 ``v`` (0.49999997 for ``t = 1/2``). Those float32 layers are
where the IR can differ from a float64 PyTorch run: an activation whose pre-activation lies
within float32 round-off of its threshold may flip.

Coupled (ternary) models are exported through ``binaryduo.models.decouple``; models with
full-precision weights or activations of more than one bit are refused (``ExportRefused``).
BatchNorm uses its running statistics (eval semantics) and dropout is the identity, whatever the
module's training flag. CPU-plugin specifics (bit order, channel padding): ``ir_graph``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset16 as ops
import torch
from torch import nn

from binaryduo.models.chain import ChainNet
from binaryduo.models.decoupling import decouple
from binaryduo.models.layers import ActQuant, MeanOfCopies, QConv2d, Replicate, ZeroPadChannels
from binaryduo.models.quantizers import weight_scale
from binaryduo.models.resnet import ResidualUnit, ResNet

from . import ir_graph as graph
from .ir_graph import Affine, Bits, ConvGeometry

#: Files ``save_ir`` writes.
IR_XML, IR_BIN = "model.xml", "model.bin"


class ExportRefused(ValueError):
    """The model has no exact BinaryConvolution form (the message says why, in one line)."""


@dataclass(frozen=True)
class LayerRecord:
    """One exported convolution or fully-connected layer."""

    name: str
    kind: str  # "binary" (BinaryConvolution) or "float" (Convolution / MatMul)
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    #: binary layers: input channels as packed (rounded up to a multiple of 8 with zero channels)
    packed_in_channels: int | None = None


@dataclass
class ExportSummary:
    """What ``to_openvino`` built: the model and variant given and exported (a coupled model is
    exported as its decoupling), the IR's input and output shapes, every conv / linear layer."""

    model: str
    variant: str
    exported_variant: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    layers: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def binary_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kind == "binary"]

    @property
    def binary_convolutions(self) -> int:
        return len(self.binary_layers)

    @property
    def float_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kind == "float"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["binary_convolutions"] = self.binary_convolutions
        out["float_layers"] = self.float_layers
        return out


def _levels_in_words(levels: int | None) -> str:
    if levels is None:
        return "full-precision"
    bits = math.log2(levels + 1)
    return f"{levels + 1}-level ({bits:g}-bit)" if bits.is_integer() else f"{levels + 1}-level"


def exportable_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The binary network to export (``model`` itself, or its decoupling if coupled) and notes;
    raises ``ExportRefused`` with a one-line reason for a model that has no binary form."""
    config = getattr(model, "config", None)
    if config is None:
        raise ExportRefused(f"a {type(model).__name__} without .config was not built by "
                            "binaryduo.models.build; export cannot tell its variant")
    label = f"{config.name} ({config.variant})"
    if config.weight_bits != 1:
        raise ExportRefused(f"{label} has weight_bits={config.weight_bits}: full-precision weights "
                            "have no 1-bit BinaryConvolution form (export needs weight_bits 1)")
    if config.variant == "coupled":
        if config.act_levels != 2:
            raise ExportRefused(f"{label} has {_levels_in_words(config.act_levels)} activations: "
                                "only ternary coupled models decouple into binary ones")
        return decouple(model), ["coupled ternary model exported as its decoupled binary "
                                 "equivalent (binaryduo.models.decouple)"]
    if config.act_levels != 1:
        raise ExportRefused(f"{label} has {_levels_in_words(config.act_levels)} activations: "
                            "BinaryConvolution needs 1-bit {0, 1} activations")
    return model, []


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _batchnorm_affine(module: nn.modules.batchnorm._BatchNorm, name: str):
    """(m, b) with BN(z) = m z + b under the running statistics, in float64."""
    if module.running_mean is None or module.running_var is None:
        raise ExportRefused(f"{name}: BatchNorm without running statistics has no inference form")
    inverse_std = 1.0 / np.sqrt(_numpy(module.running_var) + module.eps)
    gamma = _numpy(module.weight) if module.affine else 1.0
    beta = _numpy(module.bias) if module.affine else 0.0
    scale = gamma * inverse_std
    return scale, beta - scale * _numpy(module.running_mean)


class _Exporter:
    """Builds the graph by following each architecture's eval forward, module by module."""

    def __init__(self, summary: ExportSummary):
        self.summary = summary

    # ---- containers, mirroring the forward methods of ChainNet, ResNet and ResidualUnit
    def network(self, model: nn.Module, tensor: Affine):
        if isinstance(model, ChainNet):
            tensor = self.sequence(model.features, tensor, "features")
            tensor = self.module(model.classifier, tensor, "classifier")
            return self.module(nn.Flatten(1), tensor, "flatten")
        if isinstance(model, ResNet):
            tensor = self.sequence(model.stem, tensor, "stem")
            tensor = self.sequence(model.units, tensor, "units")
            tensor = self.sequence(model.head, tensor, "head")
            return self.module(model.classifier, tensor, "classifier")
        raise ExportRefused(f"no export mapping for a {type(model).__name__} network")

    def sequence(self, container: nn.Module, tensor, prefix: str):
        for child_name, child in container.named_children():
            tensor = self.module(child, tensor, f"{prefix}.{child_name}")
        return tensor

    def residual(self, unit: ResidualUnit, tensor, name: str):
        branch = self.sequence(unit.branch, tensor, f"{name}.branch")
        shortcut = self.sequence(unit.shortcut, tensor, f"{name}.shortcut")
        total = ops.add(self.real(branch, f"{name}.branch"),
                        self.real(shortcut, f"{name}.shortcut"), name=f"{name}.add")
        return Affine.identity(total.output(0))

    # ---- leaves
    def module(self, module: nn.Module, tensor, name: str):
        if isinstance(module, nn.Sequential):
            return self.sequence(module, tensor, name)
        if isinstance(module, ResidualUnit):
            return self.residual(module, tensor, name)
        if isinstance(module, nn.Conv2d):
            return self.conv(module, tensor, name)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.affine(tensor, name).then(*_batchnorm_affine(module, name))
        if isinstance(module, ActQuant):
            if module.levels != 1:
                raise ExportRefused(f"{name}: {_levels_in_words(module.levels)} activation has no "
                                    "BinaryConvolution form")
            return graph.binarize(self.affine(tensor, name), name)
        if isinstance(module, nn.ReLU):
            return Affine.identity(ops.relu(self.real(tensor, name), name=name).output(0))
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return tensor  # eval semantics
        if isinstance(module, nn.MaxPool2d):
            if module.ceil_mode or module.return_indices or _pair(module.dilation) != (1, 1):
                raise ExportRefused(f"{name}: max pooling with ceil_mode, indices or dilation")
            return graph.max_pool(self.affine(tensor, name), _pair(module.kernel_size),
                                  _pair(module.stride), _pair(module.padding), name)
        if isinstance(module, nn.AvgPool2d):
            if module.ceil_mode or module.divisor_override is not None:
                raise ExportRefused(f"{name}: average pooling with ceil_mode or divisor_override")
            return Affine.identity(graph.avg_pool(
                self.real(tensor, name), _pair(module.kernel_size), _pair(module.stride),
                _pair(module.padding), module.count_include_pad, name))
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise ExportRefused(f"{name}: adaptive average pooling to {module.output_size}")
            return Affine.identity(ops.reduce_mean(self.real(tensor, name), np.array([2, 3]),
                                                   keep_dims=True, name=name).output(0))
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ExportRefused(f"{name}: flatten other than from dimension 1")
            return Affine.identity(ops.reshape(self.real(tensor, name), np.array([0, -1]),
                                               special_zero=True, name=name).output(0))
        if isinstance(module, nn.Linear):
            return Affine.identity(self.linear(module, tensor, name))
        if isinstance(module, Replicate):
            return graph.replicate(self.affine(tensor, name), module.copies, name)
        if isinstance(module, MeanOfCopies):
            return Affine.identity(graph.mean_of_copies(self.real(tensor, name), module.copies,
                                                        name))
        if isinstance(module, ZeroPadChannels):
            return Affine.identity(graph.zero_pad_channels(self.real(tensor, name),
                                                           module.out_channels, name))
        raise ExportRefused(f"{name}: no export mapping for {type(module).__name__}")

    def conv(self, module: nn.Conv2d, tensor, name: str):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ExportRefused(f"{name}: grouped, non-zero-padded or 'same'-padded convolution")
        geometry = ConvGeometry(_pair(module.stride), _pair(module.padding), _pair(module.dilation))
        binary = isinstance(module, QConv2d) and module.weight_bits == 1
        if binary != isinstance(tensor, Bits):
            raise ExportRefused(f"{name}: a {'binary' if binary else 'float'}-weight convolution "
                                f"reading {'a binary' if isinstance(tensor, Bits) else 'a real'} "
                                "input has no BinaryConvolution form")
        if isinstance(module, QConv2d) and module.weight_bits != 1:
            raise ExportRefused(f"{name}: weight_bits={module.weight_bits} convolution")
        self.summary.layers.append(LayerRecord(
            name, "binary" if binary else "float", module.in_channels, module.out_channels,
            _pair(module.kernel_size), geometry.stride, geometry.padding,
            tensor.padded_channels if binary else None))
        if binary:
            # alpha as the model computes it (binaryduo.models.quantizers), in float64
            alpha = _numpy(weight_scale(module.weight.detach().to(torch.float64),
                                        module.per_channel_scale))
            return graph.binary_conv(tensor, _numpy(module.weight),
                                     np.broadcast_to(alpha.reshape(-1), (module.out_channels,)),
                                     geometry, name)
        bias = None if module.bias is None else _numpy(module.bias)
        return Affine.identity(graph.float_conv(self.real(tensor, name), _numpy(module.weight),
                                                bias, geometry, name))

    def linear(self, module: nn.Linear, tensor, name: str) -> ov.Output:
        self.summary.layers.append(LayerRecord(name, "float", module.in_features,
                                               module.out_features, (), (), ()))
        weight = ops.constant(_numpy(module.weight).astype(np.float32))
        out = ops.matmul(self.real(tensor, name), weight, False, True, name=name).output(0)
        if module.bias is not None:
            out = ops.add(out, ops.constant(_numpy(module.bias).astype(np.float32)),
                          name=f"{name}.bias").output(0)
        return out

    # ---- tensor kinds
    @staticmethod
    def affine(tensor, name: str) -> Affine:
        if isinstance(tensor, Bits):
            raise ExportRefused(f"{name}: reads a binary activation where a real tensor is needed")
        return tensor

    def real(self, tensor, name: str) -> ov.Output:
        return graph.materialize(self.affine(tensor, name), f"{name}.input")


def to_openvino(model: nn.Module, input_shape) -> tuple[ov.Model, ExportSummary]:
    """The OpenVINO model of ``model``'s eval forward on float32 inputs of ``input_shape``
    (``(N, C, H, W)``, or ``(C, H, W)`` for N = 1; shapes are static, as the CPU plugin's
    BinaryConvolution requires), and a summary of what became binary and what stayed float.
    Raises ``ExportRefused`` for a model without an exact binary form."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (N, C, H, W) or (C, H, W), got {tuple(input_shape)}")
    binary, notes = exportable_model(model)
    config = binary.config
    if shape[1] != config.in_channels:
        raise ValueError(f"input_shape has {shape[1]} channels; {config.name} takes "
                         f"{config.in_channels}")
    summary = ExportSummary(config.name, model.config.variant, config.variant, shape, (),
                            notes=notes)
    images = ops.parameter(list(shape), np.float32, name="images")
    with torch.no_grad():
        out = _Exporter(summary).network(binary, Affine.identity(images.output(0)))
    result = ops.result(graph.materialize(out, "logits"), name="logits")
    ir = ov.Model([result], [images], f"binaryduo-{config.name}-{config.variant}")
    ir.output(0).get_tensor().set_names({"logits"})
    ir.input(0).get_tensor().set_names({"images"})
    summary.output_shape = tuple(ir.output(0).get_shape())
    return ir, summary


def save_ir(ir: ov.Model, directory: str | Path) -> Path:
    """Writes ``model.xml`` and ``model.bin`` (weights as they are: no fp16 compression) into
    ``directory`` (created if missing); returns the path of ``model.xml``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    xml = directory / IR_XML
    ov.save_model(ir, xml, compress_to_fp16=False)
    return xml


def ir_file_bytes(xml: Path) -> int:
    """The size on disk of a saved IR: ``model.xml`` and the ``.bin`` beside it."""
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
