"""Recipe checks that need more than one field: the recipe name's length, model options per
variant (the model registry), the stage chain (``init_from: previous``, ``transition: decouple``),
and -- unless only the schema is checked -- the checkpoints and the dataset the recipe names.

Each problem is ``(key path, message)``; :func:`binaryduo.trainer.recipe.loading.load_recipe`
turns the key path into ``file:line``.
"""
from __future__ import annotations

from pathlib import Path

from binaryduo import models
from binaryduo.data.pipelines import output_size
from binaryduo.trainer.recipe.schema import MAX_NAME, DataSection, Recipe
from binaryduo.trainer.recipe.teacher import TORCHVISION, build_teacher_model


def semantic_problems(recipe: Recipe, *, check_paths: bool,
                      base_dir: Path) -> list[tuple[tuple, str]]:
    """Checks that need more than one field: model options per variant, stage chain, paths."""
    problems: list[tuple[tuple, str]] = []
    if len(recipe.name) > MAX_NAME:
        problems.append((("name",), f"is {len(recipe.name)} characters long; at most {MAX_NAME} "
                                    f"(it names the run directory)"))
    if recipe.model.name not in models.names():
        problems.append((("model", "name"), f"unknown model {recipe.model.name!r}; valid models: "
                                            f"{', '.join(models.names())}"))
    else:
        for index, stage in enumerate(recipe.stages):
            try:
                config = models.registry.resolve_config(recipe.model.name, stage.variant,
                                                        **recipe.model_options(stage))
            except ValueError as error:
                problems.append((("model", "options"), f"{error} (stage {stage.name!r})"))
                break
        else:  # the size the model is built (and costed) for must be the size it is fed
            size = output_size(recipe.data.preset, recipe.data.image_size)
            if size != config.input_size:
                key = ("data", "image_size") if recipe.data.image_size is not None \
                    else ("data", "preset")
                problems.append((key, f"the pipeline gives {size}x{size} images but "
                                      f"{recipe.model.name} is built for {config.input_size}x"
                                      f"{config.input_size} (model.options.input_size)"))

    data = recipe.data
    if data.train_subset is not None and data.train_subset < data.batch_size:
        problems.append((("data", "train_subset"),
                         f"{data.train_subset} images are fewer than data.batch_size "
                         f"({data.batch_size}): an epoch would have no full batch"))

    in_channels = recipe.model.options.get("in_channels", 3)
    if in_channels != recipe.data.channels:
        problems.append((("data", "channels"), f"the pipeline gives {recipe.data.channels}-channel "
                                               f"images but model.options.in_channels is "
                                               f"{in_channels}"))

    if recipe.model.options.get("latent_clip") is not None and recipe.deepspeed.zero_stage > 0:
        problems.append((("model", "options"), "latent_clip needs deepspeed.zero_stage 0: it "
                                               "clamps the parameters the optimizer steps, which "
                                               "ZeRO keeps in separate partitions"))

    names = [stage.name for stage in recipe.stages]
    for index, stage in enumerate(recipe.stages):
        loc = ("stages", index)
        if names.count(stage.name) > 1 and names.index(stage.name) != index:
            problems.append((loc + ("name",), f"duplicate stage name {stage.name!r}"))
        previous = recipe.stages[index - 1] if index else None
        if stage.init_from == "previous" and previous is None:
            problems.append((loc + ("init_from",), "the first stage has no previous stage"))
        if stage.transition == "decouple":
            if stage.init_from != "previous" or previous is None:
                problems.append((loc + ("transition",),
                                 "decouple needs init_from: previous (it decouples the previous "
                                 "stage's model)"))
            elif previous.variant != "coupled":
                problems.append((loc + ("transition",),
                                 f"decouple needs a coupled previous stage; stage "
                                 f"{previous.name!r} trains variant {previous.variant!r}"))
            if stage.variant != "decoupled":
                problems.append((loc + ("variant",), f"a stage after decouple trains variant "
                                                     f"'decoupled', not {stage.variant!r}"))
        elif stage.init_from == "previous" and previous is not None \
                and previous.variant != stage.variant:
            problems.append((loc + ("init_from",),
                             f"stage {previous.name!r} trains {previous.variant!r}, this one "
                             f"{stage.variant!r}: their shapes differ (use transition: decouple "
                             f"from coupled to decoupled)"))
        if stage.distill is not None:
            problems.extend(_teacher_problems(recipe, index, check_paths=check_paths,
                                              base_dir=base_dir))
        if check_paths and stage.init_from not in (None, "previous"):
            source = base_dir / stage.init_from
            if not source.exists():
                problems.append((loc + ("init_from",),
                                 f"checkpoint {stage.init_from} does not exist"))
            elif not source.is_file():
                problems.append((loc + ("init_from",),
                                 f"checkpoint {stage.init_from} is not a file (init_from names a "
                                 f"model file, e.g. RUN/checkpoints/STAGE/TAG/model_state.pt)"))

    if check_paths and recipe.data.prepare is None:
        problems.extend((("data", "root"), p) for p in _dataset_problems(base_dir / recipe.data.root,
                                                                        recipe.data))
    elif check_paths:
        problems.extend((("data", "root"), p) for p in _prepare_problems(base_dir / recipe.data.root,
                                                                        recipe.data))
    return problems


