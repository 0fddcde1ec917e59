"""The recipe: one YAML file describing a whole run, as a typed schema (unknown keys are errors).

A recipe names a model from the registry, the data, and an ordered list of stages; each stage trains
one model variant for some epochs and may start from the previous stage (optionally through the
``decouple`` transition). ``load_recipe`` reads, overrides and validates it and raises
``RecipeError`` with one line per problem (``file:line: key.path: message``).

- :mod:`.schema`   the sections and ``Recipe`` (every key, its type and default, documented there)
- :mod:`.loading`  YAML with line numbers, ``--set`` overrides, ``${VAR}`` references, ``RecipeError``
- :mod:`.checks`   what needs more than one field: model options, the stage chain, paths
"""
from binaryduo.trainer.recipe.checks import semantic_problems
from binaryduo.trainer.recipe.loading import RecipeError, apply_override, load_recipe
from binaryduo.trainer.recipe.schema import (MAX_NAME, CheckpointSection, DataSection,
                                             DeepSpeedSection, LoggingSection, ModelSection,
                                             OptimizerSection, Recipe, ScheduleSection,
                                             StageSection)

__all__ = ["MAX_NAME", "CheckpointSection", "DataSection", "DeepSpeedSection", "LoggingSection",
           "ModelSection", "OptimizerSection", "Recipe", "RecipeError", "ScheduleSection",
           "StageSection", "apply_override", "load_recipe", "semantic_problems"]
