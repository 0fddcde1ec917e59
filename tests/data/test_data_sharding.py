"""Sharding over ranks: equal, disjoint training shards; evaluation counting each image once.

Both ranks' loaders are built in one process (DALI runs several pipelines side by side), and once
more in two real processes that know only their own rank."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import torch

from binaryduo.data.pipelines import LoaderSpec, build_loader

ODD = 1001  # images: odd, not a multiple of 2 ranks nor of the batch size


def spec(root, **kw):
    return LoaderSpec(root, preset="small", channels=3, batch_size=kw.pop("batch_size", 64),
                      subset=kw.pop("subset", ODD), **kw)


def run_train(loader):
    labels = [b.labels.clone() for b in loader]
    return torch.cat(labels).numpy(), [len(x) for x in labels]


def test_train_shards_equal_and_disjoint_in_one_process(fashion_mnist_root):
    ranks = [build_loader(spec(fashion_mnist_root), train=True, rank=r, world_size=2, seed=5)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 500 // 64 == 7
    for epoch in (0, 1):
        shards = [loader.epoch_indices(epoch)[0] for loader in ranks]
        assert len(shards[0]) == len(shards[1]) == 7 * 64
        assert not set(shards[0]) & set(shards[1])                 # disjoint
        assert len(set(shards[0])) == len(shards[0])               # no repeats within a rank
        for loader, shard in zip(ranks, shards):
            loader.set_epoch(epoch)
            labels, sizes = run_train(loader)
            assert sizes == [64] * 7                               # same steps, same sizes
            np.testing.assert_array_equal(labels, loader.labels[shard])  # reads what it says
    # every epoch draws a fresh split of the data
    assert not np.array_equal(ranks[0].epoch_indices(0)[0], ranks[0].epoch_indices(1)[0])


def count_eval(loaders):
    """Runs every rank's eval loader; returns (label counts over valid samples, steps per rank,
    total valid)."""
    counts, steps, total = Counter(), [], 0
    for loader in loaders:
        n = 0
        for images, labels, valid in loader:
            assert images.shape[0] == labels.shape[0] == valid.shape[0]
            counts.update(labels[valid].tolist())
            total += int(valid.sum())
            n += 1
        steps.append(n)
    return counts, steps, total


def test_eval_counts_every_image_once_over_two_ranks(fashion_mnist_root):
    loaders = [build_loader(spec(fashion_mnist_root), train=False, rank=r, world_size=2)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 8  # ceil(501 / 64)
    real = np.concatenate([l.epoch_indices()[0][l.epoch_indices()[1]] for l in loaders])
    assert len(real) == ODD and len(set(real)) == ODD
    assert set(real) == set(loaders[0].subset_indices)
    padded = [int((~l.epoch_indices()[1]).sum()) for l in loaders]
    assert padded == [0, 1]  # rank 0 holds 501 real images, rank 1 500 + 1 padding

    counts, steps, total = count_eval(loaders)
    assert steps == [8, 8] and total == ODD
    assert counts == Counter(loaders[0].labels[loaders[0].subset_indices].tolist())


def test_eval_on_imagenet_tree_odd_count_over_two_ranks(imagenet_tree):
    loaders = [build_loader(LoaderSpec(imagenet_tree, batch_size=4), train=False, rank=r,
                            world_size=2) for r in range(2)]
    counts, steps, total = count_eval(loaders)
    assert total == 19 and steps == [3, 3]
    assert counts == Counter(range(19))  # one photo per class, each counted once


WORKER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from binaryduo.data.pipelines import LoaderSpec, build_loader
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    root, out, subset = sys.argv[1:]
    spec = LoaderSpec(root, preset="small", channels=3, batch_size=64, subset=int(subset))
    train = build_loader(spec, train=True, rank=rank, world_size=world, seed=11)
    labels = np.concatenate([b.labels.numpy() for b in train])
    indices = train.epoch_indices(0)[0]
    evaluation = build_loader(spec, train=False, rank=rank, world_size=world)
    eval_labels, valid, steps = [], [], 0
    for images, y, v in evaluation:
        eval_labels.append(y.numpy()); valid.append(v.numpy()); steps += 1
    np.savez(out, train_labels=labels, train_indices=indices, train_steps=len(train),
             eval_labels=np.concatenate(eval_labels), valid=np.concatenate(valid),
             eval_steps=steps, all_labels=train.labels)
""")


def test_two_real_processes(fashion_mnist_root, tmp_path):
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(fashion_mnist_root), str(tmp_path / f"{rank}.npz"),
             str(ODD)], env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    r0, r1 = (np.load(tmp_path / f"{rank}.npz") for rank in range(2))
    assert int(r0["train_steps"]) == int(r1["train_steps"]) == 7
    assert len(r0["train_labels"]) == len(r1["train_labels"]) == 7 * 64
    assert not set(r0["train_indices"]) & set(r1["train_indices"])
    for r in (r0, r1):
        np.testing.assert_array_equal(r["train_labels"], r0["all_labels"][r["train_indices"]])
    assert int(r0["eval_steps"]) == int(r1["eval_steps"]) == 8
    assert int(r0["valid"].sum()) + int(r1["valid"].sum()) == ODD
    seen = Counter(r0["eval_labels"][r0["valid"]].tolist()) \
        + Counter(r1["eval_labels"][r1["valid"]].tolist())
    # the subset is a fixed choice: the in-process loader selects the same images
    reference = build_loader(spec(fashion_mnist_root), train=False)
    assert seen == Counter(reference.labels[reference.subset_indices].tolist())


def _images(loader):
    return [b.images.clone() for b in loader]


def test_global_batches_and_augmentation_do_not_depend_on_the_world_size(fashion_mnist_root):
    """Step k on 2 ranks x 32 reads the samples of step k on 1 rank x 64, with the same random
    crops and flips (drawn per sample), pixel for pixel."""
    one = build_loader(spec(fashion_mnist_root, batch_size=64), train=True, seed=3)
    two = [build_loader(spec(fashion_mnist_root, batch_size=32), train=True, rank=r,
                        world_size=2, seed=3) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 15
    single = _images(one)
    pair = [_images(loader) for loader in two]
    for k in range(len(one)):
        union = torch.cat([pair[0][k], pair[1][k]])
        assert torch.equal(union, single[k]), f"step {k}"
    indices = [loader.epoch_indices(0)[0] for loader in two]
    assert not set(indices[0]) & set(indices[1])
    # and the augmentation is really there: a sample's crop differs between epochs
    one.set_epoch(1)
    assert not torch.equal(torch.cat(_images(one)).sum(0), torch.cat(single).sum(0))


def test_resume_mid_epoch_is_pixel_exact_for_keyed_and_replayed_augmentation(
        fashion_mnist_root, imagenet_tree):
    """A loader positioned at step 3 of epoch 1 yields exactly the images an uninterrupted
    loader yields from there: per-sample keys (shard, small preset) and a replayed pipeline
    (files, imagenet preset, DALI's random-crop decoder)."""
    specs = [spec(fashion_mnist_root, batch_size=64, subset=640),
             LoaderSpec(imagenet_tree, preset="imagenet", batch_size=4, image_size=64)]
    for loader_spec in specs:
        whole = build_loader(loader_spec, train=True, seed=9)
        whole.set_epoch(1)
        expected = _images(whole)
        assert len(expected) >= 4
        resumed = build_loader(loader_spec, train=True, seed=9)
        resumed.set_epoch(1, 3)
        rest = _images(resumed)
        assert len(rest) == len(expected) - 3
        for got, want in zip(rest, expected[3:]):
            assert torch.equal(got, want), loader_spec.preset
