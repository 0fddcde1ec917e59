"""VGG-7 for 32x32 inputs (CIFAR-10; Fashion-MNIST padded to 32), docs/method.md §2."""
from __future__ import annotations

from .chain import ChainNet, ConvLayer
from .registry import ModelConfig, register

#: conv1..4 are 3x3 (pool after 2, 3, 4); conv5 is 4x4/4 on the 4x4 map; conv6 1x1 ends BN -> ReLU.
VGG7_LAYERS = [
    ConvLayer("conv1", 64, 45, kernel=3, padding=1),
    ConvLayer("conv2", 64, 45, kernel=3, padding=1, pool=True),
    ConvLayer("conv3", 128, 90, kernel=3, padding=1, pool=True),
    ConvLayer("conv4", 128, 90, kernel=3, padding=1, pool=True),
    ConvLayer("conv5", 512, 336, kernel=4, stride=4),
    ConvLayer("conv6", 512, 512, kernel=1),
]


@register("vgg7", num_classes=10, in_channels=3, input_size=32, fixed_input_size=True)
def vgg7(config: ModelConfig) -> ChainNet:
    """VGG-7 (32x32): 64-64-128-128-512-512 baseline, 45-45-90-90-336-512 coupled."""
    return ChainNet(config, VGG7_LAYERS, pool_kernel=2, pool_stride=2)
