"""Two real gloo ranks (torchrun): exact distributed evaluation, BN sync, disjoint equal shards."""
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_eval_worker.py")

pytestmark = pytest.mark.slow


def test_two_ranks_count_every_validation_image_once(tmp_path, fashion_mnist, torchrun_worker):
    (single,) = torchrun_worker(WORKER, 1, fashion_mnist, tmp_path / "one", out=tmp_path / "one")
    pair = torchrun_worker(WORKER, 2, fashion_mnist, tmp_path / "two", out=tmp_path / "two")
    assert single["images"] == 101
    assert [r["images"] for r in pair] == [101, 101]  # summed over ranks, an odd count, once each
    assert pair[0]["top1"] == pair[1]["top1"]
    # the models differ only in BN means, synced to the average of ranks 0 and 1 (0 and 0.1)
    assert pair[0]["bn_mean"] == pair[1]["bn_mean"] == pytest.approx(0.05)
    assert pair[0]["train_steps"] == pair[1]["train_steps"] == 4  # 64 images: 32 per rank, global batch 16 = 8 per rank
    shards = [set(r["train_indices"]) for r in pair]
    assert not shards[0] & shards[1]
    assert len(shards[0]) == len(shards[1])
