"""DeepSpeed engine for one stage: a fresh optimizer per stage, fp32 or bf16, ZeRO 0/1."""
from __future__ import annotations

import torch

from binaryduo.trainer.runtime.distributed import DistributedContext
from binaryduo.trainer.recipe import Recipe, StageSection


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def make_optimizer(model: torch.nn.Module, stage: StageSection) -> torch.optim.Optimizer:
    spec = stage.optimizer
    # weight decay on every parameter, BN included (the authors' setting)
    if spec.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                               nesterov=spec.nesterov and spec.momentum > 0,
                               weight_decay=spec.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def deepspeed_config(recipe: Recipe, *, per_rank_batch: int, world_size: int,
                     dtype: torch.dtype) -> dict:
    return {
        "train_batch_size": per_rank_batch * world_size,
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def make_engine(model: torch.nn.Module, stage: StageSection, recipe: Recipe, *,
                ctx: DistributedContext, dtype: torch.dtype, per_rank_batch: int):
    """``deepspeed.initialize`` around ``model`` with the stage's optimizer."""
    import deepspeed

    model.to(ctx.device)
    clipped = any(getattr(m, "latent_clip", None) is not None for m in model.modules())
    if clipped and (dtype == torch.bfloat16 or recipe.deepspeed.zero_stage > 0):
        # there the optimizer steps separate fp32 master copies, which a clamp of the module's
        # parameters would not reach (the next step would overwrite it)
        raise ValueError("model option latent_clip needs precision fp32 and deepspeed.zero_stage 0 "
                         "(it clamps the parameters the optimizer steps)")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model, stage),
        config=deepspeed_config(recipe, per_rank_batch=per_rank_batch,
                                world_size=ctx.world_size, dtype=dtype))
    if dtype == torch.bfloat16:
        # DeepSpeed casts parameters only; BN buffers must follow or BN refuses mixed dtypes.
        for module in engine.module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.data = module.running_mean.data.to(dtype)
                module.running_var.data = module.running_var.data.to(dtype)
    return engine
