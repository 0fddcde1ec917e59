"""What a run remembers between processes: the run directory's ``run_state.json``, where a resumed
stage picks up, and the seeds that make a redone epoch see the same data and dropout masks.

Seeds are pure functions of (recipe seed, stage, epoch), so an epoch redone after a resume sees the
same data order and dropout masks as the first time: a resumed seeded CPU run ends bitwise equal to
an uninterrupted one. A mid-epoch checkpoint (preemption) also stores every rank's RNG state and
running loss sums, so the rest of the epoch continues exactly -- on as many ranks as wrote it. On
another number of ranks (ZeRO 0: weights, optimizer state, global step and data order are all
world-size-free) the sums are re-derived and every rank starts a fresh dropout stream; with
optimizer state split per rank (ZeRO >= 1) the resume is refused before any compute
(:func:`world_size_refusal`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from binaryduo.trainer.run.checkpoint import (CheckpointCorruptError, StageCheckpoints,
                                              atomic_write_text)
from binaryduo.trainer.run.loop import EpochProgress
from binaryduo.trainer.runtime.console import stderr_line

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
    #: every stage done and the record closed: what ``binaryduo sweep`` skips on a re-run
    finished: bool = False

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
    #: a mid-epoch checkpoint's health sums and flip reference (trainer/run/health.py)
    health: dict | None = None

    @classmethod
    def from_client_state(cls, client: dict[str, Any], rank: int, *, world_size: int,
                          seed: int) -> "ResumePoint":
        """Rank ``rank`` of ``world_size``'s resume point (``seed``: the recipe's).

        A mid-epoch checkpoint holds the sums and RNG state of each rank that wrote it: on as
        many ranks they are restored as saved (the epoch continues bit for bit); on another
        number they are re-derived (:func:`redistributed_progress`, :func:`resumed_model_seed`)
        and rank 0 says so in one line."""
        step = int(client.get("step_in_epoch", 0))
        epoch = int(client["epoch"])
        common = {"epoch": epoch, "step_in_epoch": step,
                  "transition_metrics": dict(client.get("transition_metrics", {})),
                  "health": client.get("health")}
        if not step:
            return cls(**common)
        saved = client["epoch_progress"]
        # checkpoints from before "world_size" was stored: one entry per rank that wrote them
        saved_world_size = int(client.get("world_size", len(saved)))
        if saved_world_size == world_size == len(saved):
            return cls(**common, sums=EpochProgress(**saved[rank]),
                       rng_states=client["rng_states"][rank])
        if rank == 0:
            stderr_line(
                f"binaryduo: note: stage {client.get('stage', '?')!r} was stopped at step {step} "
                f"of epoch {epoch + 1} by {saved_world_size} ranks and resumes on {world_size}: "
                f"the epoch's loss sums are re-derived from their total and each rank's dropout "
                f"RNG is seeded afresh (the saved per-rank states do not carry over)")
        stage_index = int(client["stage_index"])
        return cls(**common, sums=redistributed_progress(saved, rank),
                   rng_states=seeded_rng_states(
                       resumed_model_seed(seed, stage_index, epoch + 1, rank, step)))


def redistributed_progress(saved: list[dict[str, Any]], rank: int) -> EpochProgress:
    """Rank ``rank``'s share of a mid-epoch checkpoint's per-rank sums (``saved``, one entry per
    rank that wrote them) on any other number of ranks.

    The epoch's loss is ``sum of loss_sum / sum of steps`` over ranks (``loop.epoch_stats``),
    each rank adding its own batch's mean loss once per step: the mean over steps of the global
    batch's loss. Every new rank taking the old ranks' mean ``loss_sum`` with the same ``steps``
    keeps that quotient for the steps done, whatever the number of ranks, and the steps still to
    come add to it as usual. Images are a plain total (rank 0 holds it); times are per rank and
    ran side by side, so each new rank takes their mean."""
    count = len(saved)
    first = saved[0]
    return EpochProgress(
        loss_sum=sum(float(s["loss_sum"]) for s in saved) / count,
        images=sum(int(s["images"]) for s in saved) if rank == 0 else 0,
        steps=int(first["steps"]),
        waited=sum(float(s["waited"]) for s in saved) / count,
        seconds=sum(float(s["seconds"]) for s in saved) / count,
        lr=float(first["lr"]), stopped=bool(first["stopped"]))


#: DeepSpeed's per-rank optimizer state files (ZeRO >= 1; ``bf16_`` and the old name without the
#: underscore before ``optim`` included)
PARTITIONED_OPTIMIZER_FILE = re.compile(
    r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_?optim_states\.pt")


def partitioned_world_size(checkpoint: Path) -> int | None:
    """How many ranks wrote ``checkpoint``'s optimizer state where DeepSpeed split it per rank
    (one ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` each); None where it is one file
    (ZeRO 0: inside ``mp_rank_00_model_states.pt``, loadable on any number of ranks)."""
    ranks = {int(match.group(1)) for path in checkpoint.glob("*optim_states.pt")
             if (match := PARTITIONED_OPTIMIZER_FILE.fullmatch(path.name))}
    return len(ranks) or None


def world_size_refusal(run_dir: Path, stage_names: list[str], world_size: int) -> str | None:
    """Why ``run_dir`` cannot be resumed on ``world_size`` ranks, or None when it can.

    Read from the files (each stage's latest checkpoint), so checkpoints written before the
    client state recorded a world size are judged too. A manifest that cannot be read is left
    to the stage's resume, which reports it."""
    for name in stage_names:
        stage_dir = run_dir / "checkpoints" / name
        try:
            latest = StageCheckpoints(stage_dir, keep_last=1, is_main=False).latest_tag()
        except CheckpointCorruptError:
            continue
        if latest is None:
            continue
        saved = partitioned_world_size(stage_dir / latest)
        if saved is not None and saved != world_size:
            ranks = f"{saved} rank" + "s" * (saved != 1)
            return (f"--resume {run_dir}: checkpoint {stage_dir / latest} was written by "
                    f"{ranks} with its optimizer state split per rank (ZeRO stage >= 1), "
                    f"this run has {world_size}; resume it on {ranks}")
    return None


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


def resumed_model_seed(seed: int, stage_index: int, epoch: int, rank: int,
                       step_in_epoch: int) -> int:
    """Seed of this rank's dropout stream for the rest of an epoch resumed ``step_in_epoch``
    steps in on another number of ranks than started it (the saved per-rank RNG states belong to
    the old ranks). Offset from :func:`model_seed` by the step, so it neither replays the masks
    of the epoch's first steps nor depends on anything but its arguments."""
    return (model_seed(seed, stage_index, epoch, rank) + 1 + step_in_epoch * 104_729) % (2**31 - 1)


def seed_model_randomness(seed: int, stage_index: int, epoch: int, rank: int) -> None:
    """Seeds this process's torch generators (CPU and every GPU) for one epoch's dropout."""
    torch.manual_seed(model_seed(seed, stage_index, epoch, rank))


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def seeded_rng_states(seed: int) -> dict:
    """The states ``torch.manual_seed(seed)`` would give (CPU, and this process's GPU), for
    :func:`set_rng_states`; the current states are left alone."""
    states = {"torch": torch.Generator().manual_seed(seed).get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.Generator(device="cuda").manual_seed(seed).get_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
