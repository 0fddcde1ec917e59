"""binaryduo.data: DALI input pipelines and dataset preparation (image tensors and labels only).

Public API (imported lazily, so ``import binaryduo.data`` does not load DALI)::

    LoaderSpec, build_loader, Loader, Batch, EvalBatch      # .pipelines (DALI)
    prepare_fashion_mnist, PrepareResult                    # .prepare   (numpy)
    prepare_cifar10                                         # .cifar     (numpy)
    prepare_imagenet_val, prepare_resized                   # .imagenet  (Pillow)
    check_dataset, DatasetReport, Problem                   # .check     (Pillow)

This package knows images and labels, not models: it never imports binaryduo.models or
binaryduo.trainer.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LoaderSpec": "pipelines", "build_loader": "pipelines", "Loader": "pipelines",
    "Batch": "pipelines", "EvalBatch": "pipelines", "default_device": "pipelines",
    "IMAGENET_MEAN": "pipelines", "IMAGENET_STD": "pipelines",
    "prepare_fashion_mnist": "prepare", "PrepareResult": "prepare",
    "FASHION_MNIST_CLASSES": "prepare", "FASHION_MNIST_DIR": "prepare",
    "SourceMissingError": "prepare", "DatasetExistsError": "prepare",
    "prepare_cifar10": "cifar", "prepare_imagenet_val": "imagenet",
    "prepare_resized": "imagenet",
    "check_dataset": "check", "DatasetReport": "check", "Problem": "check",
    "LayoutError": "layout", "detect_format": "layout",
    "ShardError": "shard", "read_manifest": "shard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
