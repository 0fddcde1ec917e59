"""Worker for test_distributed: run under torchrun; evaluates a seeded model on the val split."""
import json
import sys

import torch

from binaryduo import models
from binaryduo.trainer.runtime.distributed import init_distributed, sync_batchnorm_statistics, teardown
from binaryduo.trainer.run.feed import DataFeed
from binaryduo.trainer.run.loop import evaluate
from binaryduo.trainer.recipe import DataSection


def main(root: str, out: str) -> None:
    ctx = init_distributed()
    try:
        data = DataSection(root=root, preset="small", channels=1, batch_size=16, val_subset=101,
                           train_subset=64)
        feed = DataFeed(data, ctx)
        torch.manual_seed(0)
        model = models.build("vgg7", "bnn", width_mult=0.25, in_channels=1)
        # rank-dependent BN statistics, as after training on different shards
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(0.1 * ctx.rank)
        sync_batchnorm_statistics(model)
        stats = evaluate(model, feed.val(), ctx=ctx, dtype=torch.float32)
        means = [m.running_mean[0].item() for m in model.modules()
                 if isinstance(m, torch.nn.BatchNorm2d)]
        train_len = len(feed.train(seed=3, epoch=0))
        indices = feed.train(seed=3, epoch=0).epoch_indices(0)[0].tolist()
        with open(f"{out}.{ctx.rank}.json", "w") as handle:
            json.dump({"rank": ctx.rank, "world": ctx.world_size, "images": stats.images,
                       "top1": stats.top1, "top5": stats.top5, "bn_mean": means[0],
                       "train_steps": train_len, "train_indices": indices}, handle)
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
