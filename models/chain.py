"""Plain feed-forward BNNs (VGG-7, AlexNet): a chain of Conv -> [MaxPool] -> BN -> activation.

Layer order follows docs/method.md §2: pooling sits *before* BN; the first conv is full precision
but its output still goes through BN and a quantized activation; the penultimate layer ends
BN -> ReLU (full precision); the classifier is a full-precision conv with bias.

In the decoupled variant every block that feeds a quantized activation replicates its conv output
(``[z; z]``), normalises it with a ``DecoupledBatchNorm2d`` of twice the width and applies a binary
activation to both copies; the next conv reads twice as many input channels.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .layers import COPIES, ActQuant, DecoupledBatchNorm2d, Float32BatchNorm2d, QConv2d, Replicate
from .registry import ModelConfig


@dataclass(frozen=True)
class ConvLayer:
    """One layer of a chain: its widths in the baseline and the coupled network, and its shape."""

    name: str
    baseline: int
    coupled: int
    kernel: int
    stride: int = 1
    padding: int = 0
    pool: bool = False
    dropout: bool = False


def make_activation(config: ModelConfig) -> nn.Module:
    """The variant's activation: ReLU for the FP reference, else the configured quantizer."""
    if config.act_levels is None and config.variant == "fp":
        return nn.ReLU()
    return ActQuant(config.act_levels, config.ste, config.swishsign_beta)


class ChainNet(nn.Module):
    """``features`` (named blocks) followed by a 1x1-conv ``classifier`` and a flatten."""

    def __init__(self, config: ModelConfig, layers: list[ConvLayer], *, pool_kernel: int,
                 pool_stride: int, dropout: float = 0.0):
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = config.in_channels
        last = len(layers) - 1
        for index, layer in enumerate(layers):
            out_channels = config.width(layer.baseline, layer.coupled)
            feeds_quantized = index < last  # the penultimate layer ends BN -> ReLU
            replicate = config.decoupled and feeds_quantized
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            if index == 0:
                parts["conv"] = nn.Conv2d(in_channels, out_channels, layer.kernel, layer.stride,
                                          layer.padding, bias=False)
            else:
                copies = COPIES if config.decoupled else 1
                parts["conv"] = QConv2d(
                    in_channels * copies, out_channels, layer.kernel, layer.stride, layer.padding,
                    weight_bits=config.weight_bits, per_channel_scale=config.per_channel_scale,
                    latent_clip=config.latent_clip, input_copies=copies)
            if layer.pool:
                parts["pool"] = nn.MaxPool2d(pool_kernel, pool_stride)
            if replicate:
                parts["replicate"] = Replicate()
                parts["bn"] = DecoupledBatchNorm2d(out_channels * COPIES)
            else:
                parts["bn"] = Float32BatchNorm2d(out_channels)
            parts["act"] = make_activation(config) if feeds_quantized else nn.ReLU()
            if layer.dropout and dropout > 0:
                parts["dropout"] = nn.Dropout(dropout)
            blocks[layer.name] = nn.Sequential(parts)
            in_channels = out_channels
        self.features = nn.Sequential(blocks)
        self.classifier = nn.Conv2d(in_channels, config.num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).flatten(1)
