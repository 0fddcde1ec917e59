"""DALI input pipelines for training and evaluation, sharded over ranks.

Public API::

    spec = LoaderSpec(root, format="auto", preset="imagenet" | "small", batch_size=64, ...)
    loader = build_loader(spec, train=True, rank=r, world_size=w, seed=s, device=None)
    len(loader)                      # steps per epoch, identical on every rank
    for images, labels in loader:    # train: float32 NCHW, int64, on `loader.device`
    for images, labels, valid in eval_loader:   # eval: + bool mask of real (non-padding) samples
    loader.set_epoch(e); loader.state_dict(); loader.load_state_dict(state)

Device: CPU pipelines (``device_id=None``) when ``torch.cuda.is_available()`` is False, GPU
pipelines (``mixed`` JPEG decode, ``device_id`` = the CUDA device index, normally the local rank)
when it is True; ``device=`` overrides the choice.

This module decides which samples each rank reads, in what order and with which seeds; the DALI
graph that reads, decodes and transforms them is :mod:`.dali_graph`, and :mod:`.dali_runner`
runs it. A loader builds one DALI pipeline, on its first iteration, and reuses it for every
epoch and evaluation pass (:attr:`Loader.pipelines_built`): a pipeline build costs ~1.7 s on a
GPU.

Sharding is done here, not by DALI's reader (``shard_id``/``num_shards``): every epoch the
loader computes each rank's exact list of samples and feeds that list, batch by batch, to its
pipeline (``fn.external_source`` nodes: image paths read by ``fn.io.file.read``, or the shard's
arrays). This makes the guarantees explicit and testable (:meth:`Loader.epoch_indices`):

- train: a permutation of the dataset seeded by ``(seed, epoch)`` -- the same on every rank -- is
  cut into global batches of ``batch_size * world_size`` samples, and rank ``r`` takes the ``r``-th
  ``batch_size`` slice of each (global-batch-major): step ``k`` of a run on ``w`` ranks sees the
  same samples as step ``k`` of a run on one rank with a ``w`` times larger batch. Each rank gets
  ``N // world_size`` samples (the up to ``world_size - 1`` left over differ from epoch to epoch);
  with ``drop_last`` (default) only whole global batches are kept (DROP). Every rank therefore
  runs the same number of equal-sized steps, and the shards are disjoint.
- eval: rank ``r`` reads samples ``r, r + w, r + 2w, ...`` in dataset order, padded by repeating
  its last sample to ``ceil(N / w)`` (DALI's PARTIAL + pad_last_batch, done explicitly); the last
  batch may be partial, and ``valid`` is False for the padding, so summing over ranks counts
  every image exactly once while all ranks still run the same number of steps.
- augmentation randomness. ``small`` preset on a shard: the crop offsets and flips are drawn per
  *sample*, from ``(seed, epoch, dataset index)``, and fed to DALI -- independent of the rank, the
  world size and where an epoch was resumed. File formats (either preset), and the
  ``imagenet`` preset on a shard: DALI's random operators (the fused random-crop decoder, the
  small preset's offsets, the flips) draw from the pipeline seed ``(seed, epoch, rank)`` -- before each epoch the reused
  pipeline's random operators are restored to the state a pipeline built with that seed starts
  in (:mod:`.dali_runner`), so every epoch draws what a pipeline built for it would. A loader
  positioned mid-epoch replays the epoch from its start and discards the batches before its
  position (decoded, not used), so a resumed epoch continues with exactly the crops an
  uninterrupted one would use.
  Either way :meth:`Loader.set_epoch` / :meth:`Loader.load_state_dict` re-create any epoch, or the
  rest of one, bit for bit from the seed alone.

Presets (``image_size`` S defaults to 224 / 32):

- ``imagenet`` train: decode + random-resized-crop (area 0.08-1, aspect 3/4-4/3) to SxS,
  horizontal flip p=0.5, normalize; eval: resize the shorter side to S*256/224 (256 for 224),
  centre crop SxS, normalize. Default mean/std: the ImageNet ones.
- ``small`` (CIFAR / Fashion-MNIST): images are centre-padded (or cropped) to S+8, a random SxS
  window (offsets 0..8, i.e. "pad 4 + random crop S" for an SxS image) is taken and flipped with
  p=0.5; eval: centre pad/crop to S. Padding is 0-valued pixels, before normalization (as
  torchvision's Pad + ToTensor + Normalize). Default mean/std: the train-set statistics in a
  shard's manifest, else 0.5/0.5.

Outputs are normalized as ``(pixel / 255 - mean) / std`` per channel, float32, NCHW. Batches are
handed over without a copy (DLPack from an ``exec_dynamic`` pipeline: DALI does not reuse a buffer
while it is referenced), and exactly one epoch's batches are scheduled -- DALI's own iterators
decode ``prefetch_queue_depth`` batches past the end of every epoch, which would run the reused
pipeline ahead into the wrong order. An iteration stopped early (``break``) finishes the up to
two batches it had scheduled when it is closed, so the next one starts from an idle pipeline.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .dali_graph import GraphConfig, augmentation_keys, to_torch
from .dali_runner import EpochRunner
from .layout import FileSplit, LayoutError, detect_format, list_split
from .shard import read_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("imagenet", "small")
FORMATS = ("auto", "imagefolder", "filelist", "shard")
_SUBSET_SEED = 0  # subsets are fixed across runs (independent of the run seed)



def output_size(preset: str, image_size: int | None = None) -> int:
    """The side of the images a pipeline gives: ``image_size``, else the preset's (224 for
    ``imagenet``, 32 for ``small``)."""
    return image_size or (224 if preset == "imagenet" else 32)

@dataclass(frozen=True)
class LoaderSpec:
    """What to load and how; the same spec serves train and eval (``build_loader(train=...)``).

    root:        dataset directory (see :mod:`.layout` for the three formats)
    format:      ``auto`` (detect), ``imagefolder``, ``filelist`` or ``shard``
    preset:      ``imagenet`` (224, random-resized-crop) or ``small`` (32, pad 4 + crop)
    batch_size:  per rank
    num_threads: DALI CPU worker threads per rank
    subset:      use only this many images of the split (a fixed random choice), for quick runs
    channels:    1 or 3 output channels; None = 3 for encoded files, the stored count for shards
    image_size:  output side; None = 224 (imagenet) / 32 (small)
    mean, std:   per-channel normalization on the 0..1 scale (one value = every channel);
                 None = the preset's default (see the module docstring)
    drop_last:   train only: drop the last partial batch (equal on every rank either way)
    augment:     train only: the preset's random augmentation; False = the eval transform
    exclude:     file formats: image paths (relative to ``root``, or absolute) left out of the
                 split before anything else (subset, sharding): the unreadable files a
                 ``data.skip_unreadable`` run skips. Give every rank the same set, and the shards
                 stay equal. Not for shards.
    """
    root: str | Path
    format: str = "auto"
    preset: str = "imagenet"
    batch_size: int = 64
    num_threads: int = 2
    subset: int | None = None
    channels: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    drop_last: bool = True
    augment: bool = True
    exclude: frozenset[str] = frozenset()

    def __post_init__(self):
        if not isinstance(self.exclude, frozenset):
            object.__setattr__(self, "exclude", frozenset(str(p) for p in self.exclude))
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}: expected one of {FORMATS}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r}: expected one of {PRESETS}")
        if self.batch_size < 1 or self.num_threads < 1:
            raise ValueError("batch_size and num_threads must be >= 1")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels {self.channels!r}: expected 1, 3 or None")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset {self.subset!r}: must be >= 1 (or None for all)")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size {self.image_size!r}: must be >= 1")


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, C, S, S)
    labels: torch.Tensor  # int64 (B,)


class EvalBatch(NamedTuple):
    images: torch.Tensor  # float32 (B, C, S, S)
    labels: torch.Tensor  # int64 (B,)
    valid: torch.Tensor   # bool (B,): False for padding repeated to even out the ranks


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_loader(spec: LoaderSpec, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: torch.device | str | None = None) -> "Loader":
    """The ``train`` or ``val`` split of ``spec.root`` as this rank's :class:`Loader`."""
    return Loader(spec, train=train, rank=rank, world_size=world_size, seed=seed, device=device)


