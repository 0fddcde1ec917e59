#!/usr/bin/env python
"""Quantizer overhead: a training step with BinaryDuo's quantizers vs. the same step without them.

For each model and each quantized variant (bnn, coupled, decoupled) this builds the model and a
deep copy of it in which the quantizers are replaced by plain stand-ins:

- every ``ActQuant`` becomes ``nn.Hardtanh(0, 1)`` (same clip window, same cost class, no staircase);
- every ``QConv2d`` with ``weight_bits=1`` gets ``weight_bits=32`` (identity weight, no sign/alpha).

Both copies start from the same weights and train on the same fixed, seeded batch (forward, cross
entropy, backward, SGD step). After warm-up their steps are timed interleaved, A B A B ..., in one
process, so machine noise hits both alike; the reported times are medians and ``time x`` is their
ratio. Two noise indicators come with it: ``pair x``, the median of the ratios of adjacent A/B steps,
and ``spread``, the larger interquartile range of the two sides relative to its median. When other
processes load the machine (the load average is printed before and after), trust a row only where
``time x`` and ``pair x`` agree and the spread is small; rerun, with more ``--steps``, otherwise.

Memory, measured on one extra untimed step of each:

- ``saved``: bytes of the tensors autograd saves for backward (``saved_tensors_hooks``), deduplicated by
  storage, excluding storages of parameters and buffers (resident anyway). This is what the
  quantizers change: the staircase saves a bool mask where Hardtanh saves its float input. A binary
  conv (``models.quantizers.binary_conv2d``) saves its input and latent weight, as a plain conv
  does, and recomputes ``alpha * sign(W)`` in backward.
- ``peak``: the highest allocator footprint reached during forward + backward + SGD step, above the
  footprint at its start: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the running sum of the
  profiler's allocation/free events (``profile_memory=True``).
  The binarized weight still exists while a binary conv runs (forward, and the input-gradient
  half of its backward); its size does not depend on the batch, so it shows at small batches.

Targets (quantized / plain): time <= 1.15x, memory (saved and peak) <= 1.10x. The script is a report,
not a test: it always exits 0.

Run:  .venv/bin/python benchmarks/quantizer_overhead.py [--models vgg7,resnet18,alexnet]
      [--variants bnn,coupled,decoupled] [--steps 20] [--warmup 3] [--batch N] [--threads N]
      [--device cpu|cuda] [--seed 0]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from binaryduo import models
from binaryduo.models.layers import ActQuant, QConv2d

TIME_TARGET = 1.15
MEMORY_TARGET = 1.10
VARIANTS = ("bnn", "coupled", "decoupled")


@dataclass(frozen=True)
class Setup:
    """Input size, default batch and build options of one model (sized for a 2-core CPU)."""

    input_size: int
    batch: int
    num_classes: int


#: vgg7 as in docs/method.md §9 (32 px, batch 128); the ImageNet models at sizes that keep the whole
#: script at a few minutes on 2 CPU cores.
SETUPS = {
    "vgg7": Setup(input_size=32, batch=128, num_classes=10),
    "resnet18": Setup(input_size=64, batch=32, num_classes=1000),
    "resnet18_sc": Setup(input_size=64, batch=32, num_classes=1000),
    "alexnet": Setup(input_size=224, batch=16, num_classes=1000),
}
DEFAULT_MODELS = ("vgg7", "resnet18", "alexnet")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def plain_copy(model: nn.Module) -> tuple[nn.Module, int, int]:
    """Deep copy of ``model`` with ActQuant -> Hardtanh(0, 1) and binary QConv2d -> identity weight."""
    plain = copy.deepcopy(model)
    acts = convs = 0
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ActQuant):
                setattr(parent, name, nn.Hardtanh(0.0, 1.0))
                acts += 1
    for module in plain.modules():
        if isinstance(module, QConv2d) and module.weight_bits == 1:
            module.weight_bits = 32  # QConv2d.quantized_weight() then returns the latent weight
            convs += 1
    return plain, acts, convs


class Trainer:
    """One model, its SGD optimizer and a fixed batch; ``step()`` is one full training step."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        self.model = model.train()
        self.images, self.labels = images, labels
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def forward_backward(self) -> None:
        loss = F.cross_entropy(self.model(self.images), self.labels)
        loss.backward()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()
        self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer: Trainer, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    trainer.step()
    _sync(device)
    return time.perf_counter() - start


