"""The real photos the benchmarks read, and ImageNet-style trees made of them.

The photos are the 20 ImageNet JPEGs of the foolbox 3.3.4 wheel (``make install`` puts it in the
venv, without its dependencies: it is located here, never imported). A tree replicates them over
``root/<split>/<class>/<k>.JPEG``, so a benchmark reads thousands of real, decodable files.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

__all__ = ["foolbox_photos", "baseline_jpeg", "write_tree"]


def foolbox_photos() -> list[Path]:
    """The 20 ImageNet photos, in file order; exits with the install line if foolbox is missing."""
    spec = importlib.util.find_spec("foolbox")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("foolbox 3.3.4 is needed for its ImageNet photos: "
                 "pip install --no-deps foolbox==3.3.4 (or pass --root DIR where offered)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return sorted(data.glob("imagenet_*.jpg")) or sys.exit(f"no imagenet_*.jpg in {data}")


def baseline_jpeg(photo: Path, target: Path, size: tuple[int, int] | None = None) -> Path:
    """``photo`` re-encoded as a baseline JPEG (quality 90, 4:2:0: what ImageNet's files are),
    resized to ``size`` (width, height) first if given."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(photo) as image:
        image = image.convert("RGB")
        if size is not None:
            image = image.resize(size, Image.Resampling.LANCZOS)
        image.save(target, format="JPEG", quality=90, progressive=False)
    return target


def write_tree(root: Path, sources: list[Path], images: int, *, splits=("train", "val"),
               classes: int | None = 10, link: bool = False) -> None:
    """``images`` files per split, cycling over ``sources``, in ``classes`` class folders
    (``None``: one folder per source). ``link``: hard links where the file system allows (a
    tree of thousands of files then costs no disk), else copies."""
    for split in splits:
        for k in range(images):
            source = sources[k % len(sources)]
            folder = root / split / (f"n{k % classes:08d}" if classes else
                                     f"c{k % len(sources):02d}")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{k:06d}.JPEG"
            if link:
                try:
                    os.link(source, target)
                    continue
                except OSError:
                    pass
            shutil.copyfile(source, target)
