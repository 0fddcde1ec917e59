"""The recipe's data section turned into this rank's DALI loaders (``binaryduo.data``), after a
pre-flight check of the dataset (:func:`check_data`)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from binaryduo.data.pipelines import LoaderSpec, build_loader

from binaryduo.trainer.runtime.distributed import DistributedContext, on_main_then_broadcast
from binaryduo.trainer.recipe import DataSection, RecipeError

#: --smoke: this many steps per epoch (and one evaluation batch per rank).
SMOKE_STEPS = 2
#: Unreadable files / empty class folders named in the refusal or warning line (the rest counted).
NAMED = 5


class DatasetRefused(RecipeError):
    """The pre-flight check found unreadable files (without ``data.skip_unreadable``) or a broken
    layout: bad input, reported like a recipe problem (one line each, exit status 2)."""


@dataclass(frozen=True)
class DataCheck:
    """The pre-flight verdict, the same on every rank."""

    root: str
    summary: str                       # the check's summary line
    skipped: tuple[str, ...] = ()      # unreadable files left out (paths relative to root)
    skipped_lines: tuple[str, ...] = ()  # ``kind: path: reason`` of each, for the record
    warnings: tuple[str, ...] = ()


def _named(paths: list[str], total: int) -> str:
    more = f" and {total - len(paths)} more" if total > len(paths) else ""
    return ", ".join(paths) + more


def _verdict(data: DataSection) -> DataCheck | list[str]:
    """Rank 0's check of ``data.root`` (``binaryduo data check``'s quick depth): a
    :class:`DataCheck`, or the problem lines that refuse the dataset."""
    from binaryduo.data.check import check_dataset, default_cache_dir

    root = Path(data.root)
    try:
        report = check_dataset(root, depth="quick", cache_dir=default_cache_dir())
    except NotADirectoryError:
        return [f"dataset directory {data.root} does not exist"]
    refusal = [f"dataset {data.root}: {p.format()}" for p in report.structural
               if p.kind != "empty-class"]
    bad = report.unreadable
    named = _named([f"{p.path} ({p.kind})" for p in bad[:NAMED]], len(bad))
    if bad and not data.skip_unreadable:
        kinds = {}
        for p in bad:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        refusal.append(f"dataset {data.root}: {len(bad)} unreadable image file(s) ({counts}), "
                       f"DALI would stop on them: {named}; `binaryduo data check {data.root}` "
                       f"lists them all; set data.skip_unreadable: true to train without them")
    if refusal:
        return refusal
    warnings = []
    empty = [p.path for p in report.structural if p.kind == "empty-class"]
    if empty:
        warnings.append(f"{len(empty)} class folder(s) of {data.root} hold no image (they keep "
                        f"their class index, with no samples): {_named(empty[:NAMED], len(empty))}")
    if bad:
        warnings.append(f"skipping {len(bad)} unreadable image file(s) of {data.root} "
                        f"(data.skip_unreadable): {named}")
    return DataCheck(str(root), report.summary(),
                     skipped=tuple(os.path.relpath(p.path, root) for p in bad),
                     skipped_lines=tuple(p.format() for p in bad), warnings=tuple(warnings))


def check_data(data: DataSection, ctx: DistributedContext) -> DataCheck:
    """The pre-flight dataset check: rank 0 checks (see ``binaryduo.data.check``; cached in the
    user cache directory), every rank receives the same verdict, so every rank refuses alike
    (raises :class:`DatasetRefused`) or leaves out the same files. Call it before anything is
    written: it costs no model, engine, run directory or MLflow record."""
    verdict = on_main_then_broadcast(lambda: _verdict(data), ctx.is_main)
    if isinstance(verdict, list):
        raise DatasetRefused(verdict)
    if ctx.is_main:
        print(f"data check: {verdict.summary}", flush=True)
        for line in verdict.warnings:
            print(f"binaryduo: warning: {line}", file=sys.stderr, flush=True)
    return verdict


def batch_split_problem(data: DataSection, world_size: int) -> str | None:
    """Why the global batch cannot be cut into equal per-rank batches, or None."""
    if data.batch_size % world_size:
        return (f"data.batch_size {data.batch_size} (the global batch) does not split evenly "
                f"over {world_size} ranks")
    return None


class DataFeed:
    """Train loaders per stage (epoch order a pure function of the seed) and one val loader."""

    def __init__(self, data: DataSection, ctx: DistributedContext, *, smoke: bool = False,
                 exclude: tuple[str, ...] = ()):
        problem = batch_split_problem(data, ctx.world_size)
        if problem is not None:  # train.py refuses it before this point; other callers get it here
            raise ValueError(problem)
        self.data = data
        self.ctx = ctx
        #: unreadable files left out of both splits (``DataCheck.skipped``: the same on all ranks)
        self.exclude = frozenset(exclude)
        self.per_rank_batch = data.batch_size // ctx.world_size
        train_subset, val_subset = data.train_subset, data.val_subset
        if smoke:
            train_subset = self.per_rank_batch * ctx.world_size * SMOKE_STEPS
            val_subset = self.per_rank_batch * ctx.world_size
        self._train_spec = self._spec(train_subset)
        self._val_spec = self._spec(val_subset)
        self._train: dict[int, object] = {}
        self._val = None

    @property
    def subsets(self) -> dict[str, int | None]:
        """How many images of each split this feed reads (None: all of it)."""
        return {"train": self._train_spec.subset, "val": self._val_spec.subset}

    def _spec(self, subset: int | None) -> LoaderSpec:
        return LoaderSpec(root=Path(self.data.root), format=self.data.format,
                          preset=self.data.preset, batch_size=self.per_rank_batch,
                          num_threads=self.data.num_threads, subset=subset,
                          channels=self.data.channels, image_size=self.data.image_size,
                          augment=self.data.augment, exclude=self.exclude)

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
