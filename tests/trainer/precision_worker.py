"""Worker for test_precision, run under torchrun (gloo, CPU). Writes ``<out>.<rank>.json``.

``bn ROOT OUT STEPS``: the same STEPS Fashion-MNIST batches through the real training loop of a
tiny coupled VGG-7, once in fp32 and once in bf16, learning rate 0 (so both see the same weights
and only the arithmetic differs); reports BN running statistics, dtypes, the engine's
gradient-reduction dtype, and how far each BN's running statistics are from a float64 moving
average of the batch statistics that BN was actually fed (its inputs, hooked). (The old code's
numbers in test_precision were measured with this worker before make_engine lost its ``dtype``
argument: the engine is float32 whatever the precision.)

``dropout OUT``: an AlexNet's dropout masks on this rank for (seed 7, stage 1, epoch 3), twice.
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


def _recipe(root: str) -> Recipe:
    return Recipe.model_validate({
        "name": "bn-precision", "seed": 0,
        "model": {"name": "vgg7", "options": {"width_mult": 0.25, "num_classes": 10,
                                               "in_channels": 1}},
        "data": {"root": root, "preset": "small", "channels": 1, "batch_size": 32},
        "stages": [{"name": "coupled", "variant": "coupled", "epochs": 1,
                    "optimizer": {"lr": 0.1}}]})


def _bn_run(recipe: Recipe, ctx, dtype: torch.dtype, steps: int) -> dict:
    torch.manual_seed(0)
    model = models.build("vgg7", "coupled", width_mult=0.25, num_classes=10, in_channels=1)
    feed = DataFeed(DataSection(**{**recipe.data.model_dump(), "train_subset": 32 * steps}), ctx)
    engine = make_engine(model, recipe.stages[0], recipe, ctx=ctx,
                         per_rank_batch=feed.per_rank_batch)
    bns = [m for m in engine.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # the reference: a float64 moving average of what each BN was fed, batch by batch
    reference = [[torch.zeros(m.num_features, dtype=torch.float64),
                  torch.ones(m.num_features, dtype=torch.float64)] for m in bns]

    def follow(index):
        def hook(module, inputs):
            if module.training:
                x = inputs[0].detach().double()
                mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
                for slot, value in enumerate((mean, var)):
                    reference[index][slot] = 0.9 * reference[index][slot] + 0.1 * value
        return hook

    hooks = [m.register_forward_pre_hook(follow(i)) for i, m in enumerate(bns)]
    train_epoch(engine, feed.train(seed=5, epoch=0), ctx=ctx, dtype=dtype, lr_at=lambda _: 0.0,
                first_step=0, log_every=0, on_log=lambda *_: None)
    for hook in hooks:
        hook.remove()
    state = engine.module.state_dict()
    var_error = max(float(((m.running_var.double() - ref[1]).abs() / ref[1]).max())
                    for m, ref in zip(bns, reference))
    mean_error = max(float((m.running_mean.double() - ref[0]).abs().max() / ref[0].abs().max())
                     for m, ref in zip(bns, reference))
    return {
        "var_vs_fed": var_error, "mean_vs_fed": mean_error,
        "running_mean": [m.running_mean.double().tolist() for m in bns],
        "running_var": [m.running_var.double().tolist() for m in bns],
        "buffer_dtypes": sorted({str(m.running_var.dtype) for m in bns}),
        "state_dtypes": sorted({str(t.dtype) for t in state.values() if t.is_floating_point()}),
        "comm_dtype": str(getattr(engine, "communication_data_type", None)),
    }


def bn(root: str, out: str, steps: str) -> None:
    ctx = init_distributed()
    try:
        recipe = _recipe(root)
        result = {name: _bn_run(recipe, ctx, dtype, int(steps))
                  for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        with open(f"{out}.{ctx.rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        teardown()


def dropout_masks() -> list[list[int]]:
    """The masks of an AlexNet's two dropout layers (units zeroed that were not zero), drawn
    from the current torch generator state; the model and images are fixed."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = models.build("alexnet", "bnn", num_classes=10).train()
    torch.set_rng_state(generator_state)  # the draws come from the caller's seeding
    masks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda _m, inputs, output: masks.append(
                (output == 0) & (inputs[0] != 0)))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(images)
    return [mask.flatten().int().tolist() for mask in masks]


def dropout(out: str) -> None:
    from binaryduo.trainer.run.state import seed_model_randomness

    ctx = init_distributed()
    try:
        draws = []
        for _ in range(2):  # the same epoch twice: a rerun must draw the same masks
            seed_model_randomness(7, 1, 3, ctx.rank)
            draws.append(dropout_masks())
        with open(f"{out}.{ctx.rank}.json", "w") as handle:
            json.dump({"rank": ctx.rank, "draws": draws}, handle)
    finally:
        teardown()


if __name__ == "__main__":
    {"bn": bn, "dropout": dropout}[sys.argv[1]](*sys.argv[2:])
