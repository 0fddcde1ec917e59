"""BatchNorm over the global batch: PyTorch's fused SyncBatchNorm kernels on CUDA, float64 sums on CPU.

:func:`synchronize_batchnorm` gives each BN *instance* a training forward whose batch mean and
variance cover every rank's batch, and whose backward flows through the other ranks' statistics
(the mathematics of ``torch.nn.SyncBatchNorm``). Module classes are not swapped:
``binaryduo.models`` keeps metadata on its BN subclasses (``DecoupledBatchNorm2d.copies``/``shift``)
and ``convert_sync_batchnorm`` would replace them with plain ``SyncBatchNorm`` objects.

Which path runs where, and why:

* **CUDA tensors (NCCL)**: ``torch.nn.modules._functions.SyncBatchNorm``, the autograd function
  behind ``nn.SyncBatchNorm`` -- fused CUDA kernels for the per-rank statistics, their
  combination and the backward, one all-gather forward and one all-reduce backward per layer. The
  input is cast to float32 first (outside autocast, as ``Float32BatchNorm2d``), so statistics and
  output are float32 under bf16 autocast; a float64 model stays float64. Those kernels exist on
  CUDA only (``torch.batch_norm_stats`` has no CPU kernel). A CUDA tensor on a group whose CUDA
  backend is not NCCL is refused: it would be a misconfigured launch (``init_distributed`` picks
  NCCL whenever CUDA is present), and PyTorch's gloo branch of that function is not what we test.
* **CPU tensors (gloo)**: per-rank sums and sums of squares in float64, all-reduced with autograd,
  so the result differs from one process holding the whole batch only by rounding (2 gloo ranks
  reproduce the 1-rank run; tests/trainer/test_launchers.py). The output is float32 (float64 for
  a float64 input) whatever the input's dtype, as ``Float32BatchNorm2d``. The all-reduce is the
  functional collective (``torch.distributed._functional_collectives.all_reduce``; torch 2.14
  registers its backward, an all-reduce of the gradients), which Dynamo traces: under
  ``compile: true`` a synchronised model is one graph (tests/trainer/test_global_batch_norm.py).
  ``torch.distributed.nn.all_reduce`` (deprecated; the same gloo all-reduce forward and backward,
  bitwise the same results) raised inside Dynamo, which ran every frame holding a BN eager.

Neither path reads a tensor on the host itself: element counts are host integers (the global count
still comes out of the collective, so unequal per-rank batches are right), the unbiased-variance
factor is a tensor expression, and with ``momentum=None`` the cumulative-average factor
``1/num_batches_tracked`` stays a device tensor (``nn.SyncBatchNorm`` calls ``.item()`` there).
PyTorch's own fused forward reads the gathered counts on the host (it drops ranks with an empty batch
with a boolean mask, a data-dependent shape: one synchronisation per layer per step; pytorch#78549);
:class:`_UnmaskedSyncBatchNorm` is that function without the mask -- no rank ever has an empty
batch here (the global batch splits evenly over the ranks, or the run is refused).

With statistics over the global batch and the data sharded global-batch-major
(``binaryduo.data``), ``w`` ranks with per-rank batch ``b`` compute what one rank computes with
batch ``w * b`` (up to reduction order); running statistics are then identical on every rank.
Parameter gradients stay per-rank sums over the local batch, as with ``nn.SyncBatchNorm``: the
engine's gradient all-reduce combines them like every other parameter's.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from torch.nn.modules._functions import SyncBatchNorm as _FusedSyncBatchNorm

_BatchNorm = torch.nn.modules.batchnorm._BatchNorm


class _UnmaskedSyncBatchNorm(_FusedSyncBatchNorm):
    """``torch.nn.modules._functions.SyncBatchNorm`` (same kernels, same saved tensors, its
    backward) whose forward does not drop empty-batch ranks: that boolean-mask indexing is a
    host-device synchronisation per layer and step, and binaryduo's ranks always hold equal,
    non-empty batches. Everything else follows PyTorch's forward line by line."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum,  # noqa: D102
                process_group, world_size):
        if not (input.is_contiguous(memory_format=torch.channels_last)
                or input.is_contiguous(memory_format=torch.channels_last_3d)):
            input = input.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        channels = input.shape[1]
        if input.numel() == 0:
            raise ValueError("global-batch BatchNorm got an empty batch on this rank")
        mean, invstd = torch.batch_norm_stats(input, eps)
        count = torch.full((1,), input.numel() // channels, dtype=mean.dtype, device=mean.device)
        combined = torch.cat([mean, invstd, count], dim=0)  # 2C + 1
        if process_group._get_backend_name() != "gloo":
            gathered = torch.empty(world_size * combined.numel(), dtype=combined.dtype,
                                   device=combined.device)
            dist.all_gather_into_tensor(gathered, combined, process_group)
            combined = gathered.view(world_size, -1)
        else:  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(combined) for _ in range(world_size)]
            dist.all_gather(parts, combined, process_group)
            combined = torch.stack(parts, dim=0)
        mean_all, invstd_all, count_all = torch.split(combined, channels, dim=1)
        counts = count_all.view(-1)
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            input, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts)
        ctx.save_for_backward(input, weight, mean, invstd, count_all.to(torch.int32))
        ctx.process_group = process_group
        return torch.batch_norm_elemt(input, weight, bias, mean, invstd, eps)


