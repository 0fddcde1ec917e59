"""The recipe's ``data.image_size`` reaches the pipeline: ``DataFeed`` (what ``binaryduo train``
and benchmarks/train_throughput.py feed from) gives images of that side, train and validation,
and without the key the preset's (32 for ``small``), as before the key existed."""
from __future__ import annotations

import pytest
import torch

from binaryduo.trainer.recipe import load_recipe
from binaryduo.trainer.run.feed import DataFeed
from binaryduo.trainer.runtime.distributed import DistributedContext

ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("overrides,side", [
    ([], 32),
    # a model built for 40x40 (validation refuses a size the model is not built for)
    (["data.image_size=40", "model.name=resnet18", "model.options.input_size=40"], 40)])
def test_data_image_size_sets_the_side_of_the_feed_images(tmp_path, fashion_mnist,
                                                          tiny_recipe_text, overrides, side):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_recipe_text.replace("DATA", str(fashion_mnist)))
    # a small subset: one batch of each split is all the test reads
    recipe = load_recipe(path, [*overrides, "data.batch_size=8", "data.train_subset=8",
                                "data.val_subset=8"])
    feed = DataFeed(recipe.data, ONE_PROCESS)
    for loader in (feed.train(seed=0, epoch=0), feed.val()):
        images = next(iter(loader))[0]
        assert tuple(images.shape) == (8, 1, side, side)
