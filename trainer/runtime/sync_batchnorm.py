"""BatchNorm over the global batch, on any backend (gloo on CPU included).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and swapping module classes would lose what
``binaryduo.models`` records on its BN subclasses (``DecoupledBatchNorm2d.copies``/``shift``).
Instead, :func:`synchronize_batchnorm` gives each BN *instance* a forward that computes the batch
mean and variance from per-rank sums all-reduced with autograd (``torch.distributed.nn``), so the
backward pass also flows through the other ranks' statistics -- the same mathematics as
``SyncBatchNorm``. Sums are accumulated in float64, so the result differs from a single process
holding the whole batch only by rounding. The output is float32 (float64 for a float64 input)
whatever the input's dtype, as the models' ``Float32BatchNorm2d``.

With statistics over the global batch and the data sharded global-batch-major
(``binaryduo.data``), ``w`` ranks with per-rank batch ``b`` compute what one rank computes with
batch ``w * b`` (up to reduction order); running statistics are then identical on every rank.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch.distributed.nn import functional as dist_nn


def _global_batch_norm(self: torch.nn.modules.batchnorm._BatchNorm,
                       input: torch.Tensor) -> torch.Tensor:
    if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
        return type(self).forward(self, input)
    self._check_input_dim(input)
    channels = input.shape[1]
    reduce_dims = [0] + list(range(2, input.dim()))
    wide = input.to(torch.float64)
    count = torch.tensor([input.numel() / channels], dtype=torch.float64, device=input.device)
    local = torch.cat([wide.sum(reduce_dims), (wide * wide).sum(reduce_dims), count])
    total = dist_nn.all_reduce(local)  # autograd: the backward all-reduces the gradients
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0.0)  # biased, as BN
    shape = [1, channels] + [1] * (input.dim() - 2)
    scale = torch.rsqrt(var + self.eps)
    out = (wide - mean.view(shape)) * scale.view(shape)
    # float32 at least, as binaryduo.models.Float32BatchNorm2d: under bf16 autocast the
    # pre-activations the quantizers compare with their thresholds must not be rounded to bf16
    out = out.to(torch.promote_types(input.dtype, torch.float32))
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                        else self.momentum)
            unbiased = var * (n / (n - 1)) if n > 1 else var
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype),
                                                      alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype),
                                                     alpha=momentum)
    return out


def synchronize_batchnorm(model: torch.nn.Module) -> int:
    """Makes every BatchNorm of ``model`` use global-batch statistics in training; returns how
    many. Evaluation (``model.eval()``) and single-process runs use the plain BN forward."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_global_batch_norm, module)
            count += 1
    return count


__all__ = ["synchronize_batchnorm"]
