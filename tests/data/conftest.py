"""Shared fixtures of the data tests: real Fashion-MNIST (Debian package) and real ImageNet photos
(the foolbox 3.3.4 wheel: ``foolbox_data`` and ``imagenet_photos`` live in tests/conftest.py), plus
trees built from them at test time. Nothing is mocked."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def read_idx_reference(path: Path) -> np.ndarray:
    """An IDX parser written independently of binaryduo.data.prepare (the test oracle)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


def make_variants(photo: Path, class_dir: Path) -> dict[str, Path]:
    """Valid oddities real ImageNet contains: grey JPEG, CMYK JPEG, a PNG named .JPEG."""
    from PIL import Image
    class_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(photo) as image:
        rgb = image.convert("RGB")
    out = {"rgb": class_dir / "rgb.JPEG", "gray": class_dir / "gray.JPEG",
           "cmyk": class_dir / "cmyk.JPEG", "png": class_dir / "png_named.JPEG"}
    shutil.copyfile(photo, out["rgb"])
    rgb.convert("L").save(out["gray"], format="JPEG", quality=90)
    rgb.convert("CMYK").save(out["cmyk"], format="JPEG", quality=90)
    rgb.save(out["png"], format="PNG")
    return out


@pytest.fixture(scope="session")
def helpers():
    """The plain helper functions above, for test modules (importlib import mode: test files
    cannot import a sibling module)."""
    class Helpers:
        read_idx_reference = staticmethod(read_idx_reference)
        class_folder = staticmethod(class_folder)
        make_variants = staticmethod(make_variants)
    return Helpers


@pytest.fixture(scope="session")
def fashion_mnist_source() -> Path:
    missing = [f for f in FASHION_FILES if not (FASHION_MNIST_DIR / f).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST not installed ({', '.join(missing)} missing from "
                    f"{FASHION_MNIST_DIR}): apt-get install dataset-fashion-mnist", pytrace=False)
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def fashion_mnist_root(fashion_mnist_source, tmp_path_factory) -> Path:
    from binaryduo.data.prepare import prepare_fashion_mnist
    out = tmp_path_factory.mktemp("fmnist") / "fashion-mnist"
    prepare_fashion_mnist(out, source_dir=fashion_mnist_source)
    return out


def class_folder(imagenet_class: int) -> str:
    return f"n{imagenet_class:08d}"  # wnid-like names; sorted order = numeric order here


@pytest.fixture(scope="session")
def imagenet_tree(imagenet_photos, tmp_path_factory) -> Path:
    """``train/<class>/*.JPEG``: every photo twice (40 files, 19 classes); ``val/<class>/``: the
    first photo of each class (19 files: an odd count)."""
    root = tmp_path_factory.mktemp("imagenet") / "tree"
    seen = set()
    for number, (path, cls) in enumerate(imagenet_photos):
        train_dir = root / "train" / class_folder(cls)
        train_dir.mkdir(parents=True, exist_ok=True)
        for copy in range(2):
            shutil.copyfile(path, train_dir / f"{number:02d}_{copy}.JPEG")
        if cls not in seen:
            seen.add(cls)
            val_dir = root / "val" / class_folder(cls)
            val_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, val_dir / f"{number:02d}.JPEG")
    return root
