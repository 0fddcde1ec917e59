"""A stage's health metrics (docs/health.md) at the training loop's named points.

:class:`StageHealth` wraps :class:`binaryduo.models.health.HealthProbe` (the device-side sums) for
one stage's engine module: the loop calls ``step_started`` / ``after_backward`` / ``after_step``
(no host read among them), the runner calls ``epoch_started`` before an epoch's pass (restoring
a mid-epoch checkpoint's sums), ``epoch_metrics`` after it (one all-reduce of one packed float64
tensor, on every rank: activation counts add up over ranks, the replicated weights' statistics
are the same on every rank), ``step_metrics`` at the loop's logging steps (the same, under
``health_steps/``) and ``checkpoint_state`` when a preemption stops an epoch mid-way.

A mid-epoch checkpoint holds every rank's sums and the flip reference (the signs of the weights
at the epoch's start, 8 a byte), so the resumed epoch logs what an uninterrupted one would. An
epoch-end checkpoint needs nothing: the next epoch's reference is the checkpointed weights. On
another number of ranks the activation counts go to rank 0 (their sum is what is logged) and
every rank takes the weight statistics (one copy of the replicated values).
"""
from __future__ import annotations

from typing import Any

from binaryduo.models.health import HealthProbe
from binaryduo.trainer.recipe.schema import HealthSection
from binaryduo.trainer.runtime.distributed import (DistributedContext, all_gather_objects,
                                                   all_reduce_sum)


#: Key prefix of the values logged every ``logging.every_steps`` (the per-epoch ones: ``health/``).
STEP_PREFIX = "health_steps/"


class StageHealth:
    """Health of one stage's training (a no-op when ``section`` is off; see the module
    docstring)."""

    def __init__(self, section: HealthSection | None, module, ctx: DistributedContext | None):
        self.ctx = ctx
        self.probe = None
        self.log_steps = section is not None and section.log_steps
        if section is not None and section.enabled:
            self.probe = HealthProbe(module, section.metrics, section.sample_every_steps)

    @property
    def enabled(self) -> bool:
        return self.probe is not None

    # -- the runner's points ---------------------------------------------------------------------
    def epoch_started(self, resumed: dict[str, Any] | None = None) -> None:
        """Fresh sums and flip reference, or a mid-epoch checkpoint's (``resumed``)."""
        if self.probe is None:
            return
        self.probe.start_epoch()
        if resumed:
            self.probe.load_state_dict(self._rank_state(resumed["ranks"]))
            self.probe.load_reference(resumed["reference"])

    def epoch_metrics(self) -> dict[str, float]:
        """``health/<layer>/<metric>`` of the epoch, the same on every rank (a collective)."""
        if self.probe is None:
            return {}
        totals = all_reduce_sum(self.probe.totals(), self.ctx.device)
        return self.probe.summarize(totals, self.ctx.world_size)

    def step_metrics(self) -> dict[str, float]:
        """The epoch so far as ``health_steps/<layer>/<metric>`` (a collective, called by every
        rank at the same logging step; nothing when ``health.log_steps`` is off). Running values
        since the epoch's start, not a window: a resumed epoch restores the sums, so it logs what
        an uninterrupted one would."""
        if self.probe is None or not self.log_steps:
            return {}
        return {STEP_PREFIX + key.removeprefix("health/"): value
                for key, value in self.epoch_metrics().items()}

    def checkpoint_state(self) -> dict[str, Any] | None:
        """What a mid-epoch checkpoint keeps (a collective: every rank's sums)."""
        if self.probe is None:
            return None
        return {"ranks": all_gather_objects(self.probe.state_dict()),
                "reference": self.probe.reference_state()}

    def close(self) -> None:
        if self.probe is not None:
            self.probe.remove()

    # -- the loop's points (device work only) ----------------------------------------------------
    def step_started(self, step: int) -> None:
        if self.probe is not None:
            self.probe.step_started(step)

    def after_backward(self) -> None:
        if self.probe is not None:
            self.probe.after_backward()

    def after_step(self) -> None:
        if self.probe is not None:
            self.probe.after_step()

    # -- resume ----------------------------------------------------------------------------------
    def _rank_state(self, saved: list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's sums from a checkpoint written by ``len(saved)`` ranks."""
        rank, world_size = self.ctx.rank, self.ctx.world_size
        if len(saved) == world_size:
            return saved[rank]
        split = self.probe.activation_slots
        first = saved[0]
        if rank == 0:
            acts = [sum(s["sums"][i] for s in saved) for i in range(split)]
            seen = [sum(s["seen"][i] for s in saved) for i in range(len(first["seen"]))]
        else:
            acts, seen = [0.0] * split, [0] * len(first["seen"])
        return {"sums": acts + list(first["sums"][split:]), "seen": seen, "steps": first["steps"],
                "grads_missing": first["grads_missing"]}


#: Health switched off (the loop's default).
NO_HEALTH = StageHealth(None, None, None)
