"""One DALI pipeline per loader, reused every epoch and re-seeded per epoch (issue 14).

The oracle is the pipeline built for one epoch with the epoch's seed (``dali_graph
.epoch_pipeline``, what every epoch used before): the persistent pipeline must give the same
batches bit for bit, its DALI-drawn crops and flips included, whatever came before it (whole
epochs, abandoned ones, a resume)."""
from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from binaryduo.data.dali_runner import Reseeder, ReseedUnsupported, seed_seq
from binaryduo.data.pipelines import LoaderSpec, build_loader


@pytest.fixture(scope="module")
def cifar_tree(foolbox_data, tmp_path_factory):
    """The small preset on encoded files: DALI draws its offsets and flips."""
    root = tmp_path_factory.mktemp("cifar") / "tree"
    for split in ("train", "val"):
        for path in sorted(foolbox_data.glob("cifar10_*.png")):
            folder = root / split / path.stem.split("_")[-1]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
    return root


@pytest.fixture
def dali_specs(imagenet_tree, fashion_mnist_root, cifar_tree):
    """Every graph whose augmentation DALI draws from the pipeline seed."""
    return {
        "files/imagenet": LoaderSpec(imagenet_tree, batch_size=4, image_size=48),
        "files/small": LoaderSpec(cifar_tree, preset="small", batch_size=3),
        "shard/imagenet": LoaderSpec(fashion_mnist_root, preset="imagenet", image_size=40,
                                     batch_size=16, subset=96, channels=3),
    }


def copies(batches):
    return [[t.clone() for t in batch] for batch in batches]


def take(loader, n):
    """The first ``n`` batches, the iteration then abandoned (its generator closed)."""
    return copies(itertools.islice(loader, n))


def per_epoch(loader):
    """``loader`` switched to building one pipeline per epoch: the pre-issue-14 behaviour."""
    loader._runner().persistent = False
    return loader


def assert_same(got, want, what):
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{what}: batch {k}"


def test_persistent_pipeline_reproduces_per_epoch_pipelines(dali_specs):
    for name, spec in dali_specs.items():
        for rank in (0, 1):
            kw = dict(train=True, seed=4, rank=rank, world_size=2)
            loader, reference = build_loader(spec, **kw), per_epoch(build_loader(spec, **kw))
            assert len(loader) >= 3, name
            for epoch in (0, 1, 2):
                assert_same(copies(loader), copies(reference), f"{name} rank {rank} e{epoch}")
            # an epoch abandoned after one batch, then a jump and a mid-epoch position
            assert_same(take(loader, 1), take(reference, 1), f"{name} abandoned")
            loader.set_epoch(5)
            reference.set_epoch(5)
            assert_same(copies(loader), copies(reference), f"{name} epoch 5")
            loader.set_epoch(1, 2)
            reference.set_epoch(1, 2)
            assert_same(copies(loader), copies(reference), f"{name} resumed")
            assert loader.pipelines_built == 1 and loader._runner().persistent, name
            assert reference.pipelines_built == 6, name  # 3 epochs, 1 abandoned, 2 more


def test_one_pipeline_per_loader_for_every_kind(imagenet_tree, fashion_mnist_root):
    specs = [LoaderSpec(imagenet_tree, batch_size=8),
             LoaderSpec(fashion_mnist_root, preset="small", batch_size=64, subset=640),
             LoaderSpec(fashion_mnist_root, preset="small", batch_size=64, subset=640,
                        augment=False)]
    for spec in specs:
        for train in (True, False):
            loader = build_loader(spec, train=train, seed=1)
            assert loader.pipelines_built == 0  # nothing is built before the first batch
            first = [copies(loader) for _ in range(3)]  # epochs 0, 1, 2 (eval: 3 passes)
            assert loader.pipelines_built == 1, (spec, train)
            assert [len(epoch) for epoch in first] == [len(loader)] * 3
            if not train:
                assert_same(first[2], first[0], "evaluation passes are identical")


def test_a_new_iteration_takes_the_pipeline_over(fashion_mnist_root):
    spec = LoaderSpec(fashion_mnist_root, preset="small", batch_size=32, subset=320)
    loader = build_loader(spec, train=True, seed=2)
    reference = copies(build_loader(spec, train=True, seed=2))
    old = iter(loader)
    next(old)  # left suspended with batches scheduled
    loader.set_epoch(0)
    assert_same(copies(loader), reference, "after an unfinished iteration")
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(old)
    assert loader.pipelines_built == 1


def test_reseeder_rewrites_only_what_it_understands():
    philox = b"Philox_%016X_0000000000000000:0000000000000000_0"
    table = seed_seq(77)

    def op(name, state):
        entry = b"\n" + bytes([len(name)]) + name + b"\x12" + bytes([len(state)]) + state
        return b"\n" + bytes([len(entry)]) + entry

    template = op(b"src", b"") + op(b"__Crop_1", philox % table[0]) + \
        op(b"__CoinFlip_2", philox % table[1])
    reseeder = Reseeder(template, 77, offset=1)
    other = seed_seq(12345)
    assert reseeder.checkpoint(12345) == op(b"src", b"") + op(
        b"__Crop_1", philox % other[1]) + op(b"__CoinFlip_2", philox % other[2])
    with pytest.raises(ReseedUnsupported, match="not a fresh Philox"):
        Reseeder(template + op(b"__Mystery_3", b"mt19937 1 2 3"), 77, offset=0)
    with pytest.raises(ReseedUnsupported, match="seed_seq"):
        Reseeder(template, 78, offset=0)  # keys of another seed


def test_without_reseeding_each_epoch_builds_its_pipeline(fashion_mnist_root, monkeypatch):
    """Where DALI's checkpoints cannot be rewritten (another DALI version), the loader warns and
    falls back to one pipeline per epoch: slower, the same batches."""
    spec = LoaderSpec(fashion_mnist_root, preset="imagenet", image_size=32, batch_size=16,
                      subset=64, channels=3)
    reference = copies(build_loader(spec, train=True, seed=6))

    def unsupported(self, *args):
        raise ReseedUnsupported("pretend")

    monkeypatch.setattr(Reseeder, "__init__", unsupported)
    loader = build_loader(spec, train=True, seed=6)
    with pytest.warns(RuntimeWarning, match="one pipeline per epoch"):
        first = copies(loader)
    assert_same(first, reference, "fallback")
    copies(loader)
    assert not loader._runner().persistent and loader.pipelines_built == 3  # 1 tried + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_persistent_pipeline_reproduces_per_epoch_pipelines(imagenet_tree,
                                                                fashion_mnist_root):
    """``mixed`` random-crop decode and GPU random resized crop: re-seeded, not rebuilt."""
    specs = [LoaderSpec(imagenet_tree, batch_size=4),
             LoaderSpec(fashion_mnist_root, preset="imagenet", image_size=40, batch_size=16,
                        subset=96, channels=3)]
    for spec in specs:
        loader = build_loader(spec, train=True, seed=4)
        reference = per_epoch(build_loader(spec, train=True, seed=4))
        assert loader.device.type == "cuda"
        for epoch in (0, 1, 2):
            assert_same(copies(loader), copies(reference), f"{spec.root} epoch {epoch}")
        loader.set_epoch(1, 2)
        reference.set_epoch(1, 2)
        assert_same(copies(loader), copies(reference), f"{spec.root} resumed")
        assert loader.pipelines_built == 1 and loader._runner().persistent, spec.root
        val = build_loader(spec, train=False)
        passes = [copies(val) for _ in range(3)]
        assert val.pipelines_built == 1
        assert_same(passes[2], passes[0], "evaluation passes")
