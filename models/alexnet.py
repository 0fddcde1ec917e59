"""AlexNet for 224x224 ImageNet, docs/method.md §2 ("fc" layers are convolutions)."""
from __future__ import annotations

from .chain import ChainNet, ConvLayer
from .registry import ModelConfig, register

#: Max-pooling 3x3/2 after conv1, conv2, conv5; fc6 is a 6x6 conv on the 6x6 map; fc7 ends
#: BN -> ReLU; dropout after fc6's activation and fc7's ReLU.
ALEXNET_LAYERS = [
    ConvLayer("conv1", 96, 88, kernel=11, stride=4, padding=2, pool=True),
    ConvLayer("conv2", 256, 192, kernel=5, padding=2, pool=True),
    ConvLayer("conv3", 384, 256, kernel=3, padding=1),
    ConvLayer("conv4", 384, 256, kernel=3, padding=1),
    ConvLayer("conv5", 256, 192, kernel=3, padding=1, pool=True),
    ConvLayer("fc6", 4096, 2400, kernel=6, dropout=True),
    ConvLayer("fc7", 4096, 4096, kernel=1, dropout=True),
]


@register("alexnet", num_classes=1000, in_channels=3, input_size=224, fixed_input_size=True,
          extra_options={"dropout": 0.1})
def alexnet(config: ModelConfig) -> ChainNet:
    """AlexNet (224x224): 96-256-384-384-256-4096-4096 baseline, 88-192-256-256-192-2400-4096 coupled."""
    dropout = config.extra["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"option dropout={dropout!r} must be a number in [0, 1)")
    return ChainNet(config, ALEXNET_LAYERS, pool_kernel=3, pool_stride=2, dropout=float(dropout))