def saved_bytes(trainer: Trainer) -> int:
    """Bytes autograd saves for backward in one step (unique storages, parameters excluded)."""
    resident = {t.untyped_storage().data_ptr()
                for t in (*trainer.model.parameters(), *trainer.model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(trainer.model(trainer.images), trainer.labels)
    loss.backward()
    trainer.optimizer.step()
    return sum(storages.values())


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's C++ chatter on fd 2 (Kineto start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(trainer: Trainer, device: torch.device) -> int:
    """Highest allocator footprint above the start of a forward + backward + SGD step."""
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.forward_backward()
        trainer.optimizer.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.forward_backward()
        trainer.optimizer.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@dataclass
class Row:
    model: str
    variant: str
    batch: int
    quant_ms: float
    plain_ms: float
    quant_saved: int
    plain_saved: int
    quant_peak: int
    plain_peak: int
    pair_ratio: float
    spread: float

    @property
    def time_ratio(self) -> float:
        return self.quant_ms / self.plain_ms

    @property
    def saved_ratio(self) -> float:
        return self.quant_saved / self.plain_saved

    @property
    def peak_ratio(self) -> float:
        return self.quant_peak / self.plain_peak

    @property
    def memory_ratio(self) -> float:
        return max(self.saved_ratio, self.peak_ratio)

    @property
    def verdict(self) -> str:
        fails = []
        if self.time_ratio > TIME_TARGET:
            fails.append("time")
        if self.memory_ratio > MEMORY_TARGET:
            fails.append("memory")
        return "PASS" if not fails else "FAIL (" + ", ".join(fails) + ")"


def measure(name: str, variant: str, batch: int, steps: int, warmup: int,
            device: torch.device, seed: int) -> Row:
    setup = SETUPS[name]
    seed_everything(seed)
    options = {"num_classes": setup.num_classes}
    if name.startswith("resnet"):
        options["input_size"] = setup.input_size
    quantized = models.build(name, variant, **options).to(device)
    plain, acts, convs = plain_copy(quantized)
    if acts == 0:
        raise RuntimeError(f"{name}/{variant} has no ActQuant to replace")
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, setup.input_size, setup.input_size, generator=generator)
    labels = torch.randint(0, setup.num_classes, (batch,), generator=generator)
    images, labels = images.to(device), labels.to(device)
    pair = (Trainer(quantized, images, labels), Trainer(plain, images, labels))

    for _ in range(warmup):
        for trainer in pair:
            trainer.step()
    gc.collect()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(steps):
        # Alternate which one goes first, so neither always follows the other's frees.
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            times[k].append(timed_step(pair[k], device))
    saved = [saved_bytes(t) for t in pair]
    peak = [peak_bytes(t, device) for t in pair]
    pair_ratio = statistics.median(q / p for q, p in zip(*times))
    spread = max(_relative_iqr(t) for t in times)
    return Row(name, variant, batch, statistics.median(times[0]) * 1e3,
               statistics.median(times[1]) * 1e3, saved[0], saved[1], peak[0], peak[1],
               pair_ratio, spread)


def _relative_iqr(values: list[float]) -> float:
    if len(values) < 4:
        return float("nan")
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


def format_table(rows: list[Row]) -> str:
    header = (f"{'model':<12} {'variant':<10} {'batch':>5} {'quant ms':>9} {'plain ms':>9} "
              f"{'time x':>7} {'pair x':>7} {'spread':>7} {'saved MB q/p':>15} {'saved x':>8} {'peak MB q/p':>15} "
              f"{'peak x':>7} {'mem x':>6}  verdict")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<12} {r.variant:<10} {r.batch:>5} {r.quant_ms:>9.1f} {r.plain_ms:>9.1f} "
            f"{r.time_ratio:>7.3f} {r.pair_ratio:>7.3f} {r.spread:>7.1%} "
            f"{r.quant_saved / 2**20:>7.1f}/{r.plain_saved / 2**20:<7.1f} "
            f"{r.saved_ratio:>8.3f} {r.quant_peak / 2**20:>7.1f}/{r.plain_peak / 2**20:<7.1f} "
            f"{r.peak_ratio:>7.3f} {r.memory_ratio:>6.3f}  {r.verdict}")
    return "\n".join(lines)


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def selection(parser: argparse.ArgumentParser, args: argparse.Namespace, setups,
              known_variants) -> tuple[list[str], list[str]]:
    """``--models`` and ``--variants`` as lists, each name checked (``parser.error`` names an
    unknown one and its choices); shared with health_overhead.py."""
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n not in setups:
            parser.error(f"unknown model {n!r}; choose from {', '.join(setups)}")
    for v in variants:
        if v not in known_variants:
            parser.error(f"unknown variant {v!r}; choose from {', '.join(known_variants)}")
    return names, variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {', '.join(SETUPS)} (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from bnn, coupled, decoupled (default: all)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per side, interleaved (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every model (default: per model, "
                             + ", ".join(f"{k} {v.batch}" for k, v in SETUPS.items()) + ")")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    names, variants = selection(parser, args, SETUPS, VARIANTS)
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"quantizer overhead: quantized vs plain stand-ins (ActQuant -> Hardtanh(0, 1), "
          f"binary QConv2d -> identity weight)")
    print(f"targets: time <= {TIME_TARGET:.2f}x, memory <= {MEMORY_TARGET:.2f}x (quantized / plain; "
          f"memory = max of saved-for-backward and peak ratios)")
    print(f"load average before: {_load()}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.steps} timed steps per side (interleaved, medians), "
          f"seed {args.seed}")
    rows = []
    for n in names:
        batch = args.batch or SETUPS[n].batch
        for v in variants:
            started = time.perf_counter()
            row = measure(n, v, batch, args.steps, args.warmup, device, args.seed)
            rows.append(row)
            print(f"  {n}/{v} at {SETUPS[n].input_size}px, batch {batch}: time x "
                  f"{row.time_ratio:.3f}, memory x {row.memory_ratio:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(f"load average after: {_load()}")
    print(format_table(rows))
    failed = [r for r in rows if r.verdict != "PASS"]
    print()
    print(f"{len(rows) - len(failed)}/{len(rows)} within targets (time <= {TIME_TARGET:.2f}x, "
          f"memory <= {MEMORY_TARGET:.2f}x)")
    print("time x = quant ms / plain ms (medians); pair x = median ratio of adjacent steps; spread = "
          "larger relative IQR of the two sides; mem x = max(saved x, peak x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
