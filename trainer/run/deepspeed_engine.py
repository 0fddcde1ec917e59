"""DeepSpeed engine for one stage: a fresh optimizer per stage, ZeRO 0/1, always a float32 module
(bf16 is autocast around the forward pass: precision.py); gradients all-reduced in float32.
"""
from __future__ import annotations

import torch

from binaryduo.models import parameter_roles
from binaryduo.trainer.recipe import Recipe, StageSection
from binaryduo.trainer.recipe.schema import OptimizerSection, ParameterGroupSection
from binaryduo.trainer.run.precision import memory_format
from binaryduo.trainer.runtime.distributed import DistributedContext


def parameter_groups(model: torch.nn.Module, spec: OptimizerSection) -> list[dict]:
    """The optimizer's parameter groups: one group of every parameter in ``named_parameters``
    order when the recipe sets no ``groups`` (weight decay on every parameter, BN included: the
    authors' setting; bitwise today's runs), else one group per parameter role
    (models.parameter_roles) with its own ``weight_decay`` and ``lr_mult`` (the loop sets each
    group's LR to the schedule's LR times ``lr_mult``). Empty roles are left out."""
    if not spec.groups:
        return [{"params": list(model.parameters()), "weight_decay": spec.weight_decay,
                 "lr_mult": 1.0, "role": "all"}]
    groups = []
    for role, named in parameter_roles(model).items():
        if not named:
            continue
        settings = spec.groups.get(role, ParameterGroupSection())
        decay = spec.weight_decay if settings.weight_decay is None else settings.weight_decay
        groups.append({"params": [parameter for _, parameter in named], "weight_decay": decay,
                       "lr_mult": settings.lr_mult, "role": role})
    return groups


def make_optimizer(model: torch.nn.Module, stage: StageSection) -> torch.optim.Optimizer:
    spec = stage.optimizer
    groups = parameter_groups(model, spec)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum,
                               nesterov=spec.nesterov and spec.momentum > 0,
                               weight_decay=spec.weight_decay)
    adam = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return adam(groups, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)


def deepspeed_config(recipe: Recipe, *, per_rank_batch: int, world_size: int) -> dict:
    return {
        "train_batch_size": per_rank_batch * world_size,
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        # the module stays float32 under bf16 too (precision.py)
        "bf16": {"enabled": False},
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def make_engine(model: torch.nn.Module, stage: StageSection, recipe: Recipe, *,
                ctx: DistributedContext, per_rank_batch: int):
    """``deepspeed.initialize`` around ``model`` (moved to the process's device, in its layout:
    precision.memory_format) with the stage's optimizer; with the recipe's ``compile``, the
    engine's module compiled in place."""
    import deepspeed

    model.to(ctx.device, memory_format=memory_format(ctx.device))
    clipped = any(getattr(m, "latent_clip", None) is not None for m in model.modules())
    if clipped and recipe.deepspeed.zero_stage > 0:
        # ZeRO steps separate fp32 partitions, which a clamp of the module's parameters would not
        # reach (the next step would overwrite it)
        raise ValueError("model option latent_clip needs deepspeed.zero_stage 0 (it clamps the "
                         "parameters the optimizer steps)")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model, stage),
        config=deepspeed_config(recipe, per_rank_batch=per_rank_batch,
                                world_size=ctx.world_size))
    if recipe.compile:
        # ``module.compile()`` in place (inductor), not ``torch.compile(model)`` before
        # ``initialize``: the engine keeps the module itself, so its state dict -- DeepSpeed's
        # checkpoint files, model_state.pt, resume, the decoupling check -- has no ``_orig_mod.``
        # keys. Training and evaluation forward passes both run compiled (a graph per mode).
        engine.compile()
    return engine
