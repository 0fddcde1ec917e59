"""How a stage gets its first weights: from scratch, from a checkpoint file, from the previous
stage's checkpoint, or through the *decouple* transition: the coupled (ternary) network becomes
its exact binary equivalent by the rules of docs/method.md (decoupling).

Decoupling is verified on the weights that will be fine-tuned -- the DeepSpeed engine's module,
after the engine broadcast rank 0's parameters -- before a single fine-tuning step, on every rank
with its own validation batch, in two ways: in float64 (the construction: |dlogit| within the
stage's ``decouple_tolerance``, no changed prediction, parameters exactly as the rule makes them)
and in the run's own precision (fp32, or bf16 autocast: the fraction of quantized activations that
flip within ``decouple_flip_tolerance``). The verdict is agreed by all ranks: one failing rank
stops every rank with the same line (:class:`StageTransitionError`). The numbers go to the stage's
MLflow run either way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from binaryduo import models
from binaryduo.models.health import transition_health
from binaryduo.trainer.recipe import Recipe, StageSection
from binaryduo.trainer.run.checkpoint import StageCheckpoints, atomic_write_text, load_model_state
from binaryduo.trainer.run.loop import evaluate
from binaryduo.trainer.runtime.distributed import DistributedContext, all_gather_objects
from binaryduo.trainer.runtime.faults import FaultHooks
from binaryduo.trainer.tracking.tracker import Tracker


class StageTransitionError(RuntimeError):
    """A transition's guarantee does not hold (e.g. decoupling beyond tolerance): the run stops."""


def build_stage_model(recipe: Recipe, stage: StageSection) -> torch.nn.Module:
    return models.build(recipe.model.name, stage.variant, **recipe.model_options(stage))


def weight_bits(recipe: Recipe, stage: StageSection) -> int:
    return models.registry.resolve_config(recipe.model.name, stage.variant,
                                          **recipe.model_options(stage)).weight_bits


@dataclass
class PendingDecoupling:
    """A stage's decoupled start, not verified yet: the coupled model it came from and the
    coupled checkpoint's manifest entry (``epoch``, ``tag``, ``top1``). ``switched_from``: the
    previous stage's weight bits when this stage switches them (the check then runs on a twin
    of the stage's network with those bits, the decoupling's own result)."""

    coupled: torch.nn.Module
    chosen: dict
    switched_from: int | None = None


@dataclass
class PendingWeightSwitch:
    """A stage that starts from the previous one's latent weights with other weight bits (no
    decoupling): its accuracy before training is logged as the switch's step."""

    switched_from: int
    chosen: dict


def initial_weights(recipe: Recipe, index: int, model: torch.nn.Module, *, output_dir: Path
                    ) -> tuple[torch.nn.Module, PendingDecoupling | PendingWeightSwitch | None]:
    """The model stage ``index`` starts from (``model``: freshly built and seeded) and, when it
    was decoupled or switched its weight bits, what :func:`verify_start` needs once the engine
    holds it. A weight switch keeps the latent weights: the new bits' forward pass makes
    alpha*sign(W) (or W) of them, so loading the state dict into ``model`` is the switch."""
    stage = recipe.stages[index]
    if stage.init_from is None:
        return model, None
    if stage.init_from != "previous":
        model.load_state_dict(load_model_state(Path(stage.init_from)))
        return model, None
    previous = recipe.stages[index - 1]
    source = StageCheckpoints(output_dir / "checkpoints" / previous.name, keep_last=1,
                              is_main=False)
    weights = load_model_state(source.verified_model_file(stage.init_checkpoint))
    manifest = source.manifest()
    chosen = manifest["best"] if stage.init_checkpoint == "best" else manifest["epochs"][-1]
    bits_before = weight_bits(recipe, previous)
    switched_from = bits_before if bits_before != weight_bits(recipe, stage) else None
    if stage.transition != "decouple":
        model.load_state_dict(weights)
        return model, (PendingWeightSwitch(switched_from, chosen) if switched_from else None)
    coupled = build_stage_model(recipe, previous)
    coupled.load_state_dict(weights)
    decoupled = models.decouple(coupled)  # with the coupled network's weight bits
    if switched_from is None:
        return decoupled, PendingDecoupling(coupled, chosen)
    model.load_state_dict(decoupled.state_dict())
    return model, PendingDecoupling(coupled, chosen, switched_from)


def verify_start(pending: PendingDecoupling | PendingWeightSwitch, module: torch.nn.Module,
                 recipe: Recipe, index: int, *, ctx: DistributedContext, dtype: torch.dtype,
                 output_dir: Path, loaders, tracker: Tracker, run_id: str | None,
                 faults: FaultHooks) -> dict[str, float]:
    """The transition's check and metrics (step 0 of the stage's MLflow run), on ``module``:
    the engine's, what will be trained."""
    if isinstance(pending, PendingWeightSwitch):
        return log_weight_switch(pending, module, recipe, index, ctx=ctx, dtype=dtype,
                                 loaders=loaders, tracker=tracker, run_id=run_id)
    return verify_decoupled_start(pending, module, recipe, index, ctx=ctx, dtype=dtype,
                                  output_dir=output_dir, loaders=loaders, tracker=tracker,
                                  run_id=run_id, faults=faults)


def _twin_with_bits(recipe: Recipe, stage: StageSection, module: torch.nn.Module,
                    bits: int) -> torch.nn.Module:
    """``module``'s network and weights, built with other weight bits (on its device)."""
    options = {**recipe.model_options(stage), "weight_bits": bits}
    twin = models.build(recipe.model.name, stage.variant, **options)
    twin.load_state_dict(module.state_dict())
    return twin.to(next(module.parameters()).device)


