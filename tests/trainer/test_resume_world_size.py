"""``--resume`` on another number of ranks than wrote the checkpoint, without a run: the per-rank
state of a mid-epoch checkpoint re-derived, and the ZeRO >= 1 refusal read from the files. (The
real 2-rank -> 1-rank resume and refusal: tests/trainer/test_launchers.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from binaryduo.trainer.run.loop import EpochProgress
from binaryduo.trainer.run.state import (ResumePoint, resumed_model_seed, rng_states,
                                         set_rng_states, world_size_refusal)


# -- re-derivation and the refusal, without a run ---------------------------------------------------
def _mid_epoch_client(world_size: int, *, recorded: bool = True) -> dict:
    """A mid-epoch checkpoint's client state (2 steps into epoch 1 of stage 0) of ``world_size``
    ranks; ``recorded=False``: written before the world size was stored."""
    torch.manual_seed(11)
    states = []
    for _ in range(world_size):
        torch.rand(3)
        states.append(rng_states())
    client = {"stage": "fp", "stage_index": 0, "epoch": 0, "step_in_epoch": 2,
              "transition_metrics": {},
              "epoch_progress": [dict(loss_sum=2.0 + rank, images=32 * 2, steps=2,
                                      waited=0.1 * (rank + 1), seconds=1.0 + rank, lr=0.05,
                                      stopped=True) for rank in range(world_size)],
              "rng_states": states}
    if recorded:
        client["world_size"] = world_size
    return client


def _reported_loss(points: list[ResumePoint]) -> float:
    """``loop.epoch_stats``'s loss of sums as the ranks hold them."""
    return sum(p.sums.loss_sum for p in points) / sum(p.sums.steps for p in points)


@pytest.mark.parametrize("recorded", [True, False])
def test_the_same_number_of_ranks_restores_each_rank_as_saved(recorded):
    client = _mid_epoch_client(2, recorded=recorded)
    for rank in range(2):
        point = ResumePoint.from_client_state(client, rank, world_size=2, seed=3)
        assert point.sums == EpochProgress(**client["epoch_progress"][rank])
        assert point.rng_states is client["rng_states"][rank]
        assert (point.epoch, point.step_in_epoch) == (0, 2)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("recorded", [True, False])
def test_another_number_of_ranks_re_derives_sums_and_rng(world_size, recorded, capsys):
    client = _mid_epoch_client(2, recorded=recorded)
    points = [ResumePoint.from_client_state(client, rank, world_size=world_size, seed=3)
              for rank in range(world_size)]
    # the epoch's loss so far: the 2 ranks' (2 + 3) / (2 + 2) steps, whatever the ranks now
    assert _reported_loss(points) == pytest.approx(5.0 / 4.0)
    assert [p.sums.images for p in points] == [128] + [0] * (world_size - 1)
    assert {(p.sums.steps, p.sums.lr, p.step_in_epoch) for p in points} == {(2, 0.05, 2)}
    assert all(p.sums.seconds == pytest.approx(1.5) and p.sums.waited == pytest.approx(0.15)
               for p in points)
    # each rank a fresh stream of its own, a function of (seed, stage, epoch, rank, step)
    for rank, point in enumerate(points):
        set_rng_states(point.rng_states)
        drawn = torch.rand(4)
        torch.manual_seed(resumed_model_seed(3, 0, 1, rank, 2))
        assert torch.equal(drawn, torch.rand(4)), rank
    draws = []
    for point in points:
        set_rng_states(point.rng_states)
        draws.append(torch.rand(4))
    assert all(not torch.equal(draws[0], other) for other in draws[1:])
    lines = capsys.readouterr().err.splitlines()  # rank 0 says what was re-derived, once
    assert lines == [line for line in lines if line.startswith("binaryduo: note: ")]
    assert len(lines) == 1 and f"by 2 ranks and resumes on {world_size}:" in lines[0], lines


def test_an_epoch_end_checkpoint_needs_nothing_per_rank():
    client = {"stage": "fp", "stage_index": 0, "epoch": 1, "transition_metrics": {"a": 1.0},
              "world_size": 2}
    point = ResumePoint.from_client_state(client, 3, world_size=4, seed=3)
    assert point == ResumePoint(epoch=1, step_in_epoch=0, transition_metrics={"a": 1.0})


def _stage_checkpoint(run: Path, stage: str, tag: str, files: list[str]) -> Path:
    directory = run / "checkpoints" / stage / tag
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_bytes(b"")
    (directory.parent / "manifest.json").write_text(json.dumps(
        {"epochs": [], "latest": tag, "best": None}))
    return directory


def test_partitioned_optimizer_state_is_refused_on_another_number_of_ranks(tmp_path):
    _stage_checkpoint(tmp_path, "coupled", "epoch-0002", ["mp_rank_00_model_states.pt"])
    zero1 = _stage_checkpoint(tmp_path, "finetune", "epoch-0000-step-000003", [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    stages = ["coupled", "finetune", "not-started"]
    assert world_size_refusal(tmp_path, stages, 2) is None
    refusal = world_size_refusal(tmp_path, stages, 1)
    assert refusal == (f"--resume {tmp_path}: checkpoint {zero1} was written by 2 ranks with its "
                       "optimizer state split per rank (ZeRO stage >= 1), this run has 1; "
                       "resume it on 2 ranks")
    # ZeRO 0 (one optimizer file inside the model states) resumes on any number of ranks
    assert world_size_refusal(tmp_path, ["coupled"], 5) is None
