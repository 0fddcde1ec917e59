"""The recipe: one YAML file describing a whole run, as a typed schema (unknown keys are errors).

A recipe names a model from the registry, the data, and an ordered list of stages; each stage trains
one model variant for some epochs and may start from the previous stage (optionally through the
``decouple`` transition). ``load_recipe`` reads the YAML safely, applies ``--set`` overrides, expands
``${VAR}`` / ``${VAR:-default}`` references, validates everything it can before any compute, and
raises ``RecipeError`` with one line per problem: ``file:line: key.path: message``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from binaryduo import models


class RecipeError(Exception):
    """Every problem found in a recipe; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    # strict: a YAML string "3" is not an integer; extra="forbid": a typo is an error, not a default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Strict):
    """The architecture (a registry name) and its build options, shared by every stage."""

    name: str
    #: Options of ``binaryduo.models.build`` (width_mult, weight_bits, num_classes, ...).
    options: dict[str, Any] = Field(default_factory=dict)


class DataSection(_Strict):
    """Where the images are and how they are fed."""

    #: ``imagefolder``: ``train/<class>/*`` and ``val/<class>/*``; ``filelist``: DALI file lists;
    #: ``shard``: the small-image numpy shard (``binaryduo data prepare``); ``auto``: detect.
    format: Literal["auto", "imagefolder", "filelist", "shard"] = "auto"
    #: Dataset directory; may reference environment variables: ``${IMAGENET_DIR}``.
    root: str
    #: ``imagenet``: random-resized-crop 224 / resize 256 + centre crop; ``small``: pad 4 + crop 32.
    preset: Literal["imagenet", "small"]
    #: Random training augmentation of the preset (crops, flips); false = the evaluation transform
    #: (for very short runs, where augmentation costs more accuracy than it saves).
    augment: bool = True
    #: Global batch size (split evenly across ranks).
    batch_size: int = Field(gt=0)
    #: Images the model sees: grey images are repeated to 3 channels when this is 3.
    channels: Literal[1, 3] = 3
    #: Decoding threads per rank.
    num_threads: int = Field(default=2, gt=0)
    #: Use only the first N training / validation images (a fixed, seeded subset); None = all.
    train_subset: int | None = Field(default=None, gt=0)
    val_subset: int | None = Field(default=None, gt=0)
    #: A dataset ``binaryduo train`` may build at ``root`` when it is missing (demo data only).
    prepare: Literal["fashion-mnist"] | None = None


class OptimizerSection(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    #: Applied to every parameter, BN included (the authors' setting).
    weight_decay: float = Field(default=1e-4, ge=0)


class ScheduleSection(_Strict):
    """Learning rate as a pure function of the epoch (see ``trainer.schedules``)."""

    kind: Literal["step", "cosine", "constant"] = "step"
    #: ``step``: epochs (1-based, as in the authors' scripts) at which the LR is multiplied by gamma.
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(default=0.1, gt=0, le=1)
    #: Linear warm-up of the LR over the first epochs (per step), then the schedule proper.
    warmup_epochs: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _milestones(self):
        if self.kind != "step" and self.milestones:
            raise ValueError(f"milestones only apply to kind 'step' (kind is {self.kind!r})")
        if any(m < 1 for m in self.milestones) or self.milestones != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {self.milestones}")
        return self


class StageSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    #: Which model variant this stage trains: fp, bnn, coupled or decoupled.
    variant: Literal["fp", "bnn", "coupled", "decoupled"]
    epochs: int = Field(gt=0)
    optimizer: OptimizerSection
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    #: ``previous``: start from the previous stage; a path: from that checkpoint; None: from scratch.
    init_from: str | None = None
    #: Which checkpoint of the previous stage: ``best`` validation top-1 (the authors') or ``last``.
    init_checkpoint: Literal["best", "last"] = "best"
    #: ``decouple``: turn the previous (coupled) stage's model into its binary equivalent first.
    transition: Literal["decouple", "none"] = "none"
    #: Largest float64 |logit difference| the decoupling check accepts.
    decouple_tolerance: float = Field(default=1e-9, gt=0)

    @model_validator(mode="after")
    def _milestones_inside(self):
        late = [m for m in self.schedule.milestones if m > self.epochs]
        if late:
            raise ValueError(f"schedule.milestones {late} lie after the stage's last epoch "
                             f"({self.epochs})")
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) must be "
                             f"fewer than epochs ({self.epochs})")
        return self


class LoggingSection(_Strict):
    #: MLflow experiment name.
    experiment: str = "binaryduo"
    #: MLflow tracking URI; None: ``MLFLOW_TRACKING_URI`` or the sqlite store ``./mlflow.db``.
    tracking_uri: str | None = None
    #: Log training metrics every N steps (as well as per epoch).
    every_steps: int = Field(default=50, gt=0)


class CheckpointSection(_Strict):
    #: A checkpoint after every N-th epoch and after the last one (``best`` picks among these);
    #: a preemption signal checkpoints at the next step regardless.
    every_epochs: int = Field(default=1, gt=0)
    #: Checkpoints kept per stage besides the best one.
    keep_last: int = Field(default=2, gt=0)


class DeepSpeedSection(_Strict):
    zero_stage: Literal[0, 1] = 0
    #: BatchNorm statistics over the global batch (one all-reduce of 2C+1 numbers per BN layer
    #: and step), so a recipe trains the same model on any number of ranks; false = per-rank
    #: statistics, as the authors' DataParallel code had.
    sync_batchnorm: bool = True


