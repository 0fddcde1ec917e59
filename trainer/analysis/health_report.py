"""Health metrics of a run read back from its MLflow record: a table, JSON and a multi-panel plot
(``binaryduo analyze health``; the training itself logs the plot as ``health.png`` on the parent
run at the end). Metric names and what healthy values look like: docs/health.md.

The record is what the stage runs logged: ``health/<layer>/<metric>`` at every epoch (step = the
epoch, 1-based) and, on a decoupled stage, ``decouple_health/{coupled,decoupled}/<layer>/<metric>``
at step 0 (both networks on the decoupling check's batch).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

HEALTH = "health/"
TRANSITION = "decouple_health/"

#: Table columns: (heading, metric key or a function of the layer's metrics).
COLUMNS = ("flip_ratio", "flip_ratio_step", "alpha", "grad_norm", "ste_coverage",
           "occupancy_0", "occupancy_0.5", "occupancy_1")


@dataclass
class StageHealth:
    """One stage's health: metric key -> [(epoch, value)], and the transition's values."""

    name: str
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    transition: dict[str, float] = field(default_factory=dict)

    @property
    def epochs(self) -> list[int]:
        return sorted({s for values in self.history.values() for s, _ in values})

    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for key in self.history:
            seen.setdefault(key.split("/")[1], None)
        return list(seen)

    def value(self, layer: str, metric: str, epoch: int) -> float | None:
        for step, value in self.history.get(f"{HEALTH}{layer}/{metric}", []):
            if step == epoch:
                return value
        return None


def read_health(client, stage_runs: list[tuple[str, str]]) -> list[StageHealth]:
    """Every stage's health histories (``stage_runs``: (name, run id) in stage order)."""
    stages = []
    for name, run_id in stage_runs:
        metrics = client.get_run(run_id).data.metrics
        stage = StageHealth(name)
        for key in sorted(metrics):
            if key.startswith(HEALTH):
                stage.history[key] = sorted((m.step, m.value)
                                            for m in client.get_metric_history(run_id, key))
            elif key.startswith(TRANSITION):
                stage.transition[key.removeprefix(TRANSITION)] = metrics[key]
        stages.append(stage)
    return stages


