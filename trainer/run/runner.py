"""The stage engine: a recipe's stages run in order, with their transitions, into one MLflow record.

Read ``run_recipe`` top to bottom: for each stage it builds the stage's model (from scratch, from the
previous stage's best/last checkpoint, from a path, or by decoupling the previous coupled model and
verifying the result), wraps it in a DeepSpeed engine, resumes from the stage's latest checkpoint
if there is one, then trains epoch by epoch: a seeded loader per epoch, one pass, BN statistics
synchronised, a distributed evaluation, metrics to MLflow, a checkpoint.

Seeds are pure functions of (recipe seed, stage, epoch), so an epoch redone after a resume sees the
same data order and dropout masks as the first time: a resumed seeded CPU run ends bitwise equal to
an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from binaryduo import models

from binaryduo.trainer.run import deepspeed_engine as engines
from binaryduo.trainer.runtime.faults import FaultHooks
from binaryduo.trainer.run.checkpoint import StageCheckpoints, atomic_write_text, load_model_state
from binaryduo.trainer.tracking.curves import plot_training_curves
from binaryduo.trainer.runtime.distributed import (DistributedContext, all_gather_objects, any_rank,
                          assert_replicas_agree, broadcast_object, on_main_then_broadcast,
                          sync_batchnorm_statistics)
from binaryduo.trainer.run.loop import EpochProgress, epoch_stats, evaluate, train_epoch
from binaryduo.trainer.runtime.preemption import Preempted
from binaryduo.trainer.run.progress import progress_bar, summary_line
from binaryduo.trainer.recipe.schema import Recipe, StageSection
from binaryduo.trainer.run.schedules import learning_rate
from binaryduo.trainer.runtime.sync_batchnorm import synchronize_batchnorm
from binaryduo.trainer.tracking.tracker import Tracker, flatten

RUN_STATE = "run_state.json"


class StageTransitionError(RuntimeError):
    """A transition's guarantee does not hold (e.g. decoupling beyond tolerance): the run stops."""


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


@dataclass(frozen=True)
class StageResult:
    name: str
    variant: str
    best_top1: float
    final_top1: float
    final_top5: float
    epochs: int
    extra: dict[str, float] = field(default_factory=dict)


def _stop_check(preemption, ctx: DistributedContext, stage: str, epoch: int, start_step: int,
                faults: FaultHooks):
    """The loop's per-step question "stop now?" (a ``signal`` fault is sent from here)."""
    if preemption is None:
        return None
    done = [start_step]

    def stop() -> bool:
        done[0] += 1
        faults.after_step(stage, epoch, done[0])
        return preemption.requested(ctx.device)
    return stop


def _fault_hook(stage: str, epoch: int, faults: FaultHooks):
    if not faults.active:
        return None
    return lambda engine, step_in_epoch: faults.after_backward(engine.module, stage, epoch,
                                                               step_in_epoch)


def _weights_finite(module: torch.nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in
                   [*module.parameters(), *module.buffers()] if t.is_floating_point())


def _divergence(stage: StageSection, epoch: int, error, checkpoints: StageCheckpoints) -> str:
    kept = checkpoints.manifest()["latest"]
    where = (f"the last good checkpoint {checkpoints.directory / kept} is kept" if kept else
             "no checkpoint of this stage had been written")
    return (f"stage {stage.name!r} epoch {epoch + 1}: {error}: the run diverged and stops; {where} "
            "(lower the learning rate, or look at the data, before resuming)")


def stage_seed(seed: int, stage_index: int, epoch: int) -> int:
    """Seed of one epoch of one stage (data order, augmentation, dropout)."""
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % (2**31 - 1)


def build_stage_model(recipe: Recipe, stage: StageSection) -> torch.nn.Module:
    return models.build(recipe.model.name, stage.variant, **recipe.model.options)


