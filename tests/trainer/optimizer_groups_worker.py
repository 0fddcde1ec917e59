"""Worker for test_optimizer_groups, run under torchrun (gloo, CPU). Writes ``<out>.<rank>.json``.

``groups ROOT OUT``: the real training loop (DeepSpeed engine, ZeRO stage 0 and then 1) trains a
tiny decoupled VGG-7 with binary weights for 2 steps under AdamW with per-role parameter groups;
reports, per ZeRO stage, the optimizer's groups as the engine holds them after the steps (role,
LR, weight decay, betas, element count) and a digest of the trained weights.
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
from binaryduo.trainer.runtime.preemption import Preemption
from binaryduo.trainer.runtime.sync_batchnorm import synchronize_batchnorm

BATCH = 16  # global
OPTIONS = {"width_mult": 0.25, "num_classes": 10, "in_channels": 1, "weight_bits": 1}


def _recipe(root: str, zero_stage: int) -> Recipe:
    return Recipe.model_validate({
        "name": "groups", "seed": 0,
        "model": {"name": "vgg7", "options": OPTIONS},
        "data": {"root": root, "preset": "small", "channels": 1, "batch_size": BATCH,
                 "train_subset": 2 * BATCH},
        "deepspeed": {"zero_stage": zero_stage},
        "stages": [{"name": "bnn", "variant": "bnn", "epochs": 1,
                    "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05,
                                  "betas": [0.8, 0.99],
                                  "groups": {"binary_layers": {"weight_decay": 0.0},
                                             "norm_and_bias": {"lr_mult": 0.5,
                                                               "weight_decay": 0.0}}}}]})


def _train(root: str, ctx, zero_stage: int) -> dict:
    recipe = _recipe(root, zero_stage)
    torch.manual_seed(0)
    model = models.build("vgg7", "bnn", **OPTIONS)
    if ctx.world_size > 1:
        synchronize_batchnorm(model)
    feed = DataFeed(recipe.data, ctx)
    engine = make_engine(model, recipe.stages[0], recipe, ctx=ctx,
                         per_rank_batch=feed.per_rank_batch)
    preemption = Preemption()
    try:
        sums = train_epoch(engine, feed.train(seed=5, epoch=0), ctx=ctx, dtype=torch.float32,
                           lr_at=lambda step: 0.01 * (step + 1), first_step=0, log_every=0,
                           on_log=lambda *_: None, stop=preemption)
    finally:
        preemption.restore()
    groups = [{"role": group["role"], "lr": group["lr"], "weight_decay": group["weight_decay"],
               "betas": list(group["betas"]),
               "numel": sum(p.numel() for p in group["params"])}
              for group in engine.optimizer.param_groups]
    weights = {name: float(p.detach().double().sum()) for name, p in
               engine.module.named_parameters()}
    return {"steps": sums.steps, "groups": groups, "weights": weights}


def groups(root: str, out: str) -> None:
    ctx = init_distributed()
    try:
        result = {str(stage): _train(root, ctx, stage) for stage in (0, 1)}
        with open(f"{out}.{ctx.rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        teardown()


if __name__ == "__main__":
    {"groups": groups}[sys.argv[1]](*sys.argv[2:])
