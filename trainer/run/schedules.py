"""Learning-rate schedules as pure functions of the step (nanoGPT style): resume needs no state."""
from __future__ import annotations

import math

from binaryduo.trainer.recipe import ScheduleSection


def learning_rate(schedule: ScheduleSection, base_lr: float, step: int, steps_per_epoch: int,
                  epochs: int) -> float:
    """LR for 0-based global ``step`` of a stage of ``epochs`` epochs.

    ``step`` milestones are 1-based epochs as in the authors' scripts: with milestone 41 the LR
    drops when epoch 41 (0-based index 40) begins. Warm-up ramps linearly per step, reaching
    ``base_lr`` at the end of ``warmup_epochs``; cosine and linear decay per step from the end of
    warm-up to 0 at the end of the stage.
    """
    if steps_per_epoch < 1 or step < 0:
        raise ValueError(f"need steps_per_epoch >= 1 and step >= 0, got {steps_per_epoch}, {step}")
    warmup_steps = schedule.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule.kind == "constant":
        return base_lr
    if schedule.kind == "step":
        epoch = step // steps_per_epoch + 1  # 1-based epoch this step belongs to
        drops = sum(1 for milestone in schedule.milestones if epoch >= milestone)
        return base_lr * schedule.gamma ** drops
    total = epochs * steps_per_epoch - warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total))
    if schedule.kind == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
