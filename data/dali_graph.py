"""The DALI graph of one epoch of one rank: read (file reader or shard arrays), decode, the
preset's transform, normalize -- the presets and guarantees are described in
:mod:`.pipelines`, which decides *which* samples a pipeline reads and in what order.

DALI is imported inside the functions: ``import binaryduo.data`` must not load it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

#: ``small`` preset: images are padded by this many pixels per side before the random crop.
SMALL_PAD = 4


def augmentation_keys(seed: int, epoch: int, total: int) -> np.ndarray:
    """Per dataset index: (crop offset x, crop offset y, flip) of ``epoch`` (small preset), drawn
    from ``(seed, epoch)`` alone, so a sample's crop does not depend on the rank or the resume."""
    rng = np.random.default_rng([seed, epoch, 0x5A5A])
    offsets = rng.integers(0, 2 * SMALL_PAD + 1, size=(total, 2))
    flips = rng.integers(0, 2, size=(total, 1))
    return np.concatenate([offsets, flips], axis=1)


def epoch_pipeline(indices: np.ndarray, *, files: tuple[str, ...] | None,
                   shard_images: np.ndarray | None, dataset_labels: np.ndarray,
                   keys: np.ndarray | None, preset: str, augment: bool, channels: int,
                   stored_channels: int, image_size: int, mean: tuple[float, ...],
                   std: tuple[float, ...], batch_size: int, num_threads: int,
                   device_id: int | None, seed: int, depth: int):
    """A built DALI pipeline reading the dataset indices ``indices`` in order: from ``files``
    (image paths by dataset index), or else from the shard's ``shard_images`` array. ``keys``
    (:func:`augmentation_keys`, shard only) replaces DALI's own random crop and flip of the
    ``small`` preset; ``augment`` False gives the eval transform. ``device_id`` None: CPU."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu, keyed = device_id is not None, keys is not None
    bs, size = batch_size, image_size
    pipe = Pipeline(batch_size=bs, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=depth, exec_dynamic=True)
    imagenet = preset == "imagenet"
    area, ratio = [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0]
    with pipe:
        if files is not None:
            encoded, labels = fn.readers.file(
                files=[files[i] for i in indices],
                labels=[int(dataset_labels[i]) for i in indices],
                random_shuffle=False, pad_last_batch=True, name="reader")
            decode = "mixed" if gpu else "cpu"
            colour = types.RGB if channels == 3 else types.GRAY
            if imagenet and augment:
                images = fn.decoders.image_random_crop(
                    encoded, device=decode, output_type=colour, random_area=area,
                    random_aspect_ratio=ratio, num_attempts=10)
                images = fn.resize(images, resize_x=size, resize_y=size)
            else:
                images = fn.decoders.image(encoded, device=decode, output_type=colour)
        else:
            outputs = fn.external_source(
                source=ShardSource(shard_images, dataset_labels, indices, bs, keys),
                num_outputs=3 if keyed else 2, batch=True,
                layout=["HWC", ""] + ([""] if keyed else []),
                dtype=[types.UINT8, types.INT64] + ([types.INT64] if keyed else []))
            images, labels = outputs[0], outputs[1]
            if keyed:
                crop_x = fn.cast(outputs[2][0], dtype=types.FLOAT) / (2 * SMALL_PAD)
                crop_y = fn.cast(outputs[2][1], dtype=types.FLOAT) / (2 * SMALL_PAD)
                flip = fn.cast(outputs[2][2], dtype=types.INT32)
            if channels == 3 and stored_channels == 1:
                images = fn.cat(images, images, images, axis=2)
            elif channels == 1 and stored_channels == 3:
                images = fn.color_space_conversion(images, image_type=types.RGB,
                                                   output_type=types.GRAY)
            if gpu:
                images = images.gpu()
            if imagenet and augment:
                images = fn.random_resized_crop(images, size=[size, size],
                                                random_area=area, random_aspect_ratio=ratio)
        normalize = dict(dtype=types.FLOAT, output_layout="CHW",
                         mean=[255.0 * m for m in mean],
                         std=[255.0 * s for s in std])
        if imagenet:
            if augment:
                images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(),
                                                  **normalize)
            else:
                images = fn.resize(images, resize_shorter=round(size * 256 / 224))
                images = fn.crop_mirror_normalize(images, crop=(size, size), **normalize)
        elif augment:
            padded = size + 2 * SMALL_PAD
            images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad")
            offsets = [k / (2 * SMALL_PAD) for k in range(2 * SMALL_PAD + 1)]
            if keyed:
                images = fn.crop_mirror_normalize(images, crop=(size, size),
                                                  crop_pos_x=crop_x, crop_pos_y=crop_y,
                                                  mirror=flip, **normalize)
            else:
                images = fn.crop_mirror_normalize(
                    images, crop=(size, size), crop_pos_x=fn.random.uniform(values=offsets),
                    crop_pos_y=fn.random.uniform(values=offsets),
                    mirror=fn.random.coin_flip(), **normalize)
        else:
            # crop_mirror_normalize pads in output space: fill with a normalized 0 pixel
            images = fn.crop_mirror_normalize(
                images, crop=(size, size), out_of_bounds_policy="pad",
                fill_values=[-m / s for m, s in zip(mean, std)], **normalize)
        pipe.set_outputs(images, labels.gpu() if gpu else labels)
    pipe.build()
    return pipe


def to_torch(batch) -> torch.Tensor:
    """A DALI output batch as a torch tensor without a copy (``exec_dynamic`` pipelines hand
    out buffers they do not reuse while referenced, as DALI's own PyTorch iterator relies on)."""
    from nvidia.dali.tensors import TensorGPU

    tensor = batch.as_tensor()
    if isinstance(tensor, TensorGPU):
        with torch.cuda.device(tensor.device_id()):
            return torch.from_dlpack(tensor)
    return torch.from_dlpack(tensor)


class ShardSource:
    """Batch-mode ``external_source`` callback: batch ``i`` of the rank's index list, the last
    one padded to a full batch by repeating its final sample (trimmed by the iterator); with
    ``keys``, a third output holds each sample's augmentation keys (row of ``keys``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, bs: int,
                 keys: np.ndarray | None = None):
        self.images, self.labels, self.indices, self.bs = images, labels, indices, bs
        self.keys = keys
        self.steps = math.ceil(len(indices) / bs)

    def __call__(self, iteration: int):
        chunk = self.indices[(iteration % self.steps) * self.bs:][:self.bs]
        if len(chunk) < self.bs:
            chunk = np.concatenate([chunk, np.full(self.bs - len(chunk), chunk[-1])])
        batch = (np.ascontiguousarray(self.images[chunk]), self.labels[chunk])
        if self.keys is not None:
            batch += (np.ascontiguousarray(self.keys[chunk]),)
        return batch
