"""The training-curve PNG of a run: validation top-1 and training loss per epoch, stage by stage."""
from __future__ import annotations

from pathlib import Path


def plot_training_curves(client, stage_runs: list[tuple[str, str]], path: Path) -> Path:
    """Reads each stage's history back from MLflow (so a resumed run plots every epoch) and draws
    one curve across stages, with the stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top1_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for name, run_id in stage_runs:
        top1 = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_top1"))
        loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss"))
        top1_axis.plot([offset + s for s, _ in top1], [v for _, v in top1], marker="o", label=name)
        loss_axis.plot([offset + s for s, _ in loss], [v for _, v in loss], marker="o", label=name)
        epochs = max((s for s, _ in top1), default=0)
        offset += epochs
        for axis in (top1_axis, loss_axis):
            axis.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
    top1_axis.set(xlabel="epoch (all stages; step 0 = after the transition)",
                  ylabel="validation top-1 (%)", title="validation top-1")
    loss_axis.set(xlabel="epoch (all stages)", ylabel="training loss", title="training loss")
    for axis in (top1_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
