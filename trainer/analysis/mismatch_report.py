"""The gradient-mismatch study over activation types and STE shapes: run, table, JSON, plot.

One set of weights is measured with each activation type swapped in (``fp`` = clip(y, 0, 1) or the
model's own FP activation, ``k-bit``, ``ternary``, ``binary``; the registry options act_bits /
act_levels build them), so the comparison isolates the activation function from the weights. The
forward, hence the CDG, depends only on the activation type; each STE shape only changes the
coarse gradient, so CDG is computed once per activation type and compared with every STE shape's
gradient (``fp`` has no STE: its gradient is the exact autograd one, ``ste="exact"``). The same
coordinates (per layer, from the seed and the layer's name) are used for every activation type.
"""
from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from binaryduo.models.quantizers import STE

from binaryduo.trainer.analysis import mismatch

#: The activation-type names understood besides ``K-bit`` (K = 1..16).
NAMED_ACTIVATIONS = {"fp": {"act_bits": 32}, "ternary": {"act_levels": 2},
                     "binary": {"act_levels": 1}}
DEFAULT_ACTIVATIONS = ("fp", "2-bit", "ternary", "binary")
STE_NAMES = tuple(s.value for s in STE)
EXACT = "exact"
DELTA_SCALES = ("weight-rms", "absolute")


@dataclass(frozen=True)
class ActivationType:
    name: str
    options: dict

    @property
    def quantized(self) -> bool:
        return self.name != "fp"


def parse_activation(text: str) -> ActivationType:
    """``fp``, ``binary``, ``ternary`` or ``K-bit`` (1 <= K <= 16); ValueError otherwise."""
    name = text.strip().lower()
    if name in NAMED_ACTIVATIONS:
        return ActivationType(name, dict(NAMED_ACTIVATIONS[name]))
    match = re.fullmatch(r"(\d+)-?bits?", name)
    if match and 1 <= int(match.group(1)) <= 16:
        bits = int(match.group(1))
        return ActivationType(f"{bits}-bit", {"act_bits": bits})
    raise ValueError(f"unknown activation type {text!r}; expected fp, binary, ternary or K-bit "
                     f"(K = 1..16), e.g. {', '.join(DEFAULT_ACTIVATIONS)}")


def short_name(layer: str) -> str:
    """``features.conv3.conv`` -> ``conv3`` (table and plot labels)."""
    return layer.removeprefix("features.").removesuffix(".conv")


def select_layers(available: Sequence[mismatch.WeightLayer],
                  wanted: Sequence[str] | None) -> list[mismatch.WeightLayer]:
    """Layers by module name or short name (``features.conv3.conv`` or ``conv3``)."""
    if not wanted:
        return list(available)
    by_name = {layer.name: layer for layer in available}
    by_name.update({short_name(layer.name): layer for layer in available})
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(unknown)}; layers with weights: "
                         f"{', '.join(short_name(layer.name) for layer in available)}")
    chosen = {by_name[w].name for w in wanted}
    return [layer for layer in available if layer.name in chosen]


@dataclass(frozen=True)
class Settings:
    coordinates: int = 128
    delta: float = 0.5
    delta_scale: str = "weight-rms"
    seed: int = 0
    chunk_size: int | None = None
    naive: bool = False

    def __post_init__(self):
        if self.coordinates < 2:
            raise ValueError(f"coordinates {self.coordinates}: need at least 2 (two halves)")
        if not (self.delta > 0 and math.isfinite(self.delta)):
            raise ValueError(f"delta {self.delta}: must be a positive number")
        if self.delta_scale not in DELTA_SCALES:
            raise ValueError(f"delta scale {self.delta_scale!r}: expected one of {DELTA_SCALES}")

    def layer_delta(self, weight: torch.Tensor) -> float:
        if self.delta_scale == "absolute":
            return self.delta
        return self.delta * float(weight.detach().double().pow(2).mean().sqrt())