class Recipe(_Strict):
    """A complete run: ``binaryduo validate`` checks it, ``binaryduo train`` runs it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    #: What the recipe claims and the evidence for it (free text, saved with the run).
    description: str = ""
    seed: int = 0
    #: ``auto``: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    model: ModelSection
    data: DataSection
    stages: list[StageSection] = Field(min_length=1)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)


# ------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, overrides, environment references, cross-field checks.


def _line_map(text: str) -> dict[tuple, int]:
    """1-based line of every key path in the YAML document (mapping keys and list items)."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (key.value,)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ValueError(f"--set {item!r}: value is not valid YAML") from None
    return key.strip().split("."), value


def apply_override(data: dict, item: str) -> tuple:
    """Sets ``a.b.c=value`` in ``data``; a stage is addressed by index or name (``stages.finetune``)."""
    keys, value = _parse_override(item)
    node: Any = data
    path: list[Any] = []
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key)
            if index is None:
                raise ValueError(f"--set {item!r}: {_dotted(tuple(path))} has no item {key!r}")
            path.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            path.append(key)
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ValueError(f"--set {item!r}: {_dotted(tuple(path))} is not a mapping or list")
    return tuple(path)


def _list_index(items: list, key: str) -> int | None:
    if key.isdigit():
        return int(key) if int(key) < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    return None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: tuple, problems: list[tuple[tuple, str]], check: bool) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), problems, check) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), problems, check) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if check:
            problems.append((path, f"environment variable {name} is not set (the recipe refers "
                                   f"to ${{{name}}}; export it or use --set {_dotted(path)}=PATH)"))
        return match.group(0)

    return os.path.expanduser(_ENV_REF.sub(substitute, value))


def load_recipe(path: str | Path, overrides: list[str] = (), *, schema_only: bool = False,
                base_dir: Path | None = None) -> Recipe:
    """Reads, overrides, expands and validates ``path``; raises ``RecipeError`` listing problems.

    With ``schema_only`` the environment and the file system are not consulted: variables stay
    unexpanded and paths are not checked (for validating shipped recipes anywhere).
    """
    path = Path(path)
    label = str(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError([f"{label}: cannot read recipe ({error.strerror or error})"]) from None
    try:
        data = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError([f"{label}{where}: not a valid recipe YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{label}: a recipe is a YAML mapping, got {type(data).__name__}"])

    def where(key_path: tuple) -> str:
        for cut in range(len(key_path), -1, -1):
            if key_path[:cut] in lines:
                return f"{label}:{lines[key_path[:cut]]}"
        return label

    problems: list[tuple[tuple, str]] = []
    for item in overrides:
        try:
            apply_override(data, item)
        except ValueError as error:
            problems.append(((), str(error)))
    data = _expand_env(data, (), problems, check=not schema_only)
    recipe = None
    if not problems:
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as error:
            for detail in error.errors(include_url=False):
                loc = tuple(detail["loc"])
                problems.append((loc, _message(detail)))
    if recipe is not None:
        problems.extend(semantic_problems(recipe, check_paths=not schema_only,
                                          base_dir=base_dir or Path.cwd()))
    if problems:
        raise RecipeError([f"{where(loc)}: {_dotted(loc)}: {msg}" for loc, msg in problems])
    return recipe


def _message(detail: dict) -> str:
    if detail["type"] == "extra_forbidden":
        return "unknown key"
    if detail["type"] == "missing":
        return "required key is missing"
    message = detail["msg"].removeprefix("Value error, ")
    shown = detail.get("input")
    if detail["type"] not in ("model_type",) and not isinstance(shown, (dict, list)):
        message += f" (got {shown!r})"
    return message


def semantic_problems(recipe: Recipe, *, check_paths: bool,
                      base_dir: Path) -> list[tuple[tuple, str]]:
    """Checks that need more than one field: model options per variant, stage chain, paths."""
    problems: list[tuple[tuple, str]] = []
    if recipe.model.name not in models.names():
        problems.append((("model", "name"), f"unknown model {recipe.model.name!r}; valid models: "
                                            f"{', '.join(models.names())}"))
    else:
        for index, stage in enumerate(recipe.stages):
            try:
                models.registry.resolve_config(recipe.model.name, stage.variant,
                                               **recipe.model.options)
            except ValueError as error:
                problems.append((("model", "options"), f"{error} (stage {stage.name!r})"))
                break

    in_channels = recipe.model.options.get("in_channels", 3)
    if in_channels != recipe.data.channels:
        problems.append((("data", "channels"), f"the pipeline gives {recipe.data.channels}-channel "
                                               f"images but model.options.in_channels is "
                                               f"{in_channels}"))

    if recipe.model.options.get("latent_clip") is not None and (
            recipe.precision == "bf16" or recipe.deepspeed.zero_stage > 0):
        problems.append((("model", "options"), "latent_clip needs precision fp32 (or auto on CPU) "
                                               "and deepspeed.zero_stage 0: it clamps the "
                                               "parameters the optimizer steps"))

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
        if check_paths and stage.init_from not in (None, "previous"):
            if not (base_dir / stage.init_from).exists():
                problems.append((loc + ("init_from",),
                                 f"checkpoint {stage.init_from} does not exist"))

    if check_paths and recipe.data.prepare is None:
        problems.extend((("data", "root"), p) for p in _dataset_problems(base_dir / recipe.data.root,
                                                                        recipe.data))
    return problems


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