def mean_level(values: dict[str, float]) -> float | None:
    """sum(level * P(level)) from ``occupancy_<level>`` entries: the activation's mean output,
    which decoupling preserves (the binary pair's P(1) is the ternary mean level)."""
    pairs = [(float(k.removeprefix("occupancy_")), v) for k, v in values.items()
             if k.startswith("occupancy_")]
    return sum(level * p for level, p in pairs) if pairs else None


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def format_table(stages: list[StageHealth]) -> str:
    header = f"{'stage':<12} {'epoch':>5} {'layer':<14} " + " ".join(
        f"{c.replace('occupancy_', 'P(') + (')' if c.startswith('occupancy_') else ''):>11}"
        for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for stage in stages:
        for epoch in stage.epochs:
            for layer in stage.layers():
                cells = " ".join(f"{_cell(stage.value(layer, c, epoch)):>11}" for c in COLUMNS)
                lines.append(f"{stage.name:<12} {epoch:>5} {layer:<14} {cells}")
        if stage.transition:
            lines.append(f"{stage.name:<12} {'start':>5} decoupling check batch "
                         "(coupled -> decoupled): mean level, STE coverage")
            for layer in _transition_layers(stage):
                c, d = _side(stage, "coupled", layer), _side(stage, "decoupled", layer)
                mismatch = stage.transition.get(f"{layer}/level_mismatch")
                lines.append(f"{'':<12} {'':>5} {layer:<14} mean level {_cell(mean_level(c))} -> "
                             f"{_cell(mean_level(d))}, coverage "
                             f"{_cell(c.get('ste_coverage'))} -> {_cell(d.get('ste_coverage'))}"
                             f", level mismatch {_cell(mismatch)}")
    return "\n".join(lines)


def _side(stage: StageHealth, side: str, layer: str) -> dict[str, float]:
    prefix = f"{side}/{layer}/"
    return {k.removeprefix(prefix): v for k, v in stage.transition.items() if k.startswith(prefix)}


def _transition_layers(stage: StageHealth) -> list[str]:
    seen: dict[str, None] = {}
    for key in stage.transition:
        if key.startswith("coupled/"):
            seen.setdefault(key.split("/")[1], None)
    return list(seen)


def to_dict(stages: list[StageHealth]) -> dict:
    return {"stages": [{"name": s.name, "metrics": {k: [[e, v] for e, v in values]
                                                     for k, values in s.history.items()},
                        "transition": s.transition} for s in stages]}


def to_json(stages: list[StageHealth]) -> str:
    return json.dumps(to_dict(stages), indent=2)


#: Panels: (title, how a layer's value at an epoch is read).
PANELS = (("weight flip ratio (since previous epoch)", "flip_ratio"),
          ("weight flip ratio per step", "flip_ratio_step"),
          ("STE coverage (0 < y < 1)", "ste_coverage"),
          ("mean activation level", "mean_level"),
          ("P(1/2) (ternary)", "occupancy_0.5"),
          ("alpha = mean|W|", "alpha"),
          ("latent-weight gradient norm", "grad_norm"))


def _panel_value(stage: StageHealth, layer: str, metric: str, epoch: int) -> float | None:
    if metric == "mean_level":
        values = {k.split("/")[-1]: v for k, history in stage.history.items()
                  if k.startswith(f"{HEALTH}{layer}/occupancy_")
                  for s, v in history if s == epoch}
        return mean_level(values)
    return stage.value(layer, metric, epoch)


def plot_health(stages: list[StageHealth], path: Path, title: str = "") -> Path | None:
    """One panel per metric, one line per layer over the epochs of every stage (stage boundaries
    dotted; the decoupled network's values on the check batch at its stage's start, x marks).
    None when the record holds no health metrics."""
    if not any(s.history for s in stages):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(layer for s in stages for layer in s.layers()))
    colours = {layer: plt.cm.viridis(i / max(len(layers) - 1, 1)) for i, layer in enumerate(layers)}
    figure, axes = plt.subplots(2, 4, figsize=(18, 8))
    axes = axes.ravel()
    offsets, offset = [], 0
    for stage in stages:
        offsets.append(offset)
        offset += max(stage.epochs, default=0)
    for axis, (heading, metric) in zip(axes, PANELS):
        for layer in layers:
            xs, ys = [], []
            for stage, start in zip(stages, offsets):
                for epoch in stage.epochs:
                    value = _panel_value(stage, layer, metric, epoch)
                    if value is not None:
                        xs.append(start + epoch)
                        ys.append(value)
                if metric in ("ste_coverage", "mean_level") and stage.transition:
                    side = _side(stage, "decoupled", layer)
                    value = mean_level(side) if metric == "mean_level" else \
                        side.get("ste_coverage")
                    if value is not None:  # on the boundary: after the transition
                        axis.plot([start + 0.5], [value], "x", color=colours[layer])
            if xs:
                axis.plot(xs, ys, marker="o", markersize=3, color=colours[layer], label=layer)
        for stage, start in zip(stages[1:], offsets[1:]):
            axis.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_title(heading, fontsize=10)
        axis.set_xlabel("epoch (all stages)")
        axis.grid(alpha=0.3)
    axes[-1].axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[layer], marker="o", markersize=3) for layer in layers]
    axes[-1].legend(handles, layers, loc="center", fontsize=8, ncol=2, title="layer")
    names = " -> ".join(s.name for s in stages)
    figure.suptitle(f"{title + ': ' if title else ''}binary-network health per layer ({names}; "
                    "dotted: stage boundary; x: decoupled network on the check batch)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
