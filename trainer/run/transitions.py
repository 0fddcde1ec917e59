"""How a stage gets its first weights: from scratch, from a checkpoint file, from the previous
stage's checkpoint, or through the *decouple* transition: the coupled (ternary) network becomes
its exact binary equivalent by the rules of docs/method.md (decoupling).

Decoupling is verified before a single fine-tuning step: float64 logits of the coupled and the
decoupled network on a fixed validation batch must agree within the stage's
``decouple_tolerance``, with no changed prediction and parameters exactly as the rule makes them.
A failed check stops the run (:class:`StageTransitionError`); the check's numbers go to the stage's
MLflow run either way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from binaryduo import models
from binaryduo.trainer.recipe import Recipe, StageSection
from binaryduo.trainer.run.checkpoint import StageCheckpoints, atomic_write_text, load_model_state
from binaryduo.trainer.run.loop import evaluate
from binaryduo.trainer.runtime.distributed import DistributedContext
from binaryduo.trainer.runtime.faults import FaultHooks
from binaryduo.trainer.tracking.tracker import Tracker


class StageTransitionError(RuntimeError):
    """A transition's guarantee does not hold (e.g. decoupling beyond tolerance): the run stops."""


def build_stage_model(recipe: Recipe, stage: StageSection) -> torch.nn.Module:
    return models.build(recipe.model.name, stage.variant, **recipe.model.options)


def initial_weights(recipe: Recipe, index: int, model: torch.nn.Module, *,
                    ctx: DistributedContext, output_dir: Path, loaders, tracker: Tracker,
                    run_id: str | None,
                    faults: FaultHooks) -> tuple[torch.nn.Module, dict[str, float]]:
    """The model stage ``index`` starts from (``model``: freshly built and seeded), and the
    transition's metrics (empty unless it decoupled)."""
    stage = recipe.stages[index]
    if stage.init_from is None:
        return model, {}
    if stage.init_from != "previous":
        model.load_state_dict(load_model_state(Path(stage.init_from)))
        return model, {}
    source = StageCheckpoints(output_dir / "checkpoints" / recipe.stages[index - 1].name,
                              keep_last=1, is_main=ctx.is_main)
    if stage.transition != "decouple":
        model.load_state_dict(load_model_state(source.verified_model_file(stage.init_checkpoint)))
        return model, {}
    decoupled, metrics = decouple_previous(recipe, index, source, ctx=ctx, output_dir=output_dir,
                                           loaders=loaders, tracker=tracker, run_id=run_id)
    faults.kill_point("decouple", stage.name, 0)
    return decoupled, metrics


def decouple_previous(recipe: Recipe, index: int, source: StageCheckpoints, *,
                      ctx: DistributedContext, output_dir: Path, loaders, tracker: Tracker,
                      run_id: str | None) -> tuple[torch.nn.Module, dict[str, float]]:
    """The previous stage's chosen coupled model -> its exact binary equivalent, verified, with
    its validation accuracy before any fine-tuning."""
    stage, previous = recipe.stages[index], recipe.stages[index - 1]
    coupled = build_stage_model(recipe, previous)
    coupled.load_state_dict(load_model_state(source.verified_model_file(stage.init_checkpoint)))
    manifest = source.manifest()
    chosen = manifest["best"] if stage.init_checkpoint == "best" else manifest["epochs"][-1]
    decoupled = models.decouple(coupled)
    metrics = _verify_decoupling(coupled, decoupled, stage, previous, ctx=ctx,
                                 output_dir=output_dir, loaders=loaders, tracker=tracker,
                                 run_id=run_id)
    decoupled.to(ctx.device)
    # the decoupled model is still float32 here (the engine casts it for bf16 training)
    before = evaluate(decoupled, loaders.val(), ctx=ctx, dtype=torch.float32)
    metrics.update({"decouple_coupled_val_top1": chosen["top1"],
                    "decouple_decoupled_val_top1": before.top1,
                    "decouple_val_top1_delta": before.top1 - chosen["top1"]})
    tracker.log_metrics(run_id, {**metrics, "val_top1": before.top1, "val_top5": before.top5},
                        step=0)
    return decoupled, metrics


def _verify_decoupling(coupled: torch.nn.Module, decoupled: torch.nn.Module, stage: StageSection,
                       previous: StageSection, *, ctx: DistributedContext, output_dir: Path,
                       loaders, tracker: Tracker, run_id: str | None) -> dict[str, float]:
    """The exactness check on a fixed validation batch; its report is an artifact of the stage's
    run. Raises :class:`StageTransitionError` beyond the stage's tolerance."""
    check = models.check_decoupling(coupled, decoupled, loaders.fixed_val_batch(), mode="eval")
    metrics = {
        "decouple_max_abs_dlogit_f64": check.max_abs_dlogit,
        "decouple_changed_predictions_f64": float(check.changed_predictions),
        "decouple_parameter_deviation": check.parameter_deviation,
        "decouple_max_abs_dlogit_native": check.native_max_abs_dlogit,
        "decouple_changed_predictions_native": float(check.native_changed_predictions),
        "decouple_activation_flips_native": float(check.native_activation_flips),
    }
    passed = check.passed(stage.decouple_tolerance)
    if ctx.is_main:
        path = output_dir / f"decoupling_check_{stage.name}.json"
        atomic_write_text(path, json.dumps({**check.to_dict(), "tolerance": stage.decouple_tolerance,
                                            "passed": passed}, indent=2))
        tracker.log_artifact(run_id, path)
    if not passed:
        tracker.log_metrics(run_id, metrics, step=0)
        raise StageTransitionError(
            f"decoupling {previous.name!r} -> {stage.name!r} is not exact: float64 max |dlogit| "
            f"{check.max_abs_dlogit:.3e} (tolerance {stage.decouple_tolerance:g}), "
            f"{check.changed_predictions} changed predictions, parameter deviation "
            f"{check.parameter_deviation:g}")
    return metrics