def run_recipe(recipe: Recipe, *, ctx: DistributedContext, output_dir: Path, tracker: Tracker,
               loaders, dtype: torch.dtype, tags: dict[str, str], artifacts_dir: Path,
               recipe_hash: str, preemption=None) -> list[StageResult]:
    """Runs (or resumes) every stage of ``recipe``; returns one result per stage."""
    state = broadcast_object(RunState.load(output_dir) if ctx.is_main else None)
    if state.recipe_hash not in (None, recipe_hash):
        raise StageTransitionError(f"{output_dir} holds a run of a different recipe (hash "
                                   f"{state.recipe_hash}, this one {recipe_hash}); resume it with "
                                   f"the same recipe and overrides, or use a new --output")
    state.recipe_hash = recipe_hash
    state.parent_run_id = tracker.start_run(recipe.name, tags=tags, run_id=state.parent_run_id)
    if state.parent_run_id is not None:
        tracker.log_params(state.parent_run_id, flatten(recipe.model_dump(mode="json")))
        tracker.log_artifact(state.parent_run_id, artifacts_dir / "recipe.resolved.yaml")
        tracker.log_artifact(state.parent_run_id, artifacts_dir / "provenance.json")
    if ctx.is_main:
        state.save(output_dir)
    try:
        return _run_stages(recipe, state, ctx=ctx, output_dir=output_dir, tracker=tracker,
                           loaders=loaders, dtype=dtype, tags=tags, artifacts_dir=artifacts_dir,
                           recipe_hash=recipe_hash, preemption=preemption)
    except Preempted:
        raise  # the runs stay RUNNING: --resume continues them
    except BaseException:
        # the record says what happened: the parent and the stage that failed are FAILED
        unfinished = [state.stage_run_ids[s.name] for s in recipe.stages
                      if s.name in state.stage_run_ids and s.name not in state.completed]
        for run_id in [*unfinished, state.parent_run_id]:
            try:
                tracker.finish(run_id, status="FAILED")
            except Exception:  # the tracking server may be what failed; the error below matters
                pass
        raise


