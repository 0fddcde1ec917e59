"""The GPU path of the DALI loaders: ``mixed`` (nvJPEG) decode and GPU resize/crop/normalize, chosen
automatically when CUDA is present. Skipped without a GPU (CI and laptops have none); run on a
lent GPU machine with ``pytest tests/data/test_gpu_pipelines.py tests/trainer/test_gpu_training.py``.

The oracle is the CPU pipeline, itself checked against a PIL/torchvision reference in
test_data_pipelines.py: nvJPEG and libjpeg-turbo may round an IDCT differently, so pixels agree to
about a grey level, not bitwise."""
from __future__ import annotations

import pytest
import torch

from binaryduo.data.pipelines import LoaderSpec, build_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREY_LEVEL = 1 / 255 / 0.225  # one 8-bit level after normalisation by the smallest ImageNet std


def gather(loader):
    images, labels = [], []
    for batch in loader:
        images.append(batch.images)
        labels.append(batch.labels)
    return torch.cat(images), torch.cat(labels)


def test_gpu_is_chosen_automatically_and_val_matches_the_cpu_pipeline(imagenet_tree):
    spec = LoaderSpec(imagenet_tree, preset="imagenet", batch_size=8)
    gpu = build_loader(spec, train=False)  # no device given: CUDA is present, so the GPU path
    assert gpu.device.type == "cuda"
    cpu = build_loader(spec, train=False, device="cpu")
    gpu_images, gpu_labels = gather(gpu)
    cpu_images, cpu_labels = gather(cpu)
    assert gpu_images.is_cuda and gpu_images.dtype == torch.float32
    assert gpu_images.shape == cpu_images.shape == (19, 3, 224, 224)
    assert gpu_labels.cpu().tolist() == cpu_labels.tolist() == list(range(19))
    diff = (gpu_images.cpu() - cpu_images).abs()
    per_image = diff.flatten(1).mean(1)
    # the same photos decoded by nvJPEG vs libjpeg-turbo and resized on GPU vs CPU
    assert per_image.max() < 2 * GREY_LEVEL, per_image.tolist()
    assert diff.mean() < GREY_LEVEL, diff.mean()


def test_gpu_train_shards_are_equal_and_augmentation_is_seeded(imagenet_tree):
    spec = LoaderSpec(imagenet_tree, preset="imagenet", batch_size=4)
    shards = [build_loader(spec, train=True, rank=r, world_size=2, seed=3) for r in range(2)]
    counts = []
    for loader in shards:
        images, labels = gather(loader)
        assert images.is_cuda and images.shape[1:] == (3, 224, 224)
        assert torch.isfinite(images).all()
        counts.append(len(labels))
    assert counts[0] == counts[1] == 20  # 40 files over 2 ranks, whole batches only
    a, _ = gather(build_loader(spec, train=True, seed=5))
    b, _ = gather(build_loader(spec, train=True, seed=5))
    c, _ = gather(build_loader(spec, train=True, seed=6))
    assert torch.equal(a, b), "same seed, same GPU augmentation"
    assert not torch.equal(a, c)


def test_gpu_small_preset_from_a_shard(cifar10_shard):
    spec = LoaderSpec(cifar10_shard, preset="small", batch_size=64, subset=256)
    gpu_images, gpu_labels = gather(build_loader(spec, train=False))
    cpu_images, cpu_labels = gather(build_loader(spec, train=False, device="cpu"))
    assert gpu_images.is_cuda
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    # no decode involved: the same uint8 pixels, normalised the same way
    assert torch.allclose(gpu_images.cpu(), cpu_images, atol=1e-6)
