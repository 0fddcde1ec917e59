"""The DALI graph of one rank: read (image files or shard arrays), decode, the preset's
transform, normalize -- the presets and guarantees are described in :mod:`.pipelines`, which
decides *which* samples a pipeline reads and in what order.

Two ways to build the same graph:

- :func:`fed_pipeline`: the loader's pipeline, built once and reused every epoch. Its inputs are
  ``external_source`` nodes fed batch by batch (:func:`fed_batch`): the image paths (read by
  ``fn.io.file.read``) or the shard's pixels, the labels, and the ``small`` preset's per-sample
  augmentation keys. :mod:`.dali_runner` runs it and re-seeds its random operators per epoch.
- :func:`epoch_pipeline`: one epoch's pipeline with the epoch's order baked in
  (``fn.readers.file(files=...)`` or a callback over the shard), built for that epoch only. This
  was the loader's pipeline before it became persistent; it is the reference the persistent one
  reproduces bit for bit, and the fallback where the installed DALI cannot be re-seeded.

DALI is imported inside the functions: ``import binaryduo.data`` must not load it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: ``small`` preset: images are padded by this many pixels per side before the random crop.
SMALL_PAD = 4


@dataclass(frozen=True)
class GraphConfig:
    """What a rank's graph does to every sample (everything but the samples and the seed)."""
    preset: str                    # "imagenet" or "small"
    augment: bool                  # the preset's random augmentation (else the eval transform)
    keyed: bool                    # augmentation drawn per sample in numpy and fed (shard, small)
    from_files: bool               # encoded image files (else a shard's uint8 arrays)
    channels: int
    stored_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    num_threads: int
    device_id: int | None          # None: CPU pipeline

    @property
    def random(self) -> bool:
        """Whether DALI's own random operators draw the augmentation (seeded by the pipeline)."""
        return self.augment and not self.keyed

    @property
    def reference_seed_offset(self) -> int:
        """Operator-seed slots taken, in :func:`epoch_pipeline`'s graph, before the first random
        operator: its file reader takes the first (``fn.external_source`` and
        ``fn.io.file.read`` take none)."""
        return 1 if self.from_files else 0


def augmentation_keys(seed: int, epoch: int, total: int) -> np.ndarray:
    """Per dataset index: (crop offset x, crop offset y, flip) of ``epoch`` (small preset), drawn
    from ``(seed, epoch)`` alone, so a sample's crop does not depend on the rank or the resume."""
    rng = np.random.default_rng([seed, epoch, 0x5A5A])
    offsets = rng.integers(0, 2 * SMALL_PAD + 1, size=(total, 2))
    flips = rng.integers(0, 2, size=(total, 1))
    return np.concatenate([offsets, flips], axis=1)


# --------------------------------------------------------------------------- persistent graph
def fed_pipeline(config: GraphConfig, *, seed: int):
    """The built, reusable pipeline whose inputs are fed per iteration by :func:`fed_batch`
    (``Pipeline.feed_input``). Checkpointing is enabled when DALI draws random numbers, so that
    :mod:`.dali_runner` can restore its random operators to any seed's initial state."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=config.batch_size, num_threads=config.num_threads,
                    device_id=config.device_id, seed=seed, prefetch_queue_depth=1,
                    exec_dynamic=True, enable_checkpointing=config.random)
    with pipe:
        labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
        if config.from_files:
            paths = fn.external_source(name="paths", dtype=types.UINT8, ndim=1)
            outputs = _transform(config, labels, encoded=fn.io.file.read(paths))
        else:
            images = fn.external_source(name="images", dtype=types.UINT8, ndim=3, layout="HWC")
            keys = (fn.external_source(name="keys", dtype=types.INT64, ndim=1)
                    if config.keyed else None)
            outputs = _transform(config, labels, images=images, keys=keys)
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def fed_batch(config: GraphConfig, chunk: np.ndarray, *, files: tuple[str, ...] | None,
              shard_images: np.ndarray | None, dataset_labels: np.ndarray,
              keys: np.ndarray | None) -> dict[str, object]:
    """The inputs of :func:`fed_pipeline` for the dataset indices ``chunk`` (one batch or its
    last part: padded to a full batch by repeating the final sample, as the file reader's
    ``pad_last_batch`` and :class:`ShardSource` do; the loader trims the padding)."""
    bs = config.batch_size
    if len(chunk) < bs:
        chunk = np.concatenate([chunk, np.full(bs - len(chunk), chunk[-1])])
    batch: dict[str, object] = {"labels": np.ascontiguousarray(dataset_labels[chunk],
                                                               dtype=np.int64)}
    if config.from_files:
        batch["paths"] = [np.frombuffer(files[i].encode(), dtype=np.uint8) for i in chunk]
    else:
        batch["images"] = np.ascontiguousarray(shard_images[chunk])
        if config.keyed:
            batch["keys"] = np.ascontiguousarray(keys[chunk])
    return batch


# ---------------------------------------------------------------------------- per-epoch graph
def epoch_pipeline(config: GraphConfig, indices: np.ndarray, *, files: tuple[str, ...] | None,
                   shard_images: np.ndarray | None, dataset_labels: np.ndarray,
                   keys: np.ndarray | None, seed: int, depth: int):
    """A built pipeline reading the dataset indices ``indices`` in order, for one epoch: from
    ``files`` (image paths by dataset index) with DALI's file reader, or else from the shard's
    ``shard_images`` array. ``keys`` (:func:`augmentation_keys`) replaces DALI's own random crop
    and flip of the keyed ``small`` preset. ``depth`` batches are scheduled ahead."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=config.batch_size, num_threads=config.num_threads,
                    device_id=config.device_id, seed=seed, prefetch_queue_depth=depth,
                    exec_dynamic=True)
    with pipe:
        if config.from_files:
            encoded, labels = fn.readers.file(
                files=[files[i] for i in indices],
                labels=[int(dataset_labels[i]) for i in indices],
                random_shuffle=False, pad_last_batch=True, name="reader")
            outputs = _transform(config, labels, encoded=encoded)
        else:
            keyed = config.keyed
            source = ShardSource(shard_images, dataset_labels, indices, config.batch_size,
                                 keys if keyed else None)
            fed = fn.external_source(
                source=source, num_outputs=3 if keyed else 2, batch=True,
                layout=["HWC", ""] + ([""] if keyed else []),
                dtype=[types.UINT8, types.INT64] + ([types.INT64] if keyed else []))
            outputs = _transform(config, fed[1], images=fed[0], keys=fed[2] if keyed else None)
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


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