def _run_stages(recipe: Recipe, state: RunState, *, ctx: DistributedContext, output_dir: Path,
                tracker: Tracker, loaders, dtype: torch.dtype, tags: dict[str, str],
                artifacts_dir: Path, recipe_hash: str, preemption) -> list[StageResult]:
    results: list[StageResult] = []
    faults = FaultHooks.from_environment(ctx.rank)
    for index, stage in enumerate(recipe.stages):
        checkpoints = StageCheckpoints(output_dir / "checkpoints" / stage.name,
                                       keep_last=recipe.checkpoint.keep_last, is_main=ctx.is_main,
                                       device=ctx.device, faults=faults)
        run_id = tracker.start_run(stage.name, parent=state.parent_run_id,
                                   tags={**tags, "stage": stage.name, "variant": stage.variant},
                                   run_id=state.stage_run_ids.get(stage.name))
        if run_id is not None:
            state.stage_run_ids[stage.name] = run_id
            tracker.log_params(run_id, {"stage_index": index,
                                        **flatten(stage.model_dump(mode="json"), "stage.")})
        if ctx.is_main:
            state.save(output_dir)

        # 1. The stage's model: from scratch, a checkpoint, or the previous stage (+ transition).
        torch.manual_seed(stage_seed(recipe.seed, index, -1))
        model = build_stage_model(recipe, stage)
        transition_metrics: dict[str, float] = {}
        # every rank reads the manifest (checkpoints live on a shared file system, as DeepSpeed's)
        # rank 0 verifies the latest checkpoint (falling back to the previous good one)
        latest = on_main_then_broadcast(checkpoints.resume_tag, ctx.is_main)
        resuming = latest is not None
        if not resuming:
            model, transition_metrics = _initial_weights(recipe, index, stage, model, ctx=ctx,
                                                         output_dir=output_dir, loaders=loaders,
                                                         dtype=dtype, tracker=tracker, run_id=run_id,
                                                         artifacts_dir=artifacts_dir,
                                                         faults=faults)
        model.to(ctx.device)
        if recipe.deepspeed.sync_batchnorm and ctx.world_size > 1:
            synchronize_batchnorm(model)

        # 2. The engine, and the stage's latest checkpoint when resuming.
        engine = engines.make_engine(model, stage, recipe, ctx=ctx, dtype=dtype,
                                     per_rank_batch=loaders.per_rank_batch)
        first_epoch, first_step_in_epoch, resumed_sums, rng_states = 0, 0, None, None
        if resuming:
            client = checkpoints.load(engine, latest)
            first_epoch = int(client["epoch"])
            first_step_in_epoch = int(client.get("step_in_epoch", 0))
            transition_metrics = dict(client.get("transition_metrics", {}))
            if first_step_in_epoch:
                resumed_sums = EpochProgress(**client["epoch_progress"][ctx.rank])
                rng_states = client["rng_states"][ctx.rank]

        steps_per_epoch = loaders.steps_per_epoch(stage_seed(recipe.seed, index, 0))

        def lr_at(step: int, stage=stage) -> float:
            return learning_rate(stage.schedule, stage.optimizer.lr, step, steps_per_epoch,
                                 stage.epochs)

        def client_state(epoch: int, top1: float, **extra) -> dict:
            return {"stage": stage.name, "stage_index": index, "epoch": epoch,
                    "step": epoch * steps_per_epoch, "top1": top1, "recipe_hash": recipe_hash,
                    "parent_run_id": state.parent_run_id, "stage_run_id": run_id,
                    "transition_metrics": transition_metrics, **extra}

        # 3. Epochs (the first one possibly from the middle, after a preemption).
        top1 = top5 = float("nan")
        for epoch in range(first_epoch, stage.epochs):
            start_step = first_step_in_epoch if epoch == first_epoch else 0
            faults.epoch_started(stage.name, epoch + 1)
            torch.manual_seed(stage_seed(recipe.seed, index, epoch + 1))
            if start_step:
                _set_rng_states(rng_states)
            loader = loaders.train(stage_seed(recipe.seed, index, 0), epoch, start_step)
            progress = progress_bar(stage.name, epoch, stage.epochs, len(loader), ctx,
                                    initial=start_step)
            try:
                sums = train_epoch(
                    engine, loader, ctx=ctx, dtype=dtype, lr_at=lr_at,
                    first_step=epoch * steps_per_epoch + start_step,
                    log_every=recipe.logging.every_steps,
                    on_log=lambda step, m: tracker.log_metrics(run_id, m, step),
                    progress=progress, resumed=resumed_sums if start_step else None,
                    stop=_stop_check(preemption, ctx, stage.name, epoch + 1, start_step, faults),
                    after_backward=_fault_hook(stage.name, epoch + 1, faults))
            except FloatingPointError as error:
                raise FloatingPointError(_divergence(stage, epoch, error, checkpoints)) from None
            if progress is not None:
                progress.close()
            if sums.stopped and start_step + sums.steps < steps_per_epoch:
                _stop_mid_epoch(checkpoints, engine, ctx, preemption, tracker, state, client_state,
                                stage=stage, epoch=epoch, step=start_step + sums.steps, sums=sums)
            stats = epoch_stats(sums, ctx)
            # a finite loss can still come with NaN/inf gradients on the last step: such weights
            # must never be checkpointed as "good"
            if any_rank(not _weights_finite(engine.module), ctx.device):
                raise FloatingPointError(_divergence(
                    stage, epoch, "the weights are not finite after the epoch", checkpoints))
            sync_batchnorm_statistics(engine.module)
            assert_replicas_agree(engine.module, f"stage {stage.name!r} epoch {epoch + 1}")
            evaluation = evaluate(engine.module, loaders.val(), ctx=ctx, dtype=dtype,
                                  after_first_batch=lambda e=epoch: faults.kill_point(
                                      "eval", stage.name, e + 1))
            top1, top5 = evaluation.top1, evaluation.top5
            if not math.isfinite(stats.loss):  # the per-step check stops sooner; belt and braces
                raise FloatingPointError(_divergence(
                    stage, epoch, f"training loss is {stats.loss}", checkpoints))
            metrics = {"train_loss": stats.loss, "val_top1": top1, "val_top5": top5,
                       "val_loss": evaluation.loss, "lr": stats.lr,
                       "images_per_second": stats.images_per_second * ctx.world_size,
                       "data_wait_fraction": stats.data_wait_fraction,
                       "epoch_seconds": stats.seconds}
            tracker.log_metrics(run_id, metrics, step=epoch + 1)
            summary_line(stage.name, epoch + 1, stage.epochs, metrics, ctx)
            last = epoch + 1 == stage.epochs
            stopping = preemption is not None and preemption.requested(ctx.device)
            if last or stopping or (epoch + 1) % recipe.checkpoint.every_epochs == 0:
                checkpoints.save(engine, epoch=epoch + 1, top1=top1,
                                 client_state=client_state(epoch + 1, top1))
                faults.kill_point("after_checkpoint", stage.name, epoch + 1)
            if stopping and not last:
                _stop_mid_epoch(checkpoints, engine, ctx, preemption, tracker, state, client_state,
                                stage=stage, epoch=epoch + 1, step=0, sums=None)

        # 4. The stage's record: final numbers, cost report of its model, the final model.
        manifest = checkpoints.manifest()
        if not math.isfinite(top1):  # resumed after the last epoch: read it back
            last = manifest["epochs"][-1]
            top1 = last["top1"]
        best = manifest["best"]["top1"]
        results.append(StageResult(stage.name, stage.variant, best, top1, top5, stage.epochs,
                                   transition_metrics))
        if ctx.is_main:
            report = models.cost_report(build_stage_model(recipe, stage))
            cost_path = artifacts_dir / f"cost_{stage.name}.json"
            atomic_write_text(cost_path, json.dumps(report.to_dict(), indent=2))
            tracker.log_artifact(run_id, cost_path)
            tracker.log_metrics(run_id, {"best_val_top1": best, "mbit": report.mbit,
                                         "mflops": report.flops / 1e6}, step=stage.epochs)
            tracker.log_artifact(run_id, checkpoints.model_file("last"), "model")
            tracker.finish(run_id)
            if stage.name not in state.completed:
                state.completed.append(stage.name)
            state.save(output_dir)
        del engine
    if ctx.is_main and tracker.enabled:
        curves = plot_training_curves(
            tracker.client, [(s.name, state.stage_run_ids[s.name]) for s in recipe.stages],
            artifacts_dir / "training_curves.png")
        tracker.log_artifact(state.parent_run_id, curves)
        tracker.finish(state.parent_run_id)
    return results


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _stop_mid_epoch(checkpoints: StageCheckpoints, engine, ctx: DistributedContext, preemption,
                    tracker: Tracker, state: RunState, client_state, *, stage: StageSection,
                    epoch: int, step: int, sums) -> None:
    """Preemption: checkpoint ``step`` steps into the epoch after ``epoch`` (unless the epoch
    just ended and was checkpointed), then raise :class:`Preempted`."""
    if step:
        extra = {"step_in_epoch": step,
                 "epoch_progress": all_gather_objects(dict(sums.__dict__)),
                 "rng_states": all_gather_objects(_rng_states())}
        # no BN sync here: an uninterrupted run does not sync mid-epoch either (with
        # deepspeed.sync_batchnorm the ranks' statistics are identical anyway)
        checkpoints.save(engine, epoch=epoch, top1=float("nan"), step=step,
                         client_state=client_state(epoch, float("nan"), **extra))
    where = f"stage {stage.name!r}, epoch {epoch + 1}, step {step}"
    tracker.log_metrics(state.parent_run_id, {"preempted": 1.0}, step=epoch * 1_000_000 + step)
    raise Preempted(f"checkpoint at {where} in {checkpoints.directory}",
                    requeue=preemption.wants_requeue)