def log_weight_switch(pending: PendingWeightSwitch, module: torch.nn.Module, recipe: Recipe,
                      index: int, *, ctx: DistributedContext, dtype: torch.dtype, loaders,
                      tracker: Tracker, run_id: str | None) -> dict[str, float]:
    """The switched network's validation accuracy before training, beside the previous stage's
    checkpoint it came from."""
    before = evaluate(module, loaders.val(), ctx=ctx, dtype=dtype)
    metrics = {"weight_switch_from_bits": float(pending.switched_from),
               "weight_switch_to_bits": float(weight_bits(recipe, recipe.stages[index])),
               "weight_switch_source_val_top1": pending.chosen["top1"],
               "weight_switch_val_top1": before.top1,
               "weight_switch_val_top1_delta": before.top1 - pending.chosen["top1"]}
    tracker.log_metrics(run_id, {**metrics, "val_top1": before.top1, "val_top5": before.top5},
                        step=0)
    return metrics


def verify_decoupled_start(pending: PendingDecoupling, module: torch.nn.Module, recipe: Recipe,
                           index: int, *, ctx: DistributedContext, dtype: torch.dtype,
                           output_dir: Path, loaders, tracker: Tracker, run_id: str | None,
                           faults: FaultHooks) -> dict[str, float]:
    """Checks ``module`` (the engine's: what will be fine-tuned) against the coupled model on
    this rank's fixed validation batch; every rank raises :class:`StageTransitionError` with the
    same line when any rank's check fails. Returns the transition's metrics, with the decoupled
    network's validation accuracy before any fine-tuning (in the run's precision)."""
    stage, previous = recipe.stages[index], recipe.stages[index - 1]
    faults.before_decoupling_check(module, stage.name)
    # a weight switch is checked on the decoupling's own result: the same weights, previous bits
    decoupled = module if pending.switched_from is None else _twin_with_bits(
        recipe, stage, module, pending.switched_from)
    check = models.check_decoupling(
        pending.coupled.to(ctx.device), decoupled, loaders.fixed_val_batch(), mode="eval",
        autocast=dtype if dtype != torch.float32 else None)
    problem = _problem(check, stage)
    verdicts = all_gather_objects(problem)
    metrics = {
        "decouple_max_abs_dlogit_f64": check.max_abs_dlogit,
        "decouple_changed_predictions_f64": float(check.changed_predictions),
        "decouple_parameter_deviation": check.parameter_deviation,
        "decouple_max_abs_dlogit_native": check.native_max_abs_dlogit,
        "decouple_changed_predictions_native": float(check.native_changed_predictions),
        "decouple_activation_flips_native": float(check.native_activation_flips),
        "decouple_activation_flip_fraction_native": check.native_flip_fraction,
    }
    failing = [(rank, line) for rank, line in enumerate(verdicts) if line is not None]
    if ctx.is_main:
        path = output_dir / f"decoupling_check_{stage.name}.json"
        atomic_write_text(path, json.dumps({
            **check.to_dict(), "tolerance": stage.decouple_tolerance,
            "flip_tolerance": stage.decouple_flip_tolerance, "passed": not failing,
            "failed_ranks": {str(rank): line for rank, line in failing}}, indent=2))
        tracker.log_artifact(run_id, path)
    if failing:
        tracker.log_metrics(run_id, metrics, step=0)
        rank, line = failing[0]
        others = f" (and on rank(s) {', '.join(str(r) for r, _ in failing[1:])})" if \
            failing[1:] else ""
        raise StageTransitionError(f"decoupling {previous.name!r} -> {stage.name!r} on rank "
                                   f"{rank}{others}: {line}")
    before = evaluate(decoupled, loaders.val(), ctx=ctx, dtype=dtype)
    chosen = pending.chosen["top1"]
    metrics.update({"decouple_coupled_val_top1": chosen,
                    "decouple_decoupled_val_top1": before.top1,
                    "decouple_val_top1_delta": before.top1 - chosen})
    if pending.switched_from is not None:  # then the switch, as its own step
        decoupled_top1 = before.top1
        before = evaluate(module, loaders.val(), ctx=ctx, dtype=dtype)
        metrics.update({"weight_switch_from_bits": float(pending.switched_from),
                        "weight_switch_to_bits": float(weight_bits(recipe, stage)),
                        "weight_switch_source_val_top1": decoupled_top1,
                        "weight_switch_val_top1": before.top1,
                        "weight_switch_val_top1_delta": before.top1 - decoupled_top1})
    tracker.log_metrics(run_id, {**metrics, "val_top1": before.top1, "val_top5": before.top5},
                        step=0)
    if recipe.health.enabled:  # both networks' activations on the check batch (docs/health.md)
        tracker.log_metrics(run_id, transition_health(
            pending.coupled, decoupled, loaders.fixed_val_batch(),
            autocast=dtype if dtype != torch.float32 else None), step=0)
    return metrics


def _problem(check: models.DecouplingCheck, stage: StageSection) -> str | None:
    """None when this rank's check passes, else what failed (one line)."""
    if not check.passed(stage.decouple_tolerance):
        return (f"not exact: float64 max |dlogit| {check.max_abs_dlogit:.3e} (tolerance "
                f"{stage.decouple_tolerance:g}), {check.changed_predictions} changed predictions, "
                f"parameter deviation {check.parameter_deviation:g}")
    if check.native_flip_fraction > stage.decouple_flip_tolerance:
        return (f"{check.native_activation_flips} of {check.activations_compared} activations "
                f"({check.native_flip_fraction:.2e}) flip in {check.native_dtype}, more than "
                f"decouple_flip_tolerance {stage.decouple_flip_tolerance:g} "
                f"({check.native_changed_predictions} changed predictions)")
    return None
