"""What ``precision`` means for a run.

``bf16`` is mixed precision, not a bf16 model: the module, its BN statistics, the optimizer state,
the gradients and their all-reduce stay float32, and DeepSpeed runs as for fp32 (its ``bf16``
section would cast the module to bf16, statistics and checkpoints included); the forward pass runs
under ``torch.autocast(bfloat16)`` (:func:`compute_precision`: the training loop, the evaluation
and the decoupling check alike), so convolutions and matrix products compute in bf16 while
BatchNorm computes and returns float32 (``binaryduo.models.Float32BatchNorm2d``) and the quantizers
compare float32 pre-activations with their thresholds.

``torch.autocast`` rather than DeepSpeed's ``torch_autocast`` section: that one marks every
Conv/Linear parameter to all-reduce its gradient in bf16, and fp32 gradient reduction is the
point (the engine's config says ``communication_data_type: fp32`` explicitly).

The layout is the device's too (:func:`memory_format`, :func:`tune_kernels`): on CUDA the model and
its input batches are channels-last (NHWC), which cuDNN's bf16 convolutions and the elementwise
BN/quantizer kernels run fastest in, and cuDNN picks its convolution algorithms by timing them
once per shape (``cudnn.benchmark``: a recipe trains on one image size). On CPU both stay as they
are: NCHW, and no autotuning (seeded CPU runs are bitwise reproducible).
"""
from __future__ import annotations

import contextlib

import torch


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def compute_precision(dtype: torch.dtype, device: torch.device):
    """The context the forward pass runs in: bf16 autocast for ``bf16``, nothing for fp32."""
    if dtype == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels-last on CUDA, PyTorch's default (NCHW) elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images on ``device`` in its layout (no copy when it is there already)."""
    if images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=memory_format(device))
    return images.to(device, non_blocking=True)


def tune_kernels(device: torch.device) -> None:
    """cuDNN autotuning on CUDA (see the module docstring); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
