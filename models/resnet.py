"""ResNet-18 with a real-valued residual stream and pre-activation branches (docs/method.md §2).

Stem: conv7x7/2 (FP) -> BN -> ReLU -> MaxPool 3x3/2 -> an extra BN whose output is the residual
stream. A branch is ``act -> conv3x3 -> BN`` per conv; additions are in full precision and the
stream itself is never quantized. ``resnet18`` puts one shortcut around every two convs,
``resnet18_sc`` one around every conv (Bi-Real style). Downsampling shortcuts are
AvgPool 2x2/2 -> FP 1x1 conv -> BN. In coupled/decoupled models the last conv widens 360 -> 512 and
its shortcut zero-pads the stream.

Decoupled (§3): the stream is two copies ``[s - 1/4; s + 1/4]`` (from the extra BN, duplicated with
the shift). Inside a branch every BN that feeds an activation is duplicated with the shift; a
branch-final BN added to an identity shortcut is duplicated without it; a downsampling shortcut
reads the mean of the copies and replicates its output, and its block's final BN carries the
shift; the last block's shortcut is the mean of the copies, zero-padded, and its BN(512) stays single.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .chain import make_activation
from .layers import (COPIES, DECOUPLE_SHIFT, DecoupledBatchNorm2d, Float32BatchNorm2d, MeanOfCopies,
                     QConv2d, Replicate, ZeroPadChannels)
from .registry import ModelConfig, register

STAGE_BASELINE = (64, 128, 256, 512)
STAGE_COUPLED = (64, 90, 180, 360)
STAGE_STRIDES = (1, 2, 2, 2)
#: Width of the last conv (and the head) in every variant.
FINAL_WIDTH = 512
CONVS_PER_STAGE = 4


@dataclass(frozen=True)
class _Unit:
    """A residual unit: ``widths`` are the outputs of its convs (the first one strided)."""

    in_channels: int
    widths: tuple[int, ...]
    stride: int
    last: bool


class ResidualUnit(nn.Module):
    def __init__(self, config: ModelConfig, unit: _Unit):
        super().__init__()
        decoupled = config.decoupled
        copies = COPIES if decoupled else 1
        out_channels = unit.widths[-1]
        downsample = unit.stride != 1 or (unit.in_channels != out_channels and not unit.last)
        branch: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = unit.in_channels
        for j, width in enumerate(unit.widths, start=1):
            final = j == len(unit.widths)
            branch[f"act{j}"] = make_activation(config)
            branch[f"conv{j}"] = QConv2d(
                in_channels * copies, width, 3, unit.stride if j == 1 else 1, 1,
                weight_bits=config.weight_bits, per_channel_scale=config.per_channel_scale,
                latent_clip=config.latent_clip, input_copies=copies)
            if decoupled and not (final and unit.last):
                # Inner BNs feed an activation and carry the shift; a final BN added to a
                # downsampling shortcut does too; one added to an identity shortcut does not.
                shift = 0.0 if final and not downsample else DECOUPLE_SHIFT
                branch[f"rep{j}"] = Replicate()
                branch[f"bn{j}"] = DecoupledBatchNorm2d(width * COPIES, shift=shift)
            else:
                branch[f"bn{j}"] = Float32BatchNorm2d(width)
            in_channels = width
        self.branch = nn.Sequential(branch)

        shortcut: OrderedDict[str, nn.Module] = OrderedDict()
        if decoupled and (downsample or unit.last):
            shortcut["mean"] = MeanOfCopies()
        if downsample:
            shortcut["pool"] = nn.AvgPool2d(2, 2)
            shortcut["conv"] = nn.Conv2d(unit.in_channels, out_channels, 1, bias=False)
            shortcut["bn"] = Float32BatchNorm2d(out_channels)
            if decoupled and not unit.last:
                shortcut["rep"] = Replicate()
        elif unit.in_channels != out_channels:
            shortcut["pad"] = ZeroPadChannels(out_channels)
        self.shortcut = nn.Sequential(shortcut)  # empty Sequential = identity

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        return self.branch(stream) + self.shortcut(stream)


class ResNet(nn.Module):
    def __init__(self, config: ModelConfig, convs_per_unit: int):
        super().__init__()
        stem_width = config.width(STAGE_BASELINE[0], STAGE_COUPLED[0])
        stem: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(config.in_channels, stem_width, 7, 2, 3, bias=False),
            bn=Float32BatchNorm2d(stem_width),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(3, 2, 1),
        )
        if config.decoupled:
            stem["rep"] = Replicate()
            stem["stream_bn"] = DecoupledBatchNorm2d(stem_width * COPIES, shift=DECOUPLE_SHIFT)
        else:
            stem["stream_bn"] = Float32BatchNorm2d(stem_width)
        self.stem = nn.Sequential(stem)

        final_width = config.width(FINAL_WIDTH, FINAL_WIDTH)
        units = []
        in_channels = stem_width
        for stage, (baseline, coupled, stride) in enumerate(
                zip(STAGE_BASELINE, STAGE_COUPLED, STAGE_STRIDES)):
            width = config.width(baseline, coupled)
            for first_conv in range(0, CONVS_PER_STAGE, convs_per_unit):
                widths = [width] * convs_per_unit
                last = stage == len(STAGE_BASELINE) - 1 and first_conv + convs_per_unit == CONVS_PER_STAGE
                if last:
                    widths[-1] = final_width
                units.append(_Unit(in_channels, tuple(widths), stride if first_conv == 0 else 1, last))
                in_channels = widths[-1]
        self.units = nn.Sequential(*(ResidualUnit(config, unit) for unit in units))
        self.head = nn.Sequential(OrderedDict(
            relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        self.classifier = nn.Linear(final_width, config.num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.units(self.stem(x))))


@register("resnet18", num_classes=1000, in_channels=3, input_size=224, fixed_input_size=False)
def resnet18(config: ModelConfig) -> ResNet:
    """ResNet-18, one shortcut per two convs: stages 64/128/256/512 baseline, 64/90/180/360 coupled."""
    return ResNet(config, convs_per_unit=2)


@register("resnet18_sc", num_classes=1000, in_channels=3, input_size=224, fixed_input_size=False)
def resnet18_sc(config: ModelConfig) -> ResNet:
    """ResNet-18 with a shortcut around every conv (Bi-Real style), widths as resnet18."""
    return ResNet(config, convs_per_unit=1)