def layer_coordinates(seed: int, layer: mismatch.WeightLayer, count: int) -> torch.Tensor:
    """The layer's sampled coordinates: a pure function of (seed, layer name, count)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.name.encode()))
    return mismatch.sample_coordinates(layer.numel, count, generator)


@dataclass
class MismatchResult:
    records: list[mismatch.LayerMismatch]
    settings: Settings
    context: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": dict(self.settings.__dict__), "context": self.context,
                "seconds": self.seconds, "records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict) -> "MismatchResult":
        """Inverse of :meth:`to_dict` (re-plot or re-tabulate a saved JSON)."""
        records = []
        for raw in data["records"]:
            fields = {k: v for k, v in raw.items() if k != "spread"}
            fields["cosine_coordinate_halves"] = tuple(fields["cosine_coordinate_halves"])
            fields["cosine_batch_halves"] = tuple(fields["cosine_batch_halves"])
            records.append(mismatch.LayerMismatch(**fields))
        return cls(records, Settings(**data["settings"]), dict(data.get("context", {})),
                   dict(data.get("seconds", {})))

    def rows(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys((r.activation, r.ste) for r in self.records))

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.records))

    def format_table(self) -> str:
        layers = self.layers()
        by_key = {(r.activation, r.ste, r.layer): r for r in self.records}
        head = f"{'activation':<9} {'STE':<16}" + "".join(f"{short_name(l):>15}" for l in layers)
        lines = ["cosine(STE gradient, CDG) per layer, +- half the spread of the four split "
                 "estimates (coordinate halves, batch halves)", head, "-" * len(head)]
        for activation, ste in self.rows():
            cells = []
            for layer in layers:
                record = by_key[(activation, ste, layer)]
                spread = record.spread
                noise = f"+-{spread / 2:.3f}" if math.isfinite(spread) else "  +-nan"
                cells.append(f"{record.cosine:>7.3f}{noise:>8}")
            lines.append(f"{activation:<9} {ste:<16}" + "".join(cells))
        detail = (f"{'activation':<9} {'layer':<10} {'delta':>9} {'coords':>6} {'crossed':>7} "
                  f"{'CDG A.B':>8} {'STE A.B':>8} {'CDG rms':>9} {'STE rms':>9}")
        lines += ["", "CDG per activation type and layer (A.B = cosine between the two batch "
                  "halves' estimates; crossed = share of coordinates with CDG != 0)",
                  detail, "-" * len(detail)]
        seen = set()
        for record in self.records:
            if (record.activation, record.layer) in seen:
                continue
            seen.add((record.activation, record.layer))
            lines.append(
                f"{record.activation:<9} {short_name(record.layer):<10} {record.delta:>9.2e} "
                f"{record.coordinates:>6d} {record.crossed:>7.2f} "
                f"{record.cdg_batch_agreement:>8.3f} "
                f"{record.ste_batch_agreement:>8.3f} {record.cdg_rms:>9.2e} {record.ste_rms:>9.2e}")
        return "\n".join(lines)


def run_mismatch(build: Callable[[ActivationType, str], nn.Module],
                 activations: Sequence[ActivationType], stes: Sequence[str],
                 images: torch.Tensor, labels: torch.Tensor, settings: Settings, *,
                 layers: Sequence[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> MismatchResult:
    """Measures every activation type x STE shape on the fixed batch (``images``, ``labels``).

    ``build(activation, ste)`` returns the model with that activation and backward shape and the
    shared weights, on the batch's device and dtype (eval mode is set here).
    """
    records: list[mismatch.LayerMismatch] = []
    seconds: dict[str, float] = {}
    chosen: list[mismatch.WeightLayer] | None = None
    for activation in activations:
        start = time.perf_counter()
        shapes = list(stes) if activation.quantized else [EXACT]
        forward = build(activation,
                        shapes[0] if activation.quantized else STE.CLIPPED_IDENTITY.value)
        forward.eval()
        if chosen is None:
            chosen = select_layers(mismatch.weight_layers(forward), layers)
        pure = None if settings.naive else mismatch.forward_only_copy(forward)
        differences, deltas, coordinates = {}, {}, {}
        for layer in chosen:
            delta = settings.layer_delta(forward.get_parameter(layer.param))
            coords = layer_coordinates(settings.seed, layer, settings.coordinates)
            if settings.naive:
                diff = mismatch.loss_differences_naive(forward, layer, coords, delta, images,
                                                       labels)
            else:
                diff = mismatch.loss_differences_batched(forward, layer, coords, delta, images,
                                                         labels, chunk_size=settings.chunk_size,
                                                         forward_model=pure)
            differences[layer.name], deltas[layer.name] = diff, delta
            coordinates[layer.name] = coords
            if progress:
                progress(f"{activation.name}: {short_name(layer.name)} CDG done "
                         f"({time.perf_counter() - start:.1f} s)")
        for ste in shapes:
            model = forward if ste in (EXACT, shapes[0]) else build(activation, ste)
            model.eval()
            grads = mismatch.ste_gradients(model, [l.param for l in chosen], images, labels)
            for layer in chosen:
                records.append(mismatch.layer_mismatch(
                    activation=activation.name, ste=ste, layer=layer,
                    coordinates=coordinates[layer.name], differences=differences[layer.name],
                    delta=deltas[layer.name], gradients=grads[layer.param]))
        seconds[activation.name] = time.perf_counter() - start
    return MismatchResult(records, settings, seconds=seconds)


def plot_mismatch(result: MismatchResult, path: Path, title: str = "") -> Path:
    """Cosine per layer: colour = activation type, line style = STE shape; the bars span the four
    split estimates (coordinate halves, batch halves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result.layers()
    by_key = {(r.activation, r.ste, r.layer): r for r in result.records}
    rows = result.rows()
    activations = list(dict.fromkeys(a for a, _ in rows))
    colours = {a: f"C{i}" for i, a in enumerate(activations)}
    styles = {EXACT: ("-", "o"), STE.CLIPPED_IDENTITY.value: ("-", "o"),
              STE.APPROXSIGN.value: ("--", "s"), STE.SWISHSIGN.value: (":", "^")}
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.5 / max(1, len(rows))
    lowest = 0.0
    for index, (activation, ste) in enumerate(rows):
        xs, ys, lows, highs = [], [], [], []
        for position, layer in enumerate(layers):
            record = by_key[(activation, ste, layer)]
            values = [*record.cosine_coordinate_halves, *record.cosine_batch_halves]
            finite = [v for v in values if math.isfinite(v)]
            xs.append(position + (index - (len(rows) - 1) / 2) * width)
            ys.append(record.cosine)
            lows.append(max(0.0, record.cosine - min(finite)) if finite else 0.0)
            highs.append(max(0.0, max(finite) - record.cosine) if finite else 0.0)
            if finite:
                lowest = min(lowest, min(finite))
        line, marker = styles.get(ste, ("-.", "x"))
        label = activation if ste == EXACT else f"{activation} / {ste}"
        axis.errorbar(xs, ys, yerr=[lows, highs], marker=marker, markersize=4, linestyle=line,
                      color=colours[activation], capsize=2, linewidth=1.2, label=label)
    axis.set_xticks(range(len(layers)), [short_name(l) for l in layers])
    axis.set(xlabel="layer", ylabel="cosine(STE gradient, CDG)", ylim=(lowest - 0.05, 1.05),
             title=title or "gradient mismatch per layer")
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
