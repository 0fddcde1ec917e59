"""The recipe's data section turned into this rank's DALI loaders (``binaryduo.data``)."""
from __future__ import annotations

from pathlib import Path

import torch

from binaryduo.data.pipelines import LoaderSpec, build_loader

from .distributed import DistributedContext
from .recipe import DataSection

#: --smoke: this many steps per epoch (and one evaluation batch per rank).
SMOKE_STEPS = 2


class DataFeed:
    """Train loaders per stage (epoch order a pure function of the seed) and one val loader."""

    def __init__(self, data: DataSection, ctx: DistributedContext, *, smoke: bool = False):
        if data.batch_size % ctx.world_size:
            raise ValueError(f"data.batch_size {data.batch_size} does not split evenly over "
                             f"{ctx.world_size} ranks")
        self.data = data
        self.ctx = ctx
        self.per_rank_batch = data.batch_size // ctx.world_size
        train_subset, val_subset = data.train_subset, data.val_subset
        if smoke:
            train_subset = self.per_rank_batch * ctx.world_size * SMOKE_STEPS
            val_subset = self.per_rank_batch * ctx.world_size
        self._train_spec = self._spec(train_subset)
        self._val_spec = self._spec(val_subset)
        self._train: dict[int, object] = {}
        self._val = None

    def _spec(self, subset: int | None) -> LoaderSpec:
        return LoaderSpec(root=Path(self.data.root), format=self.data.format,
                          preset=self.data.preset, batch_size=self.per_rank_batch,
                          num_threads=self.data.num_threads, subset=subset,
                          channels=self.data.channels, augment=self.data.augment)

    def train(self, seed: int, epoch: int, step: int = 0):
        """This rank's training loader at ``step`` of ``epoch`` of the stage seeded ``seed``."""
        loader = self._train.get(seed)
        if loader is None:
            self._train = {seed: build_loader(self._train_spec, train=True, rank=self.ctx.rank,
                                              world_size=self.ctx.world_size, seed=seed,
                                              device=self.ctx.device)}
            loader = self._train[seed]
        loader.set_epoch(epoch, step)
        return loader

    def steps_per_epoch(self, seed: int) -> int:
        return len(self.train(seed, 0))

    def val(self):
        if self._val is None:
            self._val = build_loader(self._val_spec, train=False, rank=self.ctx.rank,
                                     world_size=self.ctx.world_size, seed=0,
                                     device=self.ctx.device)
        return self._val

    def fixed_val_batch(self) -> torch.Tensor:
        """The first validation batch of this rank (real images only): the decoupling check's."""
        for images, _labels, valid in self.val():
            return images[valid.to(images.device).bool()]
        raise RuntimeError("the validation set is empty")
