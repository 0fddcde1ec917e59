"""Progress on rank 0: a tqdm bar per epoch and one summary line per epoch."""
from __future__ import annotations

import sys

from tqdm import tqdm

from binaryduo.trainer.runtime.distributed import DistributedContext


def progress_bar(stage: str, epoch: int, epochs: int, steps: int, ctx: DistributedContext, *,
                 initial: int = 0):
    """A bar over the epoch's steps on rank 0 (None elsewhere, or when stderr is not a terminal);
    ``initial``: steps already done (an epoch resumed mid-way)."""
    if not ctx.is_main or not sys.stderr.isatty():
        return None
    return tqdm(total=steps, initial=initial, desc=f"{stage} {epoch + 1}/{epochs}", unit="step",
                leave=False, dynamic_ncols=True)


def summary_line(stage: str, epoch: int, epochs: int, metrics: dict[str, float],
                 ctx: DistributedContext) -> None:
    if not ctx.is_main:
        return
    print(f"[{stage}] epoch {epoch}/{epochs}  loss {metrics['train_loss']:.4f}  "
          f"val top-1 {metrics['val_top1']:.2f}  top-5 {metrics['val_top5']:.2f}  "
          f"lr {metrics['lr']:.4g}  {metrics['images_per_second']:.0f} img/s  "
          f"data wait {100 * metrics['data_wait_fraction']:.0f}%  "
          f"({metrics['epoch_seconds']:.1f} s)", flush=True)
