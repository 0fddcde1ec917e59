"""Worker for test_host_syncs, run under torchrun (gloo, CPU). Writes ``<out>.<rank>.json``.

``syncs ROOT OUT``: the real training loop (DeepSpeed engine, global-batch BN over the ranks, a
preemption handler asked at every step) on a tiny coupled VGG-7 under bf16 autocast (the GPU
path; fp32 only drops the autocast context), for epochs of 2 and of 4 steps; reports the host reads of tensor values each epoch made
(:func:`binaryduo.trainer.runtime.host_syncs.count_host_syncs`), with their names.
"""
import json
import sys

import torch

from binaryduo import models
from binaryduo.trainer.recipe import DataSection, Recipe
from binaryduo.trainer.run.deepspeed_engine import make_engine
from binaryduo.trainer.run.feed import DataFeed
from binaryduo.trainer.run.loop import train_epoch
from binaryduo.trainer.runtime.distributed import init_distributed, teardown
from binaryduo.trainer.runtime.host_syncs import count_host_syncs
from binaryduo.trainer.runtime.preemption import Preemption
from binaryduo.trainer.runtime.sync_batchnorm import synchronize_batchnorm

BATCH = 16  # global


def _recipe(root: str) -> Recipe:
    return Recipe.model_validate({
        "name": "host-syncs", "seed": 0,
        "model": {"name": "vgg7", "options": {"width_mult": 0.25, "num_classes": 10,
                                               "in_channels": 1}},
        "data": {"root": root, "preset": "small", "channels": 1, "batch_size": BATCH},
        "stages": [{"name": "coupled", "variant": "coupled", "epochs": 1,
                    "optimizer": {"lr": 0.01}}]})


def tiny_engine(recipe: Recipe, ctx, steps: int):
    """(DeepSpeed engine, its data feed) of the tiny coupled VGG-7 for an epoch of ``steps``
    steps, seeded, with global-batch BN over the ranks (health_worker.py uses it too)."""
    torch.manual_seed(0)
    model = models.build("vgg7", "coupled", width_mult=0.25, num_classes=10, in_channels=1)
    if ctx.world_size > 1:
        synchronize_batchnorm(model)
    feed = DataFeed(DataSection(**{**recipe.data.model_dump(), "train_subset": BATCH * steps}),
                    ctx)
    engine = make_engine(model, recipe.stages[0], recipe, ctx=ctx,
                         per_rank_batch=feed.per_rank_batch)
    return engine, feed


def _epoch_reads(recipe: Recipe, ctx, dtype: torch.dtype, steps: int) -> list[str]:
    engine, feed = tiny_engine(recipe, ctx, steps)
    loader = feed.train(seed=5, epoch=0)
    preemption = Preemption()
    try:
        with count_host_syncs(ctx.device) as reads:
            sums = train_epoch(engine, loader, ctx=ctx, dtype=dtype, lr_at=lambda _: 0.01,
                               first_step=0, log_every=2, on_log=lambda *_: None,
                               stop=preemption)
    finally:
        preemption.restore()
    assert sums.steps == steps, sums
    return reads.calls


def syncs(root: str, out: str) -> None:
    ctx = init_distributed()
    try:
        recipe = _recipe(root)
        result = {str(steps): _epoch_reads(recipe, ctx, torch.bfloat16, steps) for steps in (2, 4)}
        with open(f"{out}.{ctx.rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        teardown()


if __name__ == "__main__":
    {"syncs": syncs}[sys.argv[1]](*sys.argv[2:])
