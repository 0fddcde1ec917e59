"""Worker for test_health_run, run under torchrun (gloo, CPU). Writes ``<out>.<rank>.json``.

``syncs ROOT OUT``: the real training loop (as loop_worker.py: DeepSpeed engine, global-batch BN,
a preemption handler, bf16 autocast) with health metrics on, for epochs of 2 and of 4 steps;
reports the host reads each epoch made, the epoch's health metrics (a collective) and what the
loop logged; the 4-step epoch again with ``health.log_steps`` (health every 2 steps).
"""
import json
import sys

import torch

from binaryduo import models
from binaryduo.trainer.recipe import DataSection
from binaryduo.trainer.recipe.schema import HealthSection
from binaryduo.trainer.run.deepspeed_engine import make_engine
from binaryduo.trainer.run.feed import DataFeed
from binaryduo.trainer.run.health import StageHealth
from binaryduo.trainer.run.loop import train_epoch
from binaryduo.trainer.runtime.distributed import init_distributed, teardown
from binaryduo.trainer.runtime.host_syncs import count_host_syncs
from binaryduo.trainer.runtime.preemption import Preemption
from binaryduo.trainer.runtime.sync_batchnorm import synchronize_batchnorm

from loop_worker import BATCH, _recipe


def _epoch(recipe, ctx, steps: int, log_steps: bool = False) -> tuple[list[str], list[str], dict]:
    torch.manual_seed(0)
    model = models.build("vgg7", "coupled", width_mult=0.25, num_classes=10, in_channels=1)
    if ctx.world_size > 1:
        synchronize_batchnorm(model)
    feed = DataFeed(DataSection(**{**recipe.data.model_dump(), "train_subset": BATCH * steps}),
                    ctx)
    engine = make_engine(model, recipe.stages[0], recipe, ctx=ctx,
                         per_rank_batch=feed.per_rank_batch)
    health = StageHealth(HealthSection(log_steps=log_steps), engine.module, ctx)
    logged = []
    health.epoch_started()
    preemption = Preemption()
    try:
        with count_host_syncs(ctx.device) as reads:
            sums = train_epoch(engine, feed.train(seed=5, epoch=0), ctx=ctx,
                               dtype=torch.bfloat16, lr_at=lambda _: 0.01, first_step=0,
                               log_every=2, on_log=lambda step, m: logged.append((step, m)),
                               stop=preemption,
                               health=health)
        with count_host_syncs(ctx.device) as epoch_end:
            metrics = health.epoch_metrics()
    finally:
        preemption.restore()
    assert sums.steps == steps, sums
    return reads.calls, epoch_end.calls, metrics, logged


def syncs(root: str, out: str) -> None:
    ctx = init_distributed()
    try:
        recipe = _recipe(root)
        result = {}
        for steps, log_steps in ((2, False), (4, False), (4, True)):
            step_reads, end_reads, metrics, logged = _epoch(recipe, ctx, steps, log_steps)
            result[f"{steps}{'-logged' if log_steps else ''}"] = {
                "reads": step_reads, "epoch_end": end_reads, "metrics": metrics,
                "logged": logged}
        with open(f"{out}.{ctx.rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        teardown()


if __name__ == "__main__":
    {"syncs": syncs}[sys.argv[1]](*sys.argv[2:])