def _prepare_problems(root: Path, data: DataSection) -> list[str]:
    """``data.prepare`` builds the dataset at ``root`` when it is missing; a path that holds
    something else is never written over, and would stop the run only after set-up."""
    from binaryduo.data.shard import is_shard_dir

    if not root.exists() or (root.is_dir() and (is_shard_dir(root) or not any(root.iterdir()))):
        return []
    return [f"{data.root} exists and is not a {data.prepare} dataset (data.prepare would build "
            f"one there; it never writes over other files): choose another data.root"]


def _dataset_problems(root: Path, data: DataSection) -> list[str]:
    from binaryduo.data.layout import LayoutError, detect_format

    if not root.is_dir():
        return [f"dataset directory {data.root} does not exist"]
    try:
        found = detect_format(root)
    except LayoutError as error:
        return [f"dataset {data.root}: {error}"]
    if data.format != "auto" and found != data.format:
        return [f"dataset {data.root} is in format {found!r}, the recipe says {data.format!r}"]
    if found == "imagefolder":
        return [f"dataset {data.root} has no {split}/ directory"
                for split in ("train", "val") if not (root / split).is_dir()]
    return []


def _teacher_problems(recipe: Recipe, index: int, *, check_paths: bool,
                      base_dir: Path) -> list[tuple[tuple, str]]:
    """A stage's ``distill.teacher``: an earlier stage, or a known model whose checkpoint file
    is plain weights (loaded without executing code) that fit it, with the student's classes."""
    teacher = recipe.stages[index].distill.teacher
    loc = ("stages", index, "distill", "teacher")
    earlier = [stage.name for stage in recipe.stages[:index]]
    if teacher.stage is not None:
        if teacher.stage not in earlier:
            return [(loc + ("stage",), f"{teacher.stage!r} is not an earlier stage of this recipe "
                                       f"(earlier: {', '.join(earlier) or 'none'})")]
        return []
    try:
        student = recipe.stages[index]
        student_classes = models.registry.resolve_config(
            recipe.model.name, student.variant, **recipe.model_options(student)).num_classes
    except ValueError:  # reported with the model options
        student_classes = None
    if teacher.model.startswith(TORCHVISION):
        import torchvision

        name = teacher.model.removeprefix(TORCHVISION)
        if name not in torchvision.models.list_models(torchvision.models):
            return [(loc + ("model",), f"unknown torchvision classification model {name!r}")]
        classes = teacher.options.get("num_classes", 1000)
    elif teacher.model not in models.names():
        return [(loc + ("model",), f"unknown model {teacher.model!r}; valid models: "
                                   f"{', '.join(models.names())} or torchvision/<name>")]
    else:
        try:
            classes = models.registry.resolve_config(teacher.model, teacher.variant,
                                                     **teacher.options).num_classes
        except ValueError as error:
            return [(loc + ("options",), str(error))]
    if student_classes is not None and classes != student_classes:
        return [(loc + ("options",), f"the teacher has {classes} classes, the student "
                                     f"{student_classes} (model.options.num_classes)")]
    if not check_paths:
        return []
    path = base_dir / teacher.checkpoint
    if not path.is_file():
        return [(loc + ("checkpoint",), f"checkpoint {teacher.checkpoint} does not exist" if
                 not path.exists() else f"checkpoint {teacher.checkpoint} is not a file")]
    from binaryduo.models.weights_file import (UnreadableWeightsError, UntrustedWeightsError,
                                               load_weights)

    try:  # the safe loader of every weights file: no code runs
        weights = load_weights(path)
    except (UnreadableWeightsError, UntrustedWeightsError) as error:
        why = "loading it would run code" if isinstance(error, UntrustedWeightsError) else \
            "it is unreadable"
        return [(loc + ("checkpoint",), f"{teacher.checkpoint} is not a plain weights file "
                                        f"(refused: {why})")]
    try:
        build_teacher_model(recipe, teacher).load_state_dict(weights)
    except Exception as error:  # e.g. another class count, another architecture
        return [(loc + ("checkpoint",), f"{teacher.checkpoint} does not fit {teacher.model}: "
                                        f"{' '.join(str(error).split())[:300]}")]
    return []
