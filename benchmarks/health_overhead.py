#!/usr/bin/env python
"""Health-metric overhead: a training step with the health probe recording vs. the same step without.

For each model and variant this builds one model, its SGD optimizer and a fixed, seeded batch,
and attaches a :class:`binaryduo.models.health.HealthProbe` (every metric of docs/health.md). Steps
alternate between recorded (``step_started`` -> forward -> backward -> ``after_backward`` -> SGD
step -> ``after_step``: activation counts in the forward hooks, gradient norms, per-step sign flips)
and not recorded (the plain step: the probe's hooks return at once), in blocks of two, on the
same model in one process, so machine noise and the model's memory hit both sides alike; which side goes first
alternates too. On the CPU steps are timed in this process's CPU time (``--clock cpu``), which
other processes' load does not inflate as it does wall time (``--clock wall``, the GPU default). The reported times are medians; ``time x`` is their ratio, ``pair x`` the median
ratio of adjacent steps and ``spread`` the larger interquartile range relative to its median.
Trust a row where ``time x`` and ``pair x`` agree and the spread is small; on a loaded machine
(the load average is printed) rerun with more ``--steps``.

The epoch-end work (flips since the epoch start, alpha, one reduction) runs once per epoch and is
timed apart (``epoch-end ms``): divided by the steps of an epoch it is negligible.

With every step recorded (``--sample-every 1``) a recorded step reuses the weights' signs the
previous recorded step computed, so the second step of a recorded block is timed; with
``--sample-every K`` > 1 the first (signs computed afresh) is.

Target (issue 17): recorded / plain <= 1.03 on CPU for VGG-7 at half width (32 px, batch 128) and
ResNet-18 at 64 px (batch 32). ``--sample-every K`` records every K-th step only (the recipe's
``health.sample_every_steps``), which divides the overhead by about K; the script reports the
per-recorded-step ratio and the ratio that sampling gives. A report, not a test: it exits 0.

Run:  .venv/bin/python benchmarks/health_overhead.py [--models vgg7,resnet18]
      [--variants coupled,decoupled] [--steps 20] [--warmup 3] [--batch N] [--threads N]
      [--device cpu|cuda] [--sample-every 1] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from binaryduo import models
from binaryduo.models.health import HealthProbe
# the timing helpers and the --models/--variants check of the quantizer benchmark (benchmarks/
# is on sys.path when run)
from quantizer_overhead import _load, _relative_iqr, _sync, selection

TARGET = 1.03
VARIANTS = ("bnn", "coupled", "decoupled")


@dataclass(frozen=True)
class Setup:
    input_size: int
    batch: int
    options: dict


SETUPS = {
    "vgg7": Setup(32, 128, {"width_mult": 0.5, "num_classes": 10}),
    "resnet18": Setup(64, 32, {"input_size": 64, "num_classes": 1000}),
}


@dataclass
class Row:
    model: str
    variant: str
    batch: int
    health_ms: float
    plain_ms: float
    pair_ratio: float
    spread: float
    epoch_end_ms: float
    sample_every: int

    @property
    def time_ratio(self) -> float:
        return self.health_ms / self.plain_ms

    @property
    def sampled_ratio(self) -> float:
        """What recording every ``sample_every``-th step costs per step on average."""
        return 1 + (self.time_ratio - 1) / self.sample_every

    @property
    def verdict(self) -> str:
        return "PASS" if self.sampled_ratio <= TARGET else "FAIL"


def measure(name: str, variant: str, batch: int, steps: int, warmup: int, device: torch.device,
            seed: int, sample_every: int, clock=time.perf_counter) -> Row:
    setup = SETUPS[name]
    torch.manual_seed(seed)
    model = models.build(name, variant, **setup.options).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, setup.input_size, setup.input_size, generator=generator)
    labels = torch.randint(0, setup.options["num_classes"], (batch,), generator=generator)
    images, labels = images.to(device), labels.to(device)
    probe = HealthProbe(model)
    probe.start_epoch()

    counter = iter(range(10**9))

    def step(recorded: bool) -> float:
        _sync(device)
        start = clock()
        optimizer.zero_grad(set_to_none=True)
        if recorded:
            probe.step_started(next(counter))
        F.cross_entropy(model(images), labels).backward()
        if recorded:
            probe.after_backward()
        optimizer.step()
        if recorded:
            probe.after_step()
        _sync(device)
        return clock() - start

    def block(recorded: bool) -> tuple[float, float]:
        """Two consecutive steps: the first recorded one computes the weights' signs afresh
        (as after a step that was not recorded), the second reuses the first's."""
        return step(recorded), step(recorded)

    for _ in range(warmup):
        block(True)
        block(False)
    fresh, steady, plain = [], [], []
    for i in range(steps):
        for recorded in ((True, False) if i % 2 == 0 else (False, True)):
            first, second = block(recorded)
            if recorded:
                fresh.append(first)
                steady.append(second)
            else:
                plain.append(second)
    _sync(device)
    start = time.perf_counter()
    probe.summarize(probe.totals().tolist())
    epoch_end = time.perf_counter() - start
    probe.remove()
    recorded_times = steady if sample_every == 1 else fresh
    pair = statistics.median(h / p for h, p in zip(recorded_times, plain))
    spread = max(_relative_iqr(t) for t in (recorded_times, plain))
    return Row(name, variant, batch, statistics.median(recorded_times) * 1e3,
               statistics.median(plain) * 1e3, pair, spread, epoch_end * 1e3, sample_every)


