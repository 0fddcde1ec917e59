"""The fp32 twin of an exported binary network: the same function with float Convolutions of
``alpha * s(W)`` in place of the BinaryConvolutions, reading {0, 1} activations as floats. The
reference a binary IR's speed is measured against (``benchmarks/binary_inference.py``).

The twin follows the exporter's own walk module for module (it subclasses it). Its activations are
GreaterEqual(BN(z), 1/2) -> Convert, not FakeQuantize(levels=2): a FakeQuantize into a float conv
crashes the CPU plugin (``ir_graph``), and with +-1 weights the plugin would rewrite it into a
BinaryConvolution by itself, so the twin would not be float at all.
"""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset16 as ops
import torch
from torch import nn

from binaryduo.models.layers import ActQuant, QConv2d
from binaryduo.models.quantizers import binarize_weight

from . import ir_graph as graph
from .ir_graph import Affine, Bits, ConvGeometry
from .openvino_ir import ExportSummary, LayerRecord, _Exporter, _numpy, _pair, exportable_model


class _Fp32Twin(_Exporter):
    """The exporter's walk (subclassed: the twin must follow it module for module) with float
    layers in place of the binary ones; ``reads``: binary conv name -> the activation node it
    reads. Not FakeQuantize(levels=2) for {0, 1}: into a float conv it crashes the plugin
    (``ir_graph``), and with +-1 weights the plugin would rewrite it into a BinaryConvolution."""

    def module(self, module: nn.Module, tensor, name: str):
        if isinstance(module, ActQuant) and module.levels == 1:
            # {0, 1} as float, 1 where BN(z) >= 1/2, as the binary IR's FakeQuantize
            value = graph.materialize(self.affine(tensor, name), f"{name}.input")
            fired = ops.greater_equal(value, np.float32(0.5), name=f"{name}.ge")
            out = ops.convert(fired, ov.Type.f32, name=name).output(0)
            return Bits(out, tensor.channels, tensor.channels)  # no bit packing: no padding
        return super().module(module, tensor, name)

    def conv(self, module: nn.Module, tensor, name: str):
        if not (isinstance(module, QConv2d) and module.weight_bits == 1):
            return super().conv(module, tensor, name)
        geometry = ConvGeometry(_pair(module.stride), _pair(module.padding), _pair(module.dilation))
        self.summary.layers.append(LayerRecord(name, "float", module.in_channels,
                                               module.out_channels, _pair(module.kernel_size),
                                               geometry.stride, geometry.padding))
        self.reads[name] = tensor.value.get_node().get_friendly_name()
        # alpha * s(W) as the model binarizes it, in float64
        weight = _numpy(binarize_weight(module.weight.detach().to(torch.float64),
                                        module.per_channel_scale))
        return Affine.identity(graph.float_conv(tensor.value, weight, None, geometry, name))


def fp32_twin(model: nn.Module, shape: tuple[int, ...]) -> tuple[ov.Model, dict[str, str]]:
    """``to_openvino``'s construction with ``_Fp32Twin`` as the walker: (the twin IR, binary conv
    name -> the name of the activation node it reads, to find the conv in profiling output)."""
    binary, _ = exportable_model(model)
    config = binary.config
    summary = ExportSummary(config.name, config.variant, config.variant, shape, ())
    images = ops.parameter(list(shape), np.float32, name="images")
    walker = _Fp32Twin(summary)
    walker.reads = {}
    with torch.no_grad():
        out = walker.network(binary, Affine.identity(images.output(0)))
    result = ops.result(graph.materialize(out, "logits"), name="logits")
    return ov.Model([result], [images], f"binaryduo-{config.name}-fp32-twin"), walker.reads
