#!/usr/bin/env python
"""Decode speed-up of pre-resized copies (``binaryduo data prepare resized``) through the real DALI
pipeline (``binaryduo.data.pipelines.build_loader``, ``imagenet`` preset, CPU here).

A tree of ``--images`` training and validation files is built in a temporary directory from the 20
real ImageNet photos of the foolbox 3.3.4 wheel, in one of two forms:

- ``imagenet-like``: each photo re-encoded by Pillow as a baseline JPEG (quality 90, 4:2:0) at
  500x375 -- the typical ILSVRC2012 file (most are 500 px on the long side, ~110 kB);
- ``foolbox``: the files as shipped (progressive JPEG, 19 of 512x512 and one 1024x683).

Then ``prepare_resized`` writes copies at shorter side 256 and 160, and whole epochs of the train
pipeline (random-resized-crop 224, flip, normalize) and of the val pipeline (resize 256, centre crop
224) are timed on each tree, interleaved (original, 256, 160, original, ...), after one warm-up
epoch each; the median images/s and images per CPU-second (robust to other load on the machine)
are reported. The 160 copy is meant for training only (its val path would upscale). A report, not
a test: it always exits 0.

Run:  .venv/bin/python benchmarks/preresize.py [--images 256] [--batch 32] [--threads 2]
      [--epochs 3] [--form imagenet-like|foolbox|both]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from photos import baseline_jpeg, foolbox_photos, write_tree

from binaryduo.data.imagenet import prepare_resized
from binaryduo.data.pipelines import LoaderSpec, build_loader


def build_tree(root: Path, images: int, form: str, classes: int = 10) -> int:
    """The tree; returns the mean bytes per source file. ``foolbox``: the photos as shipped;
    else re-encoded as baseline JPEGs at 500x375 (a typical ImageNet file)."""
    photos = foolbox_photos()
    sources = photos if form == "foolbox" else [
        baseline_jpeg(p, root.parent / f"src_{k}.JPEG", size=(500, 375))
        for k, p in enumerate(photos)]
    write_tree(root, sources, images, classes=classes)
    return sum(s.stat().st_size for s in sources) // len(sources)


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def epoch(root: Path, train: bool, batch: int, threads: int, seed: int) -> tuple[float, float, int]:
    spec = LoaderSpec(root, format="imagefolder", preset="imagenet", batch_size=batch,
                      num_threads=threads)
    loader = build_loader(spec, train=train, seed=seed, device="cpu")
    wall, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for images, *_ in loader:
        count += images.shape[0]
    return time.perf_counter() - wall, cpu_seconds() - cpu, count


def measure(trees: dict[str, Path], args) -> None:
    for split, train in (("train", True), ("val", False)):
        names = [n for n in trees if train or n != "160"]
        results = {n: [] for n in names}
        for n in names:  # warm-up
            epoch(trees[n], train, args.batch, args.threads, seed=0)
        for repeat in range(args.epochs):
            for n in names:
                results[n].append(epoch(trees[n], train, args.batch, args.threads,
                                        seed=repeat + 1))
        base = statistics.median(c / w for w, _, c in results["original"])
        base_cpu = statistics.median(c / max(u, 1e-9) for _, u, c in results["original"])
        for n in names:
            speed = statistics.median(c / w for w, _, c in results[n])
            per_cpu = statistics.median(c / max(u, 1e-9) for _, u, c in results[n])
            print(f"  {split:<5} {n:<9} {speed:8.0f} img/s ({speed / base:4.2f}x)   "
                  f"{per_cpu:8.0f} img/CPU-s ({per_cpu / base_cpu:4.2f}x)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="files per split")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per tree")
    parser.add_argument("--form", default="both", choices=("imagenet-like", "foolbox", "both"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"DALI CPU pipeline, {args.images} images per split, batch {args.batch}, "
          f"{args.threads} threads, {os.cpu_count()} cores; median of {args.epochs} epochs")
    forms = ("imagenet-like", "foolbox") if args.form == "both" else (args.form,)
    for form in forms:
        with tempfile.TemporaryDirectory(prefix="preresize-") as tmp:
            original = Path(tmp) / "trees" / "original"
            original.mkdir(parents=True)
            size = build_tree(original, args.images, form)
            trees = {"original": original}
            for side in (256, 160):
                result = prepare_resized(original, Path(tmp) / "trees" / str(side),
                                         shorter_side=side, workers=args.threads)
                trees[str(side)] = result.out
                print(f"[{form}] shorter side {side}: {result.format()}", flush=True)
            print(f"[{form}] originals average {size / 1e3:.0f} kB", flush=True)
            measure(trees, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
