"""Helpers that give a freshly built model non-trivial state, for verifying decoupling."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random running statistics, gamma and beta for every BN, in place.

    A fresh BN (mean 0, var 1, gamma 1, beta 0) puts every quantized activation's thresholds at
    fixed places; random statistics and affine terms move pre-activations across all of them, so a
    decoupling check on such a model exercises every level of every activation.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            like = module.running_mean
            draw = lambda *shape: torch.rand(*shape, generator=generator).to(like)  # noqa: E731
            module.running_mean.copy_((draw(n) - 0.5) * 0.4)
            module.running_var.copy_(draw(n) * 1.5 + 0.25)
            if module.affine:
                module.weight.copy_(draw(n) * 0.6 + 0.2)
                module.bias.copy_(draw(n) * 0.6 + 0.2)
    return model
