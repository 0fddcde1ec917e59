"""binaryduo.models: BinaryDuo quantizers, architectures, decoupling and cost accounting.

Pure PyTorch; usable in a notebook with nothing but torch installed::

    from binaryduo import models
    coupled = models.build("resnet18", "coupled", num_classes=1000)
    binary = models.decouple(coupled)
    print(models.check_decoupling(coupled, binary, images))
    print(models.cost_report(binary).format_table())
"""
from . import alexnet, resnet, vgg7  # noqa: F401  (register the architectures)
from .cost import CostReport, LayerCost, cost_report
from .decoupling import DecouplingCheck, check_decoupling, decouple
from .layers import (PARAMETER_ROLES, ActQuant, DecoupledBatchNorm2d, Float32BatchNorm2d,
                     MeanOfCopies, QConv2d, Replicate, ZeroPadChannels, clip_latent_weights_,
                     latent_clipped_parameters, parameter_roles)
from .quantizers import STE, activation_ste_gradient, binarize_weight, quantize_activation
from .registry import ModelConfig, build, build_from_config, describe, names, options, variants
from .testing import randomize_batchnorm_

__all__ = [
    "PARAMETER_ROLES", "ActQuant", "CostReport", "DecoupledBatchNorm2d", "DecouplingCheck",
    "Float32BatchNorm2d", "LayerCost",
    "MeanOfCopies", "ModelConfig", "QConv2d", "Replicate", "STE", "ZeroPadChannels",
    "activation_ste_gradient", "binarize_weight", "build", "build_from_config",
    "check_decoupling", "clip_latent_weights_", "cost_report", "decouple", "describe",
    "latent_clipped_parameters", "names", "options", "parameter_roles", "quantize_activation",
    "randomize_batchnorm_", "variants",
]
