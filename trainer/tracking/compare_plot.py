"""``binaryduo compare --plot``: validation top-1 per epoch of every run and top-1 versus model
size (``compare.py`` builds the rows; ``seed_groups`` reuses :func:`curve_of` and
:func:`finish_plot`)."""
from __future__ import annotations

from pathlib import Path


def curve_of(record) -> tuple[list[int], list[float], list[int]]:
    """(x, top-1, stage boundaries) of a run's validation curve: the stages one after the other
    (x = epochs since the first stage began; step 0 of a decouple stage sits on the boundary)."""
    offset, xs, ys, boundaries = 0, [], [], []
    for index, stage in enumerate(record.stages):
        history = record.histories.get(stage.info.run_id, [])
        xs += [offset + step for step, _ in history]
        ys += [value for _, value in history]
        offset += max((step for step, _ in history), default=0)
        if index < len(record.stages) - 1:
            boundaries.append(offset)
    return xs, ys, boundaries


def plot_comparison(records: list, rows: list, path: Path) -> Path:
    """Two panels: validation top-1 per epoch of every run (stages one after the other, boundaries
    dotted, step 0 of a decouple stage = the decoupled model before fine-tuning), and top-1 versus
    model size (Mbit) of every run's stages and the paper's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, sizes) = plt.subplots(1, 2, figsize=(13, 5))
    colours: dict[str, object] = {}
    for record in records:
        label = record.parent.data.tags.get("recipe", record.parent.info.run_id[:8])
        xs, ys, boundaries = curve_of(record)
        for boundary in boundaries:
            curves.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        if xs:
            line, = curves.plot(xs, ys, marker="o", markersize=3, label=label)
            colours[record.parent.info.run_id] = line.get_color()
    curves.set(xlabel="epoch (stages in order; dotted: stage boundary)",
               ylabel="validation top-1 (%)", title="validation top-1 per epoch")
    curves.grid(alpha=0.3)
    if records:
        curves.legend(fontsize=7)

    shown = [r for r in rows if r.mbit is not None and r.top1 is not None
             and "before fine-tune" not in r.stage]
    for row in shown:
        paper = row.source == "paper"
        sizes.scatter(row.mbit, row.top1, marker="*" if paper else "o", s=90 if paper else 30,
                      color="black" if paper else colours.get(row.parent_run_id, "tab:blue"))
        text = (f"paper {row.model} {row.method}" if paper
                else f"{row.recipe}: {row.stage.split(' ')[0]}")
        sizes.annotate(text, (row.mbit, row.top1), fontsize=6, xytext=(3, 3),
                       textcoords="offset points")
    return finish_plot(figure, sizes, [r.mbit for r in shown], path,
                       title="accuracy vs size (star: paper)")


def finish_plot(figure, sizes, mbits: list[float], path: Path, *, title: str) -> Path:
    """The size panel's axes (log where sizes span > 20x: VGG-7 ~10 Mbit, AlexNet ~190); saved."""
    import matplotlib.pyplot as plt

    sizes.set(xlabel="model size (Mbit)", ylabel="top-1 (%)", title=title)
    mbits = [m for m in mbits if m > 0]
    if mbits and max(mbits) / min(mbits) > 20:
        sizes.set_xscale("log")
    sizes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
