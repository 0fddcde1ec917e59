"""Cost tables and decoupling verification across the model registry (used by the CLI)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from binaryduo import models

#: Size (Mbit) and FLOPs (millions) by the paper's counting rules (docs/method.md §5), with
#: default options. The report prints them beside the measured numbers.
PAPER_COSTS: dict[tuple[str, str], tuple[float, float]] = {
    ("alexnet", "decoupled"): (189.4, 119.0),
    ("alexnet", "bnn"): (191.0, 125.5),
    ("resnet18", "decoupled"): (31.9, 163.7),
    ("resnet18_sc", "decoupled"): (31.9, 163.7),
    ("resnet18", "bnn"): (33.5, 164.0),
    ("resnet18_sc", "bnn"): (33.5, 164.0),
}


def cost_summary_table(model_names: list[str], variants: list[str], options: dict) -> str:
    """One line per model x variant: size, FLOPs, MACs, compression, and the paper's numbers."""
    header = (f"{'model':<12} {'variant':<10} {'Mbit':>9} {'w/o BN':>9} {'MFLOPs':>9} "
              f"{'bin MMAC':>9} {'FP MMAC':>9} {'FP32 x':>7}  paper Mbit / MFLOPs")
    lines = [header, "-" * len(header)]
    for name in model_names:
        for variant in variants:
            report = models.cost_report(models.build(name, variant, **options))
            paper = PAPER_COSTS.get((name, variant)) if not options else None
            reference = f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else ""
            lines.append(
                f"{name:<12} {variant:<10} {report.mbit:>9.2f} {report.mbit_weights_only:>9.2f} "
                f"{report.flops / 1e6:>9.2f} {report.binary_macs / 1e6:>9.1f} "
                f"{report.fp_macs / 1e6:>9.1f} {report.compression:>7.1f}  {reference}")
    return "\n".join(lines)


@dataclass(frozen=True)
class VerifiedDecoupling:
    model: str
    check: models.DecouplingCheck
    seconds: float


def verify_decoupling(name: str, *, seed: int, batch_size: int, options: dict,
                      modes: tuple[str, ...] = ("eval", "train")) -> list[VerifiedDecoupling]:
    """Decouples a seeded coupled ``name`` with random BN state and checks it in every mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    coupled = models.randomize_batchnorm_(models.build(name, "coupled", **options), generator)
    decoupled = models.decouple(coupled)
    config = coupled.config
    batch = torch.randn(batch_size, config.in_channels, config.input_size, config.input_size,
                        generator=generator)
    results = []
    for mode in modes:
        start = time.perf_counter()
        check = models.check_decoupling(coupled, decoupled, batch, mode)
        results.append(VerifiedDecoupling(name, check, time.perf_counter() - start))
    return results


def decoupling_table(results: list[VerifiedDecoupling], tolerance: float) -> str:
    header = (f"{'model':<12} {'mode':<6} {'max|dlogit| f64':>16} {'pred. changed':>13} "
              f"{'max|dlogit| f32':>16} {'f32 flips':>16} {'secs':>6}  verdict")
    lines = [header, "-" * len(header)]
    for result in results:
        check = result.check
        flips = f"{check.native_activation_flips}/{check.activations_compared}"
        verdict = "exact" if check.passed(tolerance) else "FAILED"
        lines.append(
            f"{result.model:<12} {check.mode:<6} {check.max_abs_dlogit:>16.3e} "
            f"{check.changed_predictions:>13d} {check.native_max_abs_dlogit:>16.3e} "
            f"{flips:>16} {result.seconds:>6.1f}  {verdict}")
    return "\n".join(lines)
