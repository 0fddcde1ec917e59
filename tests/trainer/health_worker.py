"""Worker for test_health_run, run under torchrun (gloo, CPU). Writes ``<out>.<rank>.json``.

``syncs ROOT OUT``: the real training loop (loop_worker.py's tiny engine: DeepSpeed,
global-batch BN; a preemption handler, bf16 autocast) with health metrics on, for epochs of 2
and of 4 steps; reports the host reads each epoch made, the epoch's health metrics (a
collective) and what the loop logged; the 4-step epoch again with ``health.log_steps`` (health
every 2 steps).
"""
import json
import sys

import torch

from binaryduo.trainer.recipe.schema import HealthSection
from binaryduo.trainer.run.health import StageHealth
from binaryduo.trainer.run.loop import train_epoch
from binaryduo.trainer.runtime.distributed import init_distributed, teardown
from binaryduo.trainer.runtime.host_syncs import count_host_syncs
from binaryduo.trainer.runtime.preemption import Preemption

from loop_worker import _recipe, tiny_engine


def _epoch(recipe, ctx, steps: int, log_steps: bool = False) -> tuple[list[str], list[str], dict]:
    engine, feed = tiny_engine(recipe, ctx, steps)
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