def _backend_for(device_type: str) -> str:
    """The default group's backend for ``device_type`` ("nccl", "gloo", ...; "" if none).
    A group made without a backend name is several ("cpu:gloo,cuda:nccl")."""
    name = str(dist.get_backend())
    if ":" not in name:
        return name
    return dict(part.split(":", 1) for part in name.split(",")).get(device_type, "")


def _blend_cumulative(self: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """``running = (1 - f) running + f batch`` with ``f = 1 / num_batches_tracked`` (momentum None:
    a cumulative average), ``f`` a float64 tensor on the buffers' device: reading the counter on
    the host (as ``nn.BatchNorm`` does) would wait for the device on every BN of every step."""
    factor = self.num_batches_tracked.to(torch.float64).reciprocal()
    self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
    self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype) * factor)


def _float64_global_batch_norm(self: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    channels = input.shape[1]
    reduce_dims = [0] + list(range(2, input.dim()))
    wide = input.to(torch.float64)
    # this rank's element count per channel is known on the host; it rides in the all-reduce so
    # the global count is right whatever the other ranks' batch sizes
    count = wide.new_full((1,), input.numel() / channels)
    local = torch.cat([wide.sum(reduce_dims), (wide * wide).sum(reduce_dims), count])
    # autograd: the backward all-reduces the gradients. Eagerly the result is an
    # AsyncCollectiveTensor, waited for by the first op that reads its values
    total = funcol.all_reduce(local, "sum", dist.group.WORLD)
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
            # unbiased for the running variance, as BN; a global count of 1 (var 0) keeps var.
            # n - 1 >= 1 otherwise, so this is var * (n / (n - 1)) bit for bit
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            if self.momentum is None:
                _blend_cumulative(self, mean, unbiased)
            else:
                self.running_mean.mul_(1 - self.momentum).add_(
                    mean.to(self.running_mean.dtype), alpha=self.momentum)
                self.running_var.mul_(1 - self.momentum).add_(
                    unbiased.to(self.running_var.dtype), alpha=self.momentum)
    return out


def _fused_global_batch_norm(self: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``nn.SyncBatchNorm.forward``'s training branch, on fp32 (or wider) statistics."""
    wide = torch.promote_types(input.dtype, torch.float32)
    # outside autocast, as Float32BatchNorm2d: the kernels see the float32 input and parameters
    with torch.autocast(input.device.type, enabled=False):
        x = input.to(wide)
        mean_slot = var_slot = None  # the buffers the kernel updates in place, if any
        factor = 0.0  # unused without running statistics
        cumulative = self.track_running_stats and self.momentum is None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if cumulative:
                # The kernel takes its factor as a host float, and nn.SyncBatchNorm computes
                # 1/num_batches_tracked with .item(). Instead the kernel writes this batch's mean
                # and unbiased variance into zeroed scratch buffers (factor 1: 0 * 0 + 1 * stat),
                # blended in below with the factor as a device tensor.
                mean_slot = torch.zeros_like(self.running_mean)
                var_slot = torch.zeros_like(self.running_var)
                factor = 1.0
            else:
                mean_slot, var_slot, factor = self.running_mean, self.running_var, self.momentum
        out = _UnmaskedSyncBatchNorm.apply(x, self.weight, self.bias, mean_slot, var_slot,
                                           self.eps, factor, dist.group.WORLD,
                                           dist.get_world_size())
    if cumulative:
        with torch.no_grad():
            _blend_cumulative(self, mean_slot, var_slot)
    return out


def _global_batch_norm(self: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
        return type(self).forward(self, input)
    self._check_input_dim(input)
    device = input.device.type
    backend = _backend_for(device)
    if device == "cuda":
        if backend != "nccl":
            raise RuntimeError(
                f"global-batch BatchNorm of a CUDA tensor needs an NCCL process group, not "
                f"{dist.get_backend()!r} (binaryduo's init_distributed picks NCCL with CUDA)")
        return _fused_global_batch_norm(self, input)
    if device != "cpu" or backend in ("", "nccl"):
        raise RuntimeError(
            f"global-batch BatchNorm of a {device} tensor on a {dist.get_backend()!r} process "
            f"group: supported are CUDA tensors with NCCL and CPU tensors with gloo (is the model "
            f"on the process's device?)")
    return _float64_global_batch_norm(self, input)


def synchronize_batchnorm(model: torch.nn.Module) -> int:
    """Makes every BatchNorm of ``model`` use global-batch statistics in training; returns how
    many. Evaluation (``model.eval()``) and single-process runs use the plain BN forward."""
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.forward = types.MethodType(_global_batch_norm, module)
            count += 1
    return count


__all__ = ["synchronize_batchnorm"]