# -------------------------------------------------------------------------- shared transform
def _transform(config: GraphConfig, labels, *, encoded=None, images=None, keys=None):
    """Decode (``encoded``) or take ``images`` (HWC uint8), apply the preset, normalize: the
    ``(images, labels)`` outputs. The random operators are created in the same order in both
    graphs, so they take the same operator-seed slots (after the reader's, see
    :attr:`GraphConfig.reference_seed_offset`)."""
    from nvidia.dali import fn, types

    gpu = config.device_id is not None
    size, augment = config.image_size, config.augment
    imagenet = config.preset == "imagenet"
    area, ratio = [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0]
    if encoded is not None:
        decode = "mixed" if gpu else "cpu"
        colour = types.RGB if config.channels == 3 else types.GRAY
        if imagenet and augment:
            images = fn.decoders.image_random_crop(
                encoded, device=decode, output_type=colour, random_area=area,
                random_aspect_ratio=ratio, num_attempts=10)
            images = fn.resize(images, resize_x=size, resize_y=size)
        else:
            images = fn.decoders.image(encoded, device=decode, output_type=colour)
    else:
        if keys is not None:
            crop_x = fn.cast(keys[0], dtype=types.FLOAT) / (2 * SMALL_PAD)
            crop_y = fn.cast(keys[1], dtype=types.FLOAT) / (2 * SMALL_PAD)
            flip = fn.cast(keys[2], dtype=types.INT32)
        if config.channels == 3 and config.stored_channels == 1:
            images = fn.cat(images, images, images, axis=2)
        elif config.channels == 1 and config.stored_channels == 3:
            images = fn.color_space_conversion(images, image_type=types.RGB,
                                               output_type=types.GRAY)
        if gpu:
            images = images.gpu()
        if imagenet and augment:
            images = fn.random_resized_crop(images, size=[size, size],
                                            random_area=area, random_aspect_ratio=ratio)
    mean, std = config.mean, config.std
    normalize = dict(dtype=types.FLOAT, output_layout="CHW",
                     mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
    if imagenet:
        if augment:
            images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), **normalize)
        else:
            images = fn.resize(images, resize_shorter=round(size * 256 / 224))
            images = fn.crop_mirror_normalize(images, crop=(size, size), **normalize)
    elif augment:
        padded = size + 2 * SMALL_PAD
        images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad")
        offsets = [k / (2 * SMALL_PAD) for k in range(2 * SMALL_PAD + 1)]
        if keys is not None:
            images = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=crop_x,
                                              crop_pos_y=crop_y, mirror=flip, **normalize)
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
    return images, labels.gpu() if gpu else labels


def to_torch(batch) -> torch.Tensor:
    """A DALI output batch as a torch tensor without a copy (``exec_dynamic`` pipelines hand
    out buffers they do not reuse while referenced, as DALI's own PyTorch iterator relies on)."""
    from nvidia.dali.tensors import TensorGPU

    tensor = batch.as_tensor()
    if isinstance(tensor, TensorGPU):
        with torch.cuda.device(tensor.device_id()):
            return torch.from_dlpack(tensor)
    return torch.from_dlpack(tensor)