def format_table(rows: list[Row]) -> str:
    header = (f"{'model':<9} {'variant':<10} {'batch':>5} {'health ms':>10} {'plain ms':>9} "
              f"{'time x':>7} {'pair x':>7} {'spread':>7} {'every':>5} {'sampled x':>9} "
              f"{'epoch-end ms':>12}  verdict")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.model:<9} {r.variant:<10} {r.batch:>5} {r.health_ms:>10.1f} "
                     f"{r.plain_ms:>9.1f} {r.time_ratio:>7.3f} {r.pair_ratio:>7.3f} "
                     f"{r.spread:>7.1%} {r.sample_every:>5} {r.sampled_ratio:>9.3f} "
                     f"{r.epoch_end_ms:>12.1f}  {r.verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SETUPS))
    parser.add_argument("--variants", default="coupled,decoupled")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--batch", type=int, default=None, help="batch for every model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample-every", type=int, default=1,
                        help="health.sample_every_steps to report the sampled ratio for")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: this process's CPU time (time.process_time; robust to other "
                             "processes' load), wall: perf_counter (default: cpu on the CPU, "
                             "wall on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke: vgg7 coupled, batch 8, 3 steps (numbers meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.variants, args.batch, args.steps, args.warmup = \
            "vgg7", "coupled", 8, 3, 1
    names, variants = selection(parser, args, SETUPS, VARIANTS)
    if args.steps < 1 or args.warmup < 0 or args.sample_every < 1 or \
            (args.batch is not None and args.batch < 1):
        parser.error("--steps, --batch and --sample-every must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock_name = args.clock or ("cpu" if device.type == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter

    print("health overhead: a step recording every health metric vs the plain step "
          "(same model, alternating)")
    print(f"target: <= {TARGET:.2f}x (recorded / plain, per step on average)")
    print(f"load average before: {_load()}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.steps} timed steps per side (medians), seed {args.seed}, "
          f"{clock_name} clock")
    rows = []
    for n in names:
        batch = args.batch or SETUPS[n].batch
        for v in variants:
            started = time.perf_counter()
            row = measure(n, v, batch, args.steps, args.warmup, device, args.seed,
                          args.sample_every, clock)
            rows.append(row)
            print(f"  {n}/{v} at {SETUPS[n].input_size}px, batch {batch}: time x "
                  f"{row.time_ratio:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(f"load average after: {_load()}")
    print(format_table(rows))
    print()
    passed = sum(r.verdict == "PASS" for r in rows)
    print(f"{passed}/{len(rows)} within target (sampled x <= {TARGET:.2f}); time x = health ms / "
          f"plain ms (medians), pair x = median ratio of adjacent steps, sampled x = 1 + "
          f"(time x - 1) / every")
    return 0


if __name__ == "__main__":
    sys.exit(main())
