"""The stage runner: a recipe's stages in order, each prepared, trained, evaluated, checkpointed and
recorded, into one MLflow record (a parent run, one child run per stage).

Read :meth:`StageRunner.run` and :meth:`StageRunner.run_stage` top to bottom; they are the method:

    for each stage:
        prepare   its MLflow run; its model from scratch, a checkpoint, or the previous stage through
                  a transition (transitions.py: decoupling is verified) -- or its latest checkpoint
        train     epoch by epoch: a seeded loader, one pass (loop.py), the weights checked, BN
                  statistics synchronised, a distributed evaluation, metrics, a checkpoint
        record    final numbers, the cost report, the model; the stage's run finished

Concerns that cut across come in through objects called at named points, never woven into the
loop: :class:`FaultHooks` (fault injection for the reliability suite; a no-op unless
``BINARYDUO_FAULT`` is set), :class:`Preemption` (stop at a step boundary, agreed by all ranks) and
the :class:`Tracker` (MLflow), with :class:`SystemMetrics` (CPU/GPU use, sampled in a thread of its
own). Seeds and resume points: state.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from binaryduo import models
from binaryduo.trainer.analysis.health_report import plot_health, read_health
from binaryduo.trainer.recipe import Recipe, StageSection
from binaryduo.trainer.run.checkpoint import StageCheckpoints, atomic_write_text, load_model_state
from binaryduo.trainer.run.deepspeed_engine import make_engine
from binaryduo.trainer.run.distill import Distiller, make_distiller
from binaryduo.trainer.run.health import NO_HEALTH, StageHealth
from binaryduo.trainer.run.loop import (EpochProgress, EpochStats, EvalStats, epoch_stats, evaluate,
                                        train_epoch)
from binaryduo.trainer.run.progress import progress_bar, summary_line
from binaryduo.trainer.run.schedules import learning_rate
from binaryduo.trainer.run.state import (ResumePoint, RunState, StageResult, rng_states,
                                         seed_model_randomness, set_rng_states, stage_seed)
from binaryduo.trainer.run.transitions import build_stage_model, initial_weights, verify_start
from binaryduo.trainer.runtime.distributed import (DistributedContext, all_gather_objects, any_rank,
                                                   assert_replicas_agree, on_main_then_broadcast,
                                                   sync_batchnorm_statistics)
from binaryduo.trainer.runtime.faults import FaultHooks
from binaryduo.trainer.runtime.preemption import Preempted
from binaryduo.trainer.runtime.sync_batchnorm import synchronize_batchnorm
from binaryduo.trainer.tracking.curves import plot_training_curves
from binaryduo.trainer.tracking.system_metrics import SystemMetrics
from binaryduo.trainer.tracking.tracker import Tracker, flatten


@dataclass
class ActiveStage:
    """One stage while it runs: its checkpoints, MLflow run, DeepSpeed engine and latest numbers."""

    index: int
    spec: StageSection
    checkpoints: StageCheckpoints
    run_id: str | None
    engine: object = None
    steps_per_epoch: int = 0
    resume: ResumePoint | None = None
    transition_metrics: dict[str, float] = field(default_factory=dict)
    health: StageHealth = NO_HEALTH  # per-layer health metrics (health.py)
    distiller: Distiller | None = None  # the stage's teacher and loss (distill.py)
    top1: float = float("nan")
    top5: float = float("nan")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def first_epoch(self) -> int:
        return self.resume.epoch if self.resume else 0

    def resumed_mid_epoch(self, epoch: int) -> ResumePoint | None:
        """The resume point when ``epoch`` is the one a preemption interrupted."""
        if self.resume and self.resume.step_in_epoch and epoch == self.resume.epoch:
            return self.resume
        return None

    def lr_at(self, step: int) -> float:
        return learning_rate(self.spec.schedule, self.spec.optimizer.lr, step,
                             self.steps_per_epoch, self.spec.epochs)

    def divergence(self, epoch: int, error) -> str:
        """The one line a diverged run stops with: where, why, and what is kept."""
        kept = self.checkpoints.manifest()["latest"]
        where = (f"the last good checkpoint {self.checkpoints.directory / kept} is kept" if kept
                 else "no checkpoint of this stage had been written")
        return (f"stage {self.name!r} epoch {epoch + 1}: {error}: the run diverged and stops; "
                f"{where} (lower the learning rate, or look at the data, before resuming)")


class StageRunner:
    """Runs (or resumes) every stage of a recipe in ``output_dir``; see the module docstring."""

    def __init__(self, recipe: Recipe, *, ctx: DistributedContext, output_dir: Path,
                 tracker: Tracker, loaders, dtype: torch.dtype, tags: dict[str, str],
                 recipe_hash: str, state: RunState, preemption=None,
                 datasets: list[dict[str, str]] | None = None, register: str | None = None):
        self.recipe, self.ctx, self.output_dir = recipe, ctx, output_dir
        #: MLflow dataset inputs of every run (tracking/datasets.py); the last stage's model is
        #: registered under ``register`` (``binaryduo train --register``)
        self.datasets, self.register = datasets or [], register
        self.tracker, self.loaders, self.dtype, self.tags = tracker, loaders, dtype, tags
        self.recipe_hash, self.preemption = recipe_hash, preemption
        self.faults = FaultHooks.from_environment(ctx.rank)
        self.state = state  # run_state.json as found (train.py checked it names this recipe)
        #: CPU/GPU use, sampled in a thread into the parent and running stage's runs (rank 0)
        self.system_metrics = SystemMetrics.for_recipe(recipe.logging, tracker,
                                                       gpu_expected=ctx.device.type == "cuda")

    # -- the method -------------------------------------------------------------------------------
    def run(self) -> list[StageResult]:
        self.open_record()
        try:
            with self.system_metrics.sampling(self.state.parent_run_id):
                results = [self.run_stage(index) for index in range(len(self.recipe.stages))]
            self.close_record()
            if self.ctx.is_main:
                self.state.finished = True
                self.state.save(self.output_dir)
            return results
        except Preempted:
            raise  # the runs stay RUNNING: --resume continues them
        except BaseException:
            self.mark_failed()
            raise

    def run_stage(self, index: int) -> StageResult:
        stage = self.prepare(index)
        for epoch in range(stage.first_epoch, stage.spec.epochs):
            sums = self.train(stage, epoch)
            stats = epoch_stats(sums, self.ctx)
            health = stage.health.epoch_metrics()
            self.check_and_synchronize(stage, epoch)
            evaluation = self.evaluate(stage, epoch)
            self.record_epoch(stage, epoch, stats, evaluation, health)
            self.checkpoint(stage, epoch)
        return self.finish(stage)

    # -- prepare ----------------------------------------------------------------------------------
    def prepare(self, index: int) -> ActiveStage:
        """The stage's MLflow run, model and engine; its latest checkpoint when there is one."""
        recipe, ctx, spec = self.recipe, self.ctx, self.recipe.stages[index]
        stage = ActiveStage(index, spec, StageCheckpoints(
            self.output_dir / "checkpoints" / spec.name, keep_last=recipe.checkpoint.keep_last,
            is_main=ctx.is_main, device=ctx.device, faults=self.faults),
            run_id=self.start_stage_record(index, spec))
        torch.manual_seed(stage_seed(recipe.seed, index, -1))
        model = build_stage_model(recipe, spec)
        # every rank reads the manifest (checkpoints live on a shared file system, as DeepSpeed's);
        # rank 0 verifies the latest checkpoint (falling back to the previous good one)
        latest = on_main_then_broadcast(stage.checkpoints.resume_tag, ctx.is_main)
        pending = None
        if latest is None:
            model, pending = initial_weights(recipe, index, model, output_dir=self.output_dir)
        if recipe.deepspeed.sync_batchnorm and ctx.world_size > 1:
            synchronize_batchnorm(model)
        stage.engine = make_engine(model, spec, recipe, ctx=ctx,
                                   per_rank_batch=self.loaders.per_rank_batch)
        if pending is not None:  # decoupled/switched: checked on what will train, by every rank
            stage.transition_metrics = verify_start(
                pending, stage.engine.module, recipe, index, ctx=ctx, dtype=self.dtype,
                output_dir=self.output_dir, loaders=self.loaders, tracker=self.tracker,
                run_id=stage.run_id, faults=self.faults)
            self.faults.kill_point("decouple", spec.name, 0)
        if latest is not None:
            stage.resume = ResumePoint.from_client_state(
                stage.checkpoints.load(stage.engine, latest), ctx.rank,
                world_size=ctx.world_size, seed=recipe.seed)
            stage.transition_metrics = stage.resume.transition_metrics
        stage.health = StageHealth(recipe.health, stage.engine.module, ctx)
        if spec.distill is not None:
            stage.distiller = make_distiller(recipe, spec.distill, output_dir=self.output_dir,
                                             device=ctx.device, dtype=self.dtype)
            if ctx.is_main:
                self.tracker.log_params(stage.run_id, stage.distiller.provenance)
        stage.steps_per_epoch = self.loaders.steps_per_epoch(stage_seed(recipe.seed, index, 0))
        return stage

    # -- train ------------------------------------------------------------------------------------
    def train(self, stage: ActiveStage, epoch: int) -> EpochProgress:
        """One pass over the epoch's data (the rest of it, after a preemption); a preemption
        request stops it at a step boundary with a mid-epoch checkpoint."""
        recipe, ctx = self.recipe, self.ctx
        resumed = stage.resumed_mid_epoch(epoch)
        start_step = resumed.step_in_epoch if resumed else 0
        self.faults.epoch_started(stage.name, epoch + 1)
        # dropout masks: this rank's own stream (data order and augmentation are keyed per sample)
        seed_model_randomness(recipe.seed, stage.index, epoch + 1, ctx.rank)
        if resumed:
            set_rng_states(resumed.rng_states)
        stage.health.epoch_started(resumed.health if resumed else None)
        loader = self.loaders.train(stage_seed(recipe.seed, stage.index, 0), epoch, start_step)
        progress = progress_bar(stage.name, epoch, stage.spec.epochs, len(loader), ctx,
                                initial=start_step)
        try:
            sums = train_epoch(
                stage.engine, loader, ctx=ctx, dtype=self.dtype, lr_at=stage.lr_at,
                first_step=epoch * stage.steps_per_epoch + start_step,
                log_every=recipe.logging.every_steps,
                on_log=lambda step, m: self.tracker.log_metrics(stage.run_id, m, step),
                progress=progress, resumed=resumed.sums if resumed else None,
                stop=self.preemption,
                faults=self.faults.at_epoch(stage.name, epoch + 1), health=stage.health,
                distill=stage.distiller)
        except FloatingPointError as error:
            raise FloatingPointError(stage.divergence(epoch, error)) from None
        if progress is not None:
            progress.close()
        # ``sums.steps`` counts the epoch's steps, including those done before a resume
        if sums.stopped and sums.steps < stage.steps_per_epoch:
            self.stop_for_preemption(stage, epoch, sums.steps, sums)
        return sums

    def check_and_synchronize(self, stage: ActiveStage, epoch: int) -> None:
        """Before the epoch's model is evaluated or checkpointed: finite weights, one set of BN
        statistics, identical replicas on every rank."""
        # a finite loss can still come with NaN/inf gradients on the last step: such weights
        # must never be checkpointed as "good"
        if any_rank(not _weights_finite(stage.engine.module), self.ctx.device):
            raise FloatingPointError(stage.divergence(
                epoch, "the weights are not finite after the epoch"))
        sync_batchnorm_statistics(stage.engine.module)
        assert_replicas_agree(stage.engine.module, f"stage {stage.name!r} epoch {epoch + 1}")

    # -- evaluate, record, checkpoint ---------------------------------------------------------------
    def evaluate(self, stage: ActiveStage, epoch: int) -> EvalStats:
        evaluation = evaluate(
            stage.engine.module, self.loaders.val(), ctx=self.ctx, dtype=self.dtype,
            after_first_batch=self.faults.at_epoch(stage.name, epoch + 1).after_first_eval_batch)
        stage.top1, stage.top5 = evaluation.top1, evaluation.top5
        return evaluation

    def record_epoch(self, stage: ActiveStage, epoch: int, stats: EpochStats,
                     evaluation: EvalStats, health: dict[str, float] | None = None) -> None:
        if not math.isfinite(stats.loss):  # the per-step check stops sooner; belt and braces
            raise FloatingPointError(stage.divergence(epoch, f"training loss is {stats.loss}"))
        metrics = {"train_loss": stats.loss, "val_top1": evaluation.top1,
                   "val_top5": evaluation.top5, "val_loss": evaluation.loss, "lr": stats.lr,
                   # images summed over ranks, per second of this rank's epoch: the job's rate
                   "images_per_second": stats.images_per_second,
                   "data_wait_fraction": stats.data_wait_fraction,
                   "epoch_seconds": stats.seconds}
        if stage.distiller is not None:  # the teacher's cost (distill.py)
            metrics.update(stage.distiller.epoch_metrics(stats.images, stats.seconds))
        self.tracker.log_metrics(stage.run_id, metrics, step=epoch + 1)
        if health:  # health/<layer>/<metric> (docs/health.md)
            self.tracker.log_metrics(stage.run_id, health, step=epoch + 1)
        summary_line(stage.name, epoch + 1, stage.spec.epochs, metrics, self.ctx)

    def checkpoint(self, stage: ActiveStage, epoch: int) -> None:
        """The epoch's checkpoint (every ``checkpoint.every_epochs``, the last epoch, and before
        a preemption stop)."""
        done = epoch + 1
        last = done == stage.spec.epochs
        stopping = self.preemption is not None and self.preemption.requested(self.ctx.device)
        if last or stopping or done % self.recipe.checkpoint.every_epochs == 0:
            stage.checkpoints.save(stage.engine, epoch=done, top1=stage.top1,
                                   client_state=self.client_state(stage, done, stage.top1))
            self.faults.kill_point("after_checkpoint", stage.name, done)
        if stopping and not last:
            self.stop_for_preemption(stage, done, 0, None)

    def client_state(self, stage: ActiveStage, epoch: int, top1: float, **extra) -> dict:
        """What a checkpoint stores beside the weights (read back by ResumePoint)."""
        return {"stage": stage.name, "stage_index": stage.index, "epoch": epoch,
                "step": epoch * stage.steps_per_epoch, "top1": top1,
                "recipe_hash": self.recipe_hash, "parent_run_id": self.state.parent_run_id,
                "stage_run_id": stage.run_id, "transition_metrics": stage.transition_metrics,
                # a resume on another number of ranks re-derives the per-rank entries (state.py)
                "world_size": self.ctx.world_size, **extra}

    def stop_for_preemption(self, stage: ActiveStage, epoch: int, step: int,
                            sums: EpochProgress | None) -> None:
        """Checkpoint ``step`` steps into the epoch after ``epoch`` (unless the epoch just ended
        and was checkpointed), then raise :class:`Preempted`."""
        if step:
            extra = {"step_in_epoch": step,
                     "epoch_progress": all_gather_objects(dict(sums.__dict__)),
                     "rng_states": all_gather_objects(rng_states()),
                     "health": stage.health.checkpoint_state()}
            # no BN sync here: an uninterrupted run does not sync mid-epoch either (with
            # deepspeed.sync_batchnorm the ranks' statistics are identical anyway)
            stage.checkpoints.save(stage.engine, epoch=epoch, top1=float("nan"), step=step,
                                   client_state=self.client_state(stage, epoch, float("nan"),
                                                                  **extra))
        where = f"stage {stage.name!r}, epoch {epoch + 1}, step {step}"
        self.tracker.log_metrics(self.state.parent_run_id, {"preempted": 1.0},
                                 step=epoch * 1_000_000 + step)
        raise Preempted(f"checkpoint at {where} in {stage.checkpoints.directory}",
                        requeue=self.preemption.wants_requeue)

    # -- the MLflow record ------------------------------------------------------------------------
    def open_record(self) -> None:
        """The parent run (a new one, or the one a resumed run started) with the recipe's
        parameters, resolved recipe and provenance."""
        ctx, tracker, state = self.ctx, self.tracker, self.state
        state.recipe_hash = self.recipe_hash
        state.parent_run_id = tracker.start_run(self.recipe.name, tags=self.tags,
                                                run_id=state.parent_run_id)
        if state.parent_run_id is not None:
            tracker.log_params(state.parent_run_id, flatten(self.recipe.model_dump(mode="json")))
            tracker.log_inputs(state.parent_run_id, self.datasets)
            tracker.log_artifact(state.parent_run_id, self.output_dir / "recipe.resolved.yaml")
            tracker.log_artifact(state.parent_run_id, self.output_dir / "provenance.json")
        if ctx.is_main:
            state.save(self.output_dir)

    def start_stage_record(self, index: int, spec: StageSection) -> str | None:
        run_id = self.tracker.start_run(
            spec.name, parent=self.state.parent_run_id,
            tags={**self.tags, "stage": spec.name, "variant": spec.variant},
            run_id=self.state.stage_run_ids.get(spec.name))
        if run_id is not None:
            self.state.stage_run_ids[spec.name] = run_id
            self.system_metrics.follow(run_id)
            self.tracker.log_params(run_id, {"stage_index": index,
                                             **flatten(spec.model_dump(mode="json"), "stage.")})
            self.tracker.log_inputs(run_id, self.datasets)
        if self.ctx.is_main:
            self.state.save(self.output_dir)
        return run_id

    def finish(self, stage: ActiveStage) -> StageResult:
        """The stage's record: final numbers, cost report of its model, the final model."""
        manifest = stage.checkpoints.manifest()
        top1 = stage.top1
        if not math.isfinite(top1):  # resumed after the last epoch: read it back
            top1 = manifest["epochs"][-1]["top1"]
        best = manifest["best"]["top1"]
        result = StageResult(stage.name, stage.spec.variant, best, top1, stage.top5,
                             stage.spec.epochs, stage.transition_metrics)
        if not self.ctx.is_main:
            return result
        report = models.cost_report(build_stage_model(self.recipe, stage.spec))
        cost_path = self.output_dir / f"cost_{stage.name}.json"
        atomic_write_text(cost_path, json.dumps(report.to_dict(), indent=2))
        self.tracker.log_artifact(stage.run_id, cost_path)
        self.tracker.log_metrics(stage.run_id, {"best_val_top1": best, "mbit": report.mbit,
                                                "mflops": report.flops / 1e6},
                                 step=stage.spec.epochs)
        self.tracker.log_artifact(stage.run_id, stage.checkpoints.model_file("last"), "model")
        if self.recipe.logging.log_models and self.tracker.enabled:
            self.log_stage_model(stage)
        self.system_metrics.follow(self.state.parent_run_id)  # between stages: the parent only
        self.tracker.finish(stage.run_id)
        if stage.name not in self.state.completed:
            self.state.completed.append(stage.name)
        self.state.save(self.output_dir)
        return result

    def log_stage_model(self, stage: ActiveStage) -> None:
        """The stage's final network as an MLflow Model (tracking/models.py), linked to the
        stage's run at its last epoch; the last stage's is registered with ``--register``."""
        from binaryduo.trainer.tracking.models import MODELS_DIR, save_stage_model

        model = build_stage_model(self.recipe, stage.spec)  # plain module: no engine, no compile
        model.load_state_dict(load_model_state(stage.checkpoints.model_file("last")))
        config = model.config
        metadata = {"stage": stage.name, "variant": stage.spec.variant,
                    "recipe": self.recipe.name, "recipe_hash": self.recipe_hash,
                    "model": self.recipe.model.name, "epochs": stage.spec.epochs}
        if stage.transition_metrics:
            metadata["decoupling_check"] = dict(stage.transition_metrics)
        directory = save_stage_model(
            model, self.output_dir / MODELS_DIR / stage.name,
            input_shape=(config.in_channels, config.input_size, config.input_size),
            metadata=metadata)
        self.tracker.log_model(stage.run_id, stage.name, directory, step=stage.spec.epochs,
                               tags={"stage": stage.name, "variant": stage.spec.variant})
        if self.register and stage.index == len(self.recipe.stages) - 1:
            self.tracker.register_model(stage.run_id, stage.name, self.register)

    def close_record(self) -> None:
        """Training curves of every stage on the parent run, which is then finished."""
        if not (self.ctx.is_main and self.tracker.enabled):
            return
        curves = plot_training_curves(
            self.tracker.client,
            [(s.name, self.state.stage_run_ids[s.name]) for s in self.recipe.stages],
            self.output_dir / "training_curves.png")
        self.tracker.log_artifact(self.state.parent_run_id, curves)
        self.log_health_plot()
        self.tracker.finish(self.state.parent_run_id)

    def log_health_plot(self) -> None:
        """``health.png`` on the parent run: every stage's health per layer (health_report.py);
        best effort (a record the store cannot give back costs the plot, not the run)."""
        if not self.recipe.health.enabled:
            return
        try:
            record = read_health(self.tracker.client, [(s.name, self.state.stage_run_ids[s.name])
                                                       for s in self.recipe.stages])
            path = plot_health(record, self.output_dir / "health.png", title=self.recipe.name)
        except Exception as error:  # noqa: BLE001 (the run's results stand)
            print(f"binaryduo: warning: no health plot ({type(error).__name__}: {error})",
                  flush=True)
            return
        if path is not None:
            self.tracker.log_artifact(self.state.parent_run_id, path)

    def mark_failed(self) -> None:
        """The record says what happened: the parent and the stage that failed are FAILED."""
        state = self.state
        unfinished = [state.stage_run_ids[s.name] for s in self.recipe.stages
                      if s.name in state.stage_run_ids and s.name not in state.completed]
        for run_id in [*unfinished, state.parent_run_id]:
            try:
                self.tracker.finish(run_id, status="FAILED")
            except Exception:  # the tracking server may be what failed; the error itself matters
                pass


def _weights_finite(module: torch.nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in
                   [*module.parameters(), *module.buffers()] if t.is_floating_point())


def run_recipe(recipe: Recipe, **kwargs) -> list[StageResult]:
    """Runs (or resumes) every stage of ``recipe``; returns one result per stage."""
    return StageRunner(recipe, **kwargs).run()