def _initial_weights(recipe: Recipe, index: int, stage: StageSection, model: torch.nn.Module, *,
                     ctx: DistributedContext, output_dir: Path, loaders, dtype: torch.dtype,
                     tracker: Tracker, run_id: str | None,
                     artifacts_dir: Path,
                     faults: FaultHooks) -> tuple[torch.nn.Module, dict[str, float]]:
    if stage.init_from is None:
        return model, {}
    if stage.init_from != "previous":
        model.load_state_dict(load_model_state(Path(stage.init_from)))
        return model, {}
    previous = recipe.stages[index - 1]
    source = StageCheckpoints(output_dir / "checkpoints" / previous.name, keep_last=1,
                              is_main=ctx.is_main)
    if stage.transition != "decouple":
        model.load_state_dict(load_model_state(source.verified_model_file(stage.init_checkpoint)))
        return model, {}

    # Decouple: the previous stage's chosen coupled model -> its exact binary equivalent.
    coupled = build_stage_model(recipe, previous)
    coupled.load_state_dict(load_model_state(source.verified_model_file(stage.init_checkpoint)))
    manifest = source.manifest()
    chosen = manifest["best"] if stage.init_checkpoint == "best" else manifest["epochs"][-1]
    coupled_top1 = chosen["top1"]
    decoupled = models.decouple(coupled)
    batch = loaders.fixed_val_batch()
    check = models.check_decoupling(coupled, decoupled, batch, mode="eval")
    metrics = {
        "decouple_max_abs_dlogit_f64": check.max_abs_dlogit,
        "decouple_changed_predictions_f64": float(check.changed_predictions),
        "decouple_parameter_deviation": check.parameter_deviation,
        "decouple_max_abs_dlogit_native": check.native_max_abs_dlogit,
        "decouple_changed_predictions_native": float(check.native_changed_predictions),
        "decouple_activation_flips_native": float(check.native_activation_flips),
    }
    if ctx.is_main:
        path = artifacts_dir / f"decoupling_check_{stage.name}.json"
        atomic_write_text(path, json.dumps({**check.to_dict(), "tolerance": stage.decouple_tolerance,
                                            "passed": check.passed(stage.decouple_tolerance)},
                                           indent=2))
        tracker.log_artifact(run_id, path)
    if not check.passed(stage.decouple_tolerance):
        tracker.log_metrics(run_id, metrics, step=0)
        raise StageTransitionError(
            f"decoupling {previous.name!r} -> {stage.name!r} is not exact: float64 max |dlogit| "
            f"{check.max_abs_dlogit:.3e} (tolerance {stage.decouple_tolerance:g}), "
            f"{check.changed_predictions} changed predictions, parameter deviation "
            f"{check.parameter_deviation:g}")
    decoupled.to(ctx.device)
    # the decoupled model is still float32 here (the engine casts it for bf16 training)
    before = evaluate(decoupled, loaders.val(), ctx=ctx, dtype=torch.float32)
    metrics.update({"decouple_coupled_val_top1": coupled_top1,
                    "decouple_decoupled_val_top1": before.top1,
                    "decouple_val_top1_delta": before.top1 - coupled_top1})
    tracker.log_metrics(run_id, {**metrics, "val_top1": before.top1, "val_top5": before.top5},
                        step=0)
    faults.kill_point("decouple", stage.name, 0)
    return decoupled, metrics
