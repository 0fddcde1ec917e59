"""DALI pipelines on real data: shapes, dtypes, exact normalization, seeded augmentation."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from binaryduo.data.pipelines import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, build_loader


def fm_spec(root, **kw) -> LoaderSpec:
    return LoaderSpec(root, preset="small", batch_size=kw.pop("batch_size", 64),
                      channels=kw.pop("channels", 3), **kw)


def padded_reference(images: np.ndarray, mean: float, std: float, pad: int) -> np.ndarray:
    """(N,28,28) uint8 -> (N,28+2p,28+2p) float: zero-pad, then (x/255 - mean)/std."""
    out = np.pad(images.astype(np.float64) / 255.0, ((0, 0), (pad, pad), (pad, pad)))
    return (out - mean) / std


def test_loader_uses_cpu_without_cuda(fashion_mnist_root):
    assert not torch.cuda.is_available()  # these machines have no GPU
    loader = build_loader(fm_spec(fashion_mnist_root, subset=64), train=False)
    assert loader.device == torch.device("cpu")
    images, labels, valid = next(iter(loader))
    assert images.device.type == labels.device.type == valid.device.type == "cpu"


def test_small_eval_is_exact_normalized_padded_source(fashion_mnist_root):
    loader = build_loader(fm_spec(fashion_mnist_root, subset=300, batch_size=128), train=False)
    assert (loader.num_samples, len(loader), loader.num_classes) == (300, 3, 10)
    images_all, labels_all = np.load(fashion_mnist_root / "val_images.npy"), \
        np.load(fashion_mnist_root / "val_labels.npy")
    (mean,), (std,) = loader.mean[:1], loader.std[:1]
    assert mean == pytest.approx(0.2860, abs=1e-3) and std == pytest.approx(0.3530, abs=1e-3)
    indices, _ = loader.epoch_indices()
    seen = 0
    for images, labels, valid in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert valid.dtype == torch.bool and bool(valid.all())
        assert images.shape == (len(labels), 3, 32, 32)
        idx = indices[seen:seen + len(labels)]
        want = padded_reference(images_all[idx, :, :, 0], mean, std, pad=2)
        for c in range(3):  # grey replicated into 3 identical channels
            np.testing.assert_allclose(images[:, c].numpy(), want, atol=1e-5)
        np.testing.assert_array_equal(labels.numpy(), labels_all[idx])
        seen += len(labels)
    assert seen == 300  # 128 + 128 + 44: the last batch is partial, nothing duplicated


def test_small_train_is_pad4_random_crop_and_flip(fashion_mnist_root):
    loader = build_loader(fm_spec(fashion_mnist_root, subset=512, batch_size=128, channels=1),
                          train=True, seed=3)
    images, labels = next(iter(loader))
    assert images.shape == (128, 1, 32, 32) and labels.shape == (128,)
    indices, _ = loader.epoch_indices(0)
    source = np.load(fashion_mnist_root / "train_images.npy", mmap_mode="r")
    # 28 -> centre 32 (pad 2) -> pad 4: a 40x40 canvas; every output is one 32x32 window of it,
    # possibly mirrored.
    canvas = padded_reference(source[indices[:128], :, :, 0], loader.mean[0], loader.std[0], 6)
    found = []
    for k in range(128):
        out = images[k, 0].numpy()
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                   if np.allclose(out, (canvas[k, dy:dy + 32, dx:dx + 32][:, ::-1] if flip
                                        else canvas[k, dy:dy + 32, dx:dx + 32]), atol=1e-5)]
        assert matches, f"sample {k} is not a padded shift/flip of its source image"
        found.append(matches[0])
    offsets = {(dy, dx) for dy, dx, _ in found}
    flips = [f for _, _, f in found]
    assert len(offsets) > 20 and 30 < sum(flips) < 98  # random over 81 offsets, p(flip)=.5


def first_batches(loader, n=2):
    out = []
    for k, batch in enumerate(loader):
        out.append([t.clone() for t in batch])
        if k + 1 == n:
            break
    return out


def test_augmentation_and_order_are_seeded(fashion_mnist_root):
    spec = fm_spec(fashion_mnist_root, subset=1000, batch_size=100)
    a = first_batches(build_loader(spec, train=True, seed=7))
    b = first_batches(build_loader(spec, train=True, seed=7))
    c = first_batches(build_loader(spec, train=True, seed=8))
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert not torch.equal(a[0][1], c[0][1])  # another seed: another order
    # the same sample under two seeds gets (almost surely) different crops/flips
    loader7, loader8 = build_loader(spec, train=True, seed=7), build_loader(spec, train=True,
                                                                           seed=8)
    assert not np.array_equal(loader7.epoch_indices(0)[0], loader8.epoch_indices(0)[0])

    loader = build_loader(spec, train=True, seed=7)
    epoch0 = [t.clone() for t in next(iter(loader))]
    loader.set_epoch(1)
    epoch1 = [t.clone() for t in next(iter(loader))]
    assert not torch.equal(epoch0[1], epoch1[1])
    loader.set_epoch(0)
    again = next(iter(loader))
    assert torch.equal(again.images, epoch0[0]) and torch.equal(again.labels, epoch0[1])


def test_full_pass_advances_the_epoch_and_resume_continues_mid_epoch(fashion_mnist_root):
    spec = fm_spec(fashion_mnist_root, subset=600, batch_size=64)
    loader = build_loader(spec, train=True, seed=1)
    assert len(loader) == 9  # 600 // 64, last partial batch dropped
    labels0 = [b.labels.clone() for b in loader]
    assert len(labels0) == 9 and loader.state_dict()["epoch"] == 1
    labels1 = [b.labels.clone() for b in loader]
    assert not torch.equal(torch.cat(labels0), torch.cat(labels1))

    # stop after 4 steps of epoch 1 and resume in a fresh loader
    loader.set_epoch(1)
    for k, _ in enumerate(loader):
        if k == 3:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (1, 4)
    resumed = build_loader(spec, train=True, seed=1)
    resumed.load_state_dict(state)
    rest = [b.labels.clone() for b in resumed]
    assert len(rest) == 5
    assert torch.equal(torch.cat(rest), torch.cat(labels1[4:]))
    with pytest.raises(ValueError, match="seed"):
        build_loader(spec, train=True, seed=2).load_state_dict(state)


def test_drop_last_false_keeps_the_partial_batch(fashion_mnist_root):
    spec = fm_spec(fashion_mnist_root, subset=600, batch_size=64, drop_last=False)
    loader = build_loader(spec, train=True)
    sizes = [len(b.labels) for b in loader]
    assert len(loader) == 10 and sizes == [64] * 9 + [24]


def test_imagenet_train_and_val_on_real_photos(imagenet_tree, imagenet_photos, helpers):
    spec = LoaderSpec(imagenet_tree, preset="imagenet", batch_size=8)
    train = build_loader(spec, train=True, seed=0)
    assert train.format == "imagefolder" and train.num_classes == 19 and len(train) == 5
    classes = sorted({cls for _, cls in imagenet_photos})
    assert list(train.classes) == [helpers.class_folder(c) for c in classes]
    n = 0
    for images, labels in train:
        assert images.shape == (8, 3, 224, 224) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 19
        n += len(labels)
    assert n == 40
    val = build_loader(spec, train=False)
    batches = list(val)
    assert [len(b.labels) for b in batches] == [8, 8, 3]
    assert batches[0].images.shape == (8, 3, 224, 224)
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == list(range(19))  # one photo per class, in sorted-folder order


def test_imagenet_val_matches_pil_reference(imagenet_tree):
    from PIL import Image
    from torchvision import transforms

    spec = LoaderSpec(imagenet_tree, preset="imagenet", batch_size=19)
    loader = build_loader(spec, train=False)
    images, _, _ = next(iter(loader))
    indices, _ = loader.epoch_indices()
    reference = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for k in range(19):
        with Image.open(loader.files[indices[k]]) as image:
            square = image.size == (512, 512)
            want = reference(image.convert("RGB"))
        diff = (images[k] - want).abs()
        # Two antialiased bilinear resizes: within ~1 grey level (0.018 = 1/255/0.225) for the
        # 512x512 photos; the 1024x683 one resizes to 384 vs torchvision's 383 columns, which
        # shifts the centre crop by half a pixel.
        if square:
            assert diff.mean() < 0.005 and diff.max() < 0.03, (k, diff.mean(), diff.max())
        else:
            assert diff.mean() < 0.1, (k, diff.mean())


def test_class_indices_come_from_train_folders(imagenet_tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    first = sorted(p.name for p in (root / "val").iterdir())[0]
    shutil.rmtree(root / "val" / first)  # val lacks the first class: indices must not shift
    val = build_loader(LoaderSpec(root, batch_size=6), train=False)
    labels = torch.cat([b.labels for b in val]).tolist()
    assert labels == list(range(1, 19))
    (root / "val" / "not_a_train_class").mkdir()
    with pytest.raises(ValueError, match="not in train"):
        build_loader(LoaderSpec(root), train=False)


def test_grey_and_odd_jpegs_decode_to_requested_channels(imagenet_photos, tmp_path, helpers):
    root = tmp_path / "odd"
    for split in ("train", "val"):
        helpers.make_variants(imagenet_photos[0][0], root / split / "a")
    for channels in (3, 1):
        loader = build_loader(LoaderSpec(root, batch_size=4, channels=channels), train=False)
        images, labels, valid = next(iter(loader))
        assert images.shape == (4, channels, 224, 224) and bool(valid.all())
        assert torch.isfinite(images).all()
    files = list(loader.files)
    grey = files.index(str(root / "val" / "a" / "gray.JPEG"))
    rgb = build_loader(LoaderSpec(root, batch_size=4, channels=3), train=False)
    images = next(iter(rgb)).images
    # a grey JPEG becomes 3 equal channels before normalization
    pixels = images[grey] * torch.tensor(IMAGENET_STD)[:, None, None] \
        + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5)
    assert torch.allclose(pixels[1], pixels[2], atol=1e-5)


def test_filelist_format(imagenet_tree, tmp_path):
    root = tmp_path / "list"
    root.mkdir()
    lines = []
    for k, path in enumerate(sorted((imagenet_tree / "val").rglob("*.JPEG"))):
        lines.append(f"{path} {k % 3}")  # absolute paths are kept by os.path.join
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("zero\none\ntwo\n")
    loader = build_loader(LoaderSpec(root, batch_size=5), train=False)
    assert loader.format == "filelist" and loader.classes == ("zero", "one", "two")
    labels = torch.cat([b.labels for b in loader]).tolist()
    assert labels == [k % 3 for k in range(19)]


def test_shard_native_channels_and_explicit_normalization(fashion_mnist_root):
    spec = LoaderSpec(fashion_mnist_root, preset="small", batch_size=16, subset=16,
                      channels=None, mean=(0.5,), std=(0.5,))
    loader = build_loader(spec, train=False)
    images, _, _ = next(iter(loader))
    assert images.shape == (16, 1, 32, 32)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images[:, :, 0, 0].eq(-1).all()


def test_spec_validation(fashion_mnist_root):
    with pytest.raises(ValueError, match="preset"):
        LoaderSpec(fashion_mnist_root, preset="cifar")
    with pytest.raises(ValueError, match="channels"):
        LoaderSpec(fashion_mnist_root, channels=2)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(LoaderSpec(fashion_mnist_root, preset="small", subset=10, batch_size=64),
                     train=True)
    with pytest.raises(ValueError, match="rank"):
        build_loader(LoaderSpec(fashion_mnist_root), train=True, rank=2, world_size=2)


def test_small_preset_on_real_cifar_pngs_is_exact(foolbox_data, tmp_path):
    from PIL import Image
    root = tmp_path / "cifar"
    pngs = sorted(foolbox_data.glob("cifar10_*.png"))
    for split in ("train", "val"):
        for path in pngs:
            label = path.stem.split("_")[-1]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, root / split / label / path.name)
    spec = LoaderSpec(root, preset="small", batch_size=8, mean=(0.5, 0.4, 0.3),
                      std=(0.2, 0.25, 0.3))
    val = build_loader(spec, train=False)
    assert val.num_classes == 8 and len(val) == 3  # CIFAR test[0:20] has 8 of the 10 classes
    images = torch.cat([b.images for b in val])
    assert images.shape == (20, 3, 32, 32)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    for k, index in enumerate(val.epoch_indices()[0]):
        pixels = np.asarray(Image.open(val.files[index]).convert("RGB"), np.float64) / 255
        want = ((pixels - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(images[k].numpy(), want, atol=1e-5)  # lossless PNG: exact
    train = build_loader(spec, train=True)
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64


def test_imagenet_preset_on_a_shard(fashion_mnist_root):
    spec = LoaderSpec(fashion_mnist_root, preset="imagenet", image_size=48, batch_size=16,
                      subset=32, channels=3)
    for train in (True, False):
        images, labels = next(iter(build_loader(spec, train=train)))[:2]
        assert images.shape == (16, 3, 48, 48) and torch.isfinite(images).all()


def test_batches_stay_valid_after_the_loader_moves_on(fashion_mnist_root, imagenet_tree):
    """Batches are handed out without a copy (DLPack): they must not be overwritten later."""
    for spec in (fm_spec(fashion_mnist_root, subset=512, batch_size=64),
                 LoaderSpec(imagenet_tree, batch_size=8)):
        loader = build_loader(spec, train=True, seed=0)
        kept, copies = [], []
        for batch in loader:
            kept.append(batch)
            copies.append([t.clone() for t in batch])
        for _ in build_loader(spec, train=True, seed=1):  # more pipelines, more buffers
            pass
        for batch, copy in zip(kept, copies):
            assert all(torch.equal(a, b) for a, b in zip(batch, copy))


def test_augment_false_trains_on_the_evaluation_transform(fashion_mnist_root):
    """``augment=False``: each training image is its source, centre-padded and normalized (the
    eval transform) -- no random crop or flip."""
    loader = build_loader(fm_spec(fashion_mnist_root, subset=256, batch_size=128, channels=1,
                                  augment=False), train=True, seed=3)
    source = np.load(fashion_mnist_root / "train_images.npy")
    indices, _ = loader.epoch_indices()
    images = torch.cat([b.images for b in loader])
    want = padded_reference(source[indices, :, :, 0], loader.mean[0], loader.std[0], 2)
    np.testing.assert_allclose(images[:, 0].numpy(), want, atol=1e-5)
