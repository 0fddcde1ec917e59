"""Small random binaryduo models for the export tests: random weights, random BatchNorm
statistics (negative gammas included) placed near the data's so every binary activation fires
on a good share of its inputs, and odd widths so channel padding is exercised."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from binaryduo import models
from binaryduo.models.testing import randomize_batchnorm_near_data_

#: Options that keep every architecture to a fraction of a second; the widths are deliberately
#: not multiples of 8 (vgg7 bnn 13-13-26-26-102-102, coupled 9-9-18-18-67 -> decoupled inputs
#: 18/36/134), the ResNets end on 1x1 maps where every 3x3 tap but the centre is padding.
SMALL_OPTIONS = {
    "vgg7": {"width_mult": 0.2},
    "alexnet": {"width_mult": 0.05},
    "resnet18": {"width_mult": 0.15, "input_size": 32},
    "resnet18_sc": {"width_mult": 0.15, "input_size": 64},
}
ARCHITECTURES = tuple(SMALL_OPTIONS)


def images_for(model: nn.Module, count: int, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    return torch.randn(count, config.in_channels, config.input_size, config.input_size,
                       generator=generator)


def random_model(name: str, variant: str, seed: int = 0, count: int = 8, **options):
    """(model, images): ``variant`` "bnn", "coupled", or "decoupled" (the decoupling of a random
    coupled model, as training produces it)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    built = "coupled" if variant == "decoupled" else variant
    model = models.build(name, built, **{**SMALL_OPTIONS[name], **options})
    images = images_for(model, count, generator)
    randomize_batchnorm_near_data_(model, images, generator)
    if variant == "decoupled":
        model = models.decouple(model).eval()
    return model, images


@pytest.fixture
def make_model():
    return random_model
