"""The network a ``distill.teacher`` section names, built (not loaded): shared by the recipe's
checks (its checkpoint must fit it, before any compute) and the run (trainer/run/distill.py)."""
from __future__ import annotations

import torch

from binaryduo import models
from binaryduo.trainer.recipe.schema import Recipe, TeacherSection

#: ``teacher.model`` prefix for torchvision's classification models
TORCHVISION = "torchvision/"


def build_teacher_model(recipe: Recipe, teacher: TeacherSection) -> torch.nn.Module:
    if teacher.stage is not None:
        stage = next(s for s in recipe.stages if s.name == teacher.stage)
        return models.build(recipe.model.name, stage.variant, **recipe.model_options(stage))
    if teacher.model.startswith(TORCHVISION):
        import torchvision

        return torchvision.models.get_model(teacher.model.removeprefix(TORCHVISION),
                                            weights=None, **teacher.options)
    return models.build(teacher.model, teacher.variant, **teacher.options)
