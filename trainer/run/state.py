"""What a run remembers between processes: the run directory's ``run_state.json``, where a resumed
stage picks up, and the seeds that make a redone epoch see the same data and dropout masks.

Seeds are pure functions of (recipe seed, stage, epoch), so an epoch redone after a resume sees the
same data order and dropout masks as the first time: a resumed seeded CPU run ends bitwise equal to
an uninterrupted one. A mid-epoch checkpoint (preemption) also stores every rank's RNG state and
running loss sums, so the rest of the epoch continues exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from binaryduo.trainer.run.checkpoint import atomic_write_text
from binaryduo.trainer.run.loop import EpochProgress

RUN_STATE = "run_state.json"


class DifferentRecipeError(RuntimeError):
    """``--resume`` of a run directory with another recipe (or other overrides)."""


@dataclass
class RunState:
    """What a resume needs besides checkpoints: MLflow run ids and finished stages."""

    parent_run_id: str | None = None
    stage_run_ids: dict[str, str] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)
    recipe_hash: str | None = None

    @classmethod
    def load(cls, directory: Path) -> "RunState":
        path = directory / RUN_STATE
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / RUN_STATE, json.dumps(self.__dict__, indent=2))

    def require_recipe(self, directory: Path, recipe_hash: str) -> None:
        """A run directory continues only the recipe that started it (same hash)."""
        if self.recipe_hash not in (None, recipe_hash):
            raise DifferentRecipeError(
                f"{directory} holds a run of a different recipe (hash {self.recipe_hash}, this one "
                f"{recipe_hash}); resume it with the same recipe and overrides, or use a new "
                f"--output")


@dataclass(frozen=True)
class StageResult:
    name: str
    variant: str
    best_top1: float
    final_top1: float
    final_top5: float
    epochs: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumePoint:
    """Where a stage resumed from its latest checkpoint: ``epoch`` epochs done, then
    ``step_in_epoch`` steps of the next one (preemption), with this rank's sums and RNG state."""

    epoch: int
    step_in_epoch: int
    transition_metrics: dict[str, float]
    sums: EpochProgress | None = None
    rng_states: dict | None = None

    @classmethod
    def from_client_state(cls, client: dict[str, Any], rank: int) -> "ResumePoint":
        step = int(client.get("step_in_epoch", 0))
        return cls(epoch=int(client["epoch"]), step_in_epoch=step,
                   transition_metrics=dict(client.get("transition_metrics", {})),
                   sums=EpochProgress(**client["epoch_progress"][rank]) if step else None,
                   rng_states=client["rng_states"][rank] if step else None)


def stage_seed(seed: int, stage_index: int, epoch: int) -> int:
    """Seed of one epoch of one stage (data order, augmentation, dropout)."""
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % (2**31 - 1)


def model_seed(seed: int, stage_index: int, epoch: int, rank: int) -> int:
    """Seed of this rank's model-side randomness (dropout) in one epoch of one stage.

    Every rank draws its own masks (ranks seeded alike would repeat one mask on every rank, as
    if the batch were ``world_size`` times smaller for dropout). Rank 0's seed is
    :func:`stage_seed`'s, so a one-rank run draws what it always drew. Data order and
    augmentation do not come from here: they are keyed per sample (``binaryduo.data``)."""
    return (stage_seed(seed, stage_index, epoch) + rank * 7_919_003) % (2**31 - 1)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