class Loader:
    """An epoch-able iterator over one rank's shard; see the module docstring for the guarantees.

    Iterating continues from the current position (epoch, step): a full pass advances to the next
    epoch; :meth:`set_epoch` jumps to the start of an epoch; :meth:`state_dict` /
    :meth:`load_state_dict` save and restore a mid-epoch position. Evaluation loaders always run
    a whole pass.
    """

    def __init__(self, spec: LoaderSpec, *, train: bool, rank: int, world_size: int, seed: int,
                 device: torch.device | str | None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.spec, self.train, self.rank, self.world_size = spec, train, rank, world_size
        self.seed = int(seed)
        self.device = default_device() if device is None else torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device}: CUDA is not available")
            self._device_id = (self.device.index if self.device.index is not None
                               else torch.cuda.current_device())
            self.device = torch.device("cuda", self._device_id)
        elif self.device.type == "cpu":
            self._device_id = None
        else:
            raise ValueError(f"device {self.device}: expected cpu or cuda")

        self.split = "train" if train else "val"
        self.format = detect_format(spec.root) if spec.format == "auto" else spec.format
        if self.format == "shard":
            if spec.exclude:
                raise ValueError(f"{spec.root}: exclude lists files, a shard has none")
            manifest = read_manifest(spec.root)
            self._images, labels = manifest.load_split(self.split)
            self._files = None
            self.classes = manifest.classes
            stored = self._images.shape[-1]
            stats = (manifest.mean, manifest.std)
        else:
            listing: FileSplit = list_split(spec.root, self.split, self.format)
            self._images, self._files, labels = None, listing.files, listing.labels
            if spec.exclude:
                self._files, labels = _without(listing, spec.root, spec.exclude, self.split)
            self.classes = listing.classes
            stored, stats = 3, None
        #: images of the split left out by ``spec.exclude``
        self.excluded = 0 if self._files is None else len(listing.files) - len(self._files)
        self.labels = np.asarray(labels, dtype=np.int64)  # of every sample, by dataset index
        self.channels = spec.channels or stored
        self._stored_channels = stored
        self.image_size = output_size(spec.preset, spec.image_size)
        self.mean, self.std = self._normalization(stats)

        total = len(self.labels)
        if spec.subset is not None and spec.subset < total:
            chosen = np.random.default_rng(_SUBSET_SEED).permutation(total)[:spec.subset]
            self._selected = np.sort(chosen)
        else:
            self._selected = np.arange(total)
        n = len(self._selected)
        bs = spec.batch_size
        if train:
            self.samples_per_rank = n // world_size
            if self.samples_per_rank == 0:
                raise ValueError(f"{n} training images cannot be split over {world_size} ranks")
            if spec.drop_last:
                self._steps = self.samples_per_rank // bs
                if self._steps == 0:
                    raise ValueError(
                        f"batch_size {bs} > {self.samples_per_rank} training images per rank "
                        "(lower batch_size, or drop_last=False)")
            else:
                self._steps = math.ceil(self.samples_per_rank / bs)
        else:
            self.samples_per_rank = math.ceil(n / world_size)  # padded to this on every rank
            self._steps = math.ceil(self.samples_per_rank / bs)
        self._epoch, self._step = 0, 0
        self._dali: EpochRunner | None = None  # built on first iteration, kept

    # ----------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_samples(self) -> int:
        """Images in the split (after ``subset``), over all ranks."""
        return len(self._selected)

    @property
    def subset_indices(self) -> np.ndarray:
        """Dataset indices (positions in ``labels``) of the images in use: all, or ``subset``."""
        return self._selected

    @property
    def files(self) -> tuple[str, ...] | None:
        """Image paths by dataset index (file formats); None for a shard."""
        return self._files

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self._steps

    def __repr__(self) -> str:
        return (f"Loader({self.split}, {self.format}, preset={self.spec.preset}, "
                f"{self.num_samples} images, rank {self.rank}/{self.world_size}, "
                f"{len(self)} steps x {self.spec.batch_size}, device={self.device})")

    # ------------------------------------------------------------------------ position / resume
    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Positions the loader at ``step`` of ``epoch``; the next iteration starts there."""
        if epoch < 0 or not 0 <= step <= self._steps:
            raise ValueError(f"epoch {epoch} step {step}: out of range (steps {self._steps})")
        self._epoch, self._step = int(epoch), int(step)
        if self._step == self._steps:
            self._epoch, self._step = self._epoch + 1, 0

    def state_dict(self) -> dict:
        """The position of the next batch plus what must match to resume it exactly."""
        return {"epoch": self._epoch, "step": self._step, "seed": self.seed,
                "world_size": self.world_size, "num_samples": self.num_samples,
                "batch_size": self.spec.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "num_samples", "batch_size"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {mine}: "
                                 "the saved position would select different samples")
        self.set_epoch(int(state["epoch"]), int(state["step"]))

    # -------------------------------------------------------------------------------- sharding
    def epoch_indices(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, valid)`` this rank reads in ``epoch``, in order, one per output sample:
        dataset indices (positions in ``self.labels``) and whether each is a real sample
        (False only for eval padding)."""
        epoch = self._epoch if epoch is None else epoch
        n, w, r, bs = self.num_samples, self.world_size, self.rank, self.spec.batch_size
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            per_rank = self._steps * bs if self.spec.drop_last else self.samples_per_rank
            full = min(per_rank // bs, self._steps)  # whole per-rank batches of this epoch
            head = order[:full * bs * w].reshape(full, w, bs)[:, r, :].ravel()
            tail_size = per_rank - full * bs  # a last partial batch (drop_last=False only)
            start = full * bs * w + r * tail_size
            mine = np.concatenate([head, order[start:start + tail_size]])
            valid = np.ones(len(mine), dtype=bool)
        else:
            real = np.arange(r, n, w)
            pad = self.samples_per_rank - len(real)
            filler = real[-1] if len(real) else 0
            mine = np.concatenate([real, np.full(pad, filler, dtype=real.dtype)])
            valid = np.arange(len(mine)) < len(real)
        return self._selected[mine], valid

    # ------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch | EvalBatch]:
        if not self.train:
            self._step = 0
        epoch, start = self._epoch, self._step
        bs = self.spec.batch_size
        indices, valid = self.epoch_indices(epoch)
        # Per-sample keyed augmentation starts anywhere; a pipeline-seeded one must replay the
        # epoch from its start and skip what was already used (see the module docstring).
        replayed = self.train and self.spec.augment and not self._keyed_augmentation
        skip = start if replayed else 0
        indices, valid = indices[(start - skip) * bs:], valid[(start - skip) * bs:]
        if len(indices) == 0:
            return
        keys = (augmentation_keys(self.seed, epoch, len(self.labels))
                if self._keyed_augmentation else None)
        valid_t = torch.from_numpy(valid).to(self.device)
        batches = self._runner().batches(indices, keys, self._pipeline_seed(epoch))
        for k, (images, labels) in enumerate(batches):
            if k < skip:
                continue
            n = min(bs, len(indices) - k * bs)  # the last batch is padded to full size
            images, labels = to_torch(images)[:n], to_torch(labels).reshape(-1)[:n].long()
            step = start - skip + k
            self._epoch, self._step = ((epoch + 1, 0) if step + 1 == self._steps
                                       else (epoch, step + 1))
            if self.train:
                yield Batch(images, labels)
            else:
                yield EvalBatch(images, labels, valid_t[k * bs:k * bs + n])

    @property
    def pipelines_built(self) -> int:
        """DALI pipelines this loader has built: 1 once it has iterated, however many epochs
        (more only after a DALI error, or where the installed DALI cannot be re-seeded)."""
        return 0 if self._dali is None else self._dali.builds

    @property
    def _keyed_augmentation(self) -> bool:
        """Whether augmentation is drawn per sample (small preset on a shard), not by DALI."""
        return self.train and self.spec.augment and self.format == "shard" and \
            self.spec.preset == "small"

    def _pipeline_seed(self, epoch: int) -> int:
        state = np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)
        return int(state[0] & 0x7FFFFFFF)

    def _normalization(self, stats) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean, std = self.spec.mean, self.spec.std
        if mean is None or std is None:
            if self.spec.preset == "imagenet":
                default = (IMAGENET_MEAN, IMAGENET_STD)
            elif stats is not None:
                default = stats
            else:
                default = ((0.5,), (0.5,))
            mean = default[0] if mean is None else mean
            std = default[1] if std is None else std

        def per_channel(values, what):
            values = tuple(float(v) for v in values)
            if len(values) == self.channels:
                return values
            if len(values) == 1:
                return values * self.channels
            if self.channels == 1:  # e.g. ImageNet's RGB statistics for a grey output
                return (sum(values) / len(values),)
            raise ValueError(f"{what} {values}: expected 1 or {self.channels} values")

        mean, std = per_channel(mean, "mean"), per_channel(std, "std")
        if min(std) <= 0:
            raise ValueError(f"std {std}: must be > 0")
        return mean, std

    # -------------------------------------------------------------------------------- pipeline
    def _runner(self) -> EpochRunner:
        """The rank's DALI pipeline runner, created on first use and kept for every epoch."""
        if self._dali is None:
            spec = self.spec
            config = GraphConfig(
                preset=spec.preset, augment=self.train and spec.augment,
                keyed=self._keyed_augmentation, from_files=self._files is not None,
                channels=self.channels, stored_channels=self._stored_channels,
                image_size=self.image_size, mean=self.mean, std=self.std,
                batch_size=spec.batch_size, num_threads=spec.num_threads,
                device_id=self._device_id)
            self._dali = EpochRunner(config, files=self._files, shard_images=self._images,
                                     dataset_labels=self.labels)
        return self._dali


def _without(listing: FileSplit, root, exclude: frozenset[str],
             split: str) -> tuple[tuple[str, ...], np.ndarray]:
    """``listing``'s files and labels minus ``exclude`` (paths relative to ``root``)."""
    base = os.path.abspath(root)
    drop = {os.path.normpath(os.path.join(base, path)) for path in exclude}
    keep = np.fromiter((os.path.normpath(f) not in drop for f in listing.files), dtype=bool,
                       count=len(listing.files))
    if not keep.any():
        raise LayoutError(f"{root}: every {split} image is excluded (unreadable)")
    return tuple(f for f, k in zip(listing.files, keep) if k), listing.labels[keep]


__all__ = ["LoaderSpec", "Loader", "Batch", "EvalBatch", "build_loader", "default_device",
           "IMAGENET_MEAN", "IMAGENET_STD", "LayoutError"]
