"""Helpers that give a freshly built model non-trivial state, for verifying decoupling and
exports (tests, benchmarks)."""
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


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomize_batchnorm_near_data_(model: nn.Module, images: torch.Tensor,
                                   generator: torch.Generator) -> nn.Module:
    """gamma = +-U(0.5, 1.5) (30 % negative), beta = U(-0.25, 0.75); running statistics are the
    statistics of ``images`` (one train-mode pass, dropout off) moved by up to ~0.2 std and scaled
    by U(0.5, 1.5), so pre-activations straddle the 1/2 threshold of binary activations (unlike
    :func:`randomize_batchnorm_`'s, which ignore the data). Leaves the model in eval mode."""
    norms = _batchnorms(model)
    for bn in norms:
        n = bn.num_features
        sign = torch.where(torch.rand(n, generator=generator) < 0.3, -1.0, 1.0)
        bn.weight.copy_(sign * (0.5 + torch.rand(n, generator=generator)))
        bn.bias.copy_(torch.rand(n, generator=generator) - 0.25)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the running statistics to its own
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    model(images)
    model.eval()
    for bn in norms:
        n = bn.num_features
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.2 * std * torch.randn(n, generator=generator))
        bn.running_var.mul_(0.5 + torch.rand(n, generator=generator))
        bn.momentum = 0.1
    return model


@torch.no_grad()
def firing_rates(model: nn.Module, images: torch.Tensor, activation_type: type) -> list[float]:
    """The mean output of every ``activation_type`` module on ``images``: for {0, 1} activations,
    the share of units that fire."""
    rates: list[float] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: rates.append(float(out.mean())))
             for m in model.modules() if isinstance(m, activation_type)]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return rates
