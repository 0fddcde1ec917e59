#!/usr/bin/env python
"""CDG estimator: the batched evaluation (trainer/analysis/mismatch.py) against the naive loop.

For each layer of a VGG-7 (half width, FP weights, binary activations, random BN state so that
thresholds are crossed) this computes the per-sample loss differences
``L_b(w + delta e_i) - L_b(w - delta e_i)`` for the same sampled coordinates twice:

- ``naive``: one forward pass per coordinate and sign, in a Python loop (the literal definition);
- ``batched``: ``loss_differences_batched``: the +-delta perturbations of a chunk in one vmap'd
  pass, the layer output perturbed linearly, the layers before the perturbed one computed once
  per chunk.

Both run in the same process, one after the other per layer, on the same batch; ``x`` is
naive time / batched time. ``max|d|`` is the largest difference between the two results and
``flips`` the number of (coordinate, sample) entries that differ by more than 1e-4 (float32
rounding of the two evaluations can move a pre-activation that sits within an ulp of a threshold
to the other side; in float64 the two agree to ~1e-15, see tests/trainer/test_gradient_mismatch.py).
The load average is printed before and after: on a shared machine, rerun when it is high.
The script is a report, not a test: it always exits 0.

Run:  .venv/bin/python benchmarks/gradient_mismatch.py [--batch 64] [--coordinates 16]
      [--layers conv1,conv2,...] [--levels 1] [--dtype float32|float64] [--threads N] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from binaryduo import models
from binaryduo.trainer.analysis import mismatch
from binaryduo.trainer.analysis.mismatch_report import select_layers, short_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--coordinates", type=int, default=16)
    parser.add_argument("--layers", default="", help="comma list (default: every conv/linear)")
    parser.add_argument("--levels", type=int, default=1, help="activation levels (1 = binary)")
    parser.add_argument("--delta", type=float, default=0.5, help="x the layer's weight RMS")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = models.build("vgg7", "bnn", width_mult=0.5, weight_bits=32, in_channels=1,
                         act_levels=args.levels)
    models.randomize_batchnorm_(model, generator)
    model = model.to(dtype).eval()
    images = torch.randn(args.batch, 1, 32, 32, generator=generator).to(dtype)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    layers = select_layers(mismatch.weight_layers(model),
                           [name for name in args.layers.split(",") if name])
    pure = mismatch.forward_only_copy(model)

    print(f"CDG estimator, VGG-7 half width, levels={args.levels}, batch {args.batch}, "
          f"{args.coordinates} coordinates x 2 signs per layer, {args.dtype}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    # warm-up (first-call allocations, vmap tracing caches)
    warm = mismatch.sample_coordinates(layers[0].numel, 2, generator)
    mismatch.loss_differences_naive(model, layers[0], warm, 0.1, images, labels)
    mismatch.loss_differences_batched(model, layers[0], warm, 0.1, images, labels,
                                      forward_model=pure)

    head = f"{'layer':<11} {'naive s':>8} {'batched s':>9} {'x':>6} {'max|d|':>9} {'flips':>7}"
    print(head)
    print("-" * len(head))
    total_naive = total_batched = 0.0
    for layer in layers:
        coords = mismatch.sample_coordinates(layer.numel, args.coordinates, generator)
        delta = args.delta * float(model.get_parameter(layer.param).detach().pow(2).mean().sqrt())
        start = time.perf_counter()
        naive = mismatch.loss_differences_naive(model, layer, coords, delta, images, labels)
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        batched = mismatch.loss_differences_batched(model, layer, coords, delta, images, labels,
                                                    forward_model=pure)
        batched_s = time.perf_counter() - start
        total_naive += naive_s
        total_batched += batched_s
        diff = (naive - batched).abs()
        print(f"{short_name(layer.name):<11} {naive_s:>8.2f} {batched_s:>9.2f} "
              f"{naive_s / batched_s:>6.1f} {float(diff.max()):>9.2e} "
              f"{int((diff > 1e-4).sum()):>7d}")
    print("-" * len(head))
    print(f"{'all':<11} {total_naive:>8.2f} {total_batched:>9.2f} "
          f"{total_naive / total_batched:>6.1f}   (naive / batched, same run)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
