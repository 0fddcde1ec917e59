"""The recipe: one YAML file describing a whole run, as a typed schema (unknown keys are errors).

A recipe names a model from the registry, the data, and an ordered list of stages; each stage trains
one model variant for some epochs and may start from the previous stage (optionally through the
``decouple`` transition). ``load_recipe`` reads the YAML safely, applies ``--set`` overrides, expands
``${VAR}`` / ``${VAR:-default}`` references, validates everything it can before any compute, and
raises ``RecipeError`` with one line per problem: ``file:line: key.path: message`` (``file (--set
KEY=VALUE): key.path: message`` where the value came from an override).

A recipe file is untrusted data: no YAML tag constructs an object (``!!python/...`` is refused,
nothing runs), duplicate keys, self-referencing aliases and alias bombs are refused before
anything is built, and every name that becomes a path (recipe, stage, MLflow experiment) is one
plain path component, so nothing a recipe says can place a run's files (checkpoints, artifacts)
outside the run directory -- the one exception by design is ``data.prepare``, which builds the
demo dataset at ``data.root``; a recipe may name a tracking server but not a local store, and
``${VAR}`` is expanded in ``data.root`` and ``stages.N.init_from`` only (a shared recipe cannot
copy the environment into what it logs).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError,
                      model_validator)

from binaryduo import models


class RecipeError(Exception):
    """Every problem found in a recipe; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    # strict: a YAML string "3" is not an integer; extra="forbid": a typo is an error, not a default;
    # no .inf / .nan: no learning rate, tolerance or momentum is meant to be infinite.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


#: Longest recipe, stage or experiment name (they become file and directory names).
MAX_NAME = 100


def _plain_name(value: str, *, dots: bool, limit: int | None = MAX_NAME) -> str:
    """Names that become paths (``runs/<recipe>-<time>``, ``checkpoints/<stage>/``,
    ``cost_<stage>.json``, ``mlartifacts/<experiment>``) or Slurm job names: one path component
    that cannot escape its directory, no shell or YAML metacharacters."""
    allowed = "letters, digits, " + ("'.', " if dots else "") + "'_' and '-'"
    if not value:
        raise ValueError("must not be empty")
    if limit is not None and len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; at most {limit} (it names files "
                         "and directories)")
    pattern = r"[A-Za-z0-9][A-Za-z0-9._-]*" if dots else r"[A-Za-z0-9][A-Za-z0-9_-]*"
    if not re.fullmatch(pattern, value):
        raise ValueError(f"must be a plain name of {allowed}, starting with a letter or digit; "
                         "it names files and directories, so no '/', '..' or spaces")
    return value


def _recipe_name(value: str) -> str:
    # the length is checked by ``load_recipe`` (``semantic_problems``): --smoke appends "-smoke"
    # to a valid name and validates the result again
    return _plain_name(value, dots=True, limit=None)


def _experiment_name(value: str) -> str:
    return _plain_name(value, dots=True)


def _stage_name(value: str) -> str:
    _plain_name(value, dots=False)
    if value.isdigit():
        raise ValueError("must not be a number (--set stages.N.KEY=VALUE addresses stages by "
                         "index)")
    return value


def _server_uri(value: str | None) -> str | None:
    """A recipe may name a tracking *server*; where records land on local disk (a sqlite file,
    an ``mlruns`` folder) is the caller's choice (``--tracking-uri``, ``MLFLOW_TRACKING_URI``),
    never a file's: a shared recipe must not write outside the run and the caller's store."""
    if value is None:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("a recipe may only name an MLflow tracking server (http://HOST[:PORT] "
                         "or https://...); for a local store pass --tracking-uri or set "
                         "MLFLOW_TRACKING_URI")
    return value


RecipeName = Annotated[str, AfterValidator(_recipe_name)]
ExperimentName = Annotated[str, AfterValidator(_experiment_name)]
StageName = Annotated[str, AfterValidator(_stage_name)]


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
    #: Before it starts, ``binaryduo train`` checks every image file (``binaryduo data check``:
    #: empty, not an image, truncated, ...) and refuses a dataset with unreadable files. True:
    #: train without them instead -- every rank leaves the same files out, a warning names the
    #: count, and MLflow records it (tag ``data_skipped_files``, the list in provenance.json).
    #: Image folders and file lists only (a damaged shard is always refused).
    skip_unreadable: bool = False


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
    #: Names ``checkpoints/<name>/`` and the stage's artifacts; addressable by ``--set stages.<name>``.
    name: StageName
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
    #: MLflow experiment name (a plain name: the sqlite store keeps its artifacts in
    #: ``mlartifacts/<experiment>``).
    experiment: ExperimentName = "binaryduo"
    #: MLflow tracking server (http/https); None: ``--tracking-uri``, ``MLFLOW_TRACKING_URI`` or
    #: the sqlite store ``./mlflow.db``. Local stores are not a recipe's to choose.
    tracking_uri: Annotated[str | None, AfterValidator(_server_uri)] = None
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

    #: Names the run directory ``runs/<name>-<time>`` and the MLflow parent run.
    name: RecipeName
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


#: Most values a recipe may hold once YAML aliases are followed (a real recipe has about 100; an
#: alias "bomb" of nested references expands to billions and would hang the loader).
MAX_VALUES = 10_000


class _TooLarge(Exception):
    pass


def _line_map(text: str) -> tuple[dict[tuple, int], list[tuple[int, str]]]:
    """1-based line of every key path in the YAML document (mapping keys and list items), and the
    structural problems the YAML parser lets through: ``(line, message)`` for duplicate keys (the
    later one would win silently), self-referencing aliases and alias bombs."""
    lines: dict[tuple, int] = {}
    problems: list[tuple[int, str]] = []
    count = 0

    def walk(node, path, active):
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _TooLarge
        if id(node) in active:
            problems.append((node.start_mark.line + 1, f"{_dotted(path)}: a YAML alias refers to "
                                                       f"a value that contains it (endless)"))
            return
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            active = active | {id(node)}
            first: dict[tuple, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.tag}>"
                child = path + (name,)
                line = key.start_mark.line + 1
                if (key.tag, name) in first and name != "<<":
                    problems.append((line, f"{_dotted(child)}: duplicate key (first given on "
                                           f"line {first[(key.tag, name)]}; YAML would "
                                           f"silently keep the last)"))
                first.setdefault((key.tag, name), line)
                lines[child] = line
                if key.tag == "tag:yaml.org,2002:int" and name.lstrip("+-").isdigit():
                    lines[path + (int(name),)] = line  # pydantic reports the key as an int
                walk(value, child, active)
        elif isinstance(node, yaml.SequenceNode):
            active = active | {id(node)}
            for index, item in enumerate(node.value):
                walk(item, path + (index,), active)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        try:
            walk(root, (), frozenset())
        except _TooLarge:
            problems = [(1, f"(top level): the recipe holds more than {MAX_VALUES} values once "
                            f"YAML aliases are expanded (an alias bomb?)")]
    return lines, problems


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML error; a tag that would build a Python object is named as such."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (f"YAML tag {shown} is not allowed: a recipe is plain data (mappings, lists, "
                f"strings, numbers, booleans), nothing is constructed or run")
    return f"not a valid recipe YAML: {problem}"


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


def _is_path_key(path: tuple) -> bool:
    return path == ("data", "root") or (len(path) == 3 and path[0] == "stages"
                                        and path[2] == "init_from")


def _expand_env(value: Any, path: tuple, problems: list[tuple[tuple, str]], check: bool) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), problems, check) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), problems, check) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if not _is_path_key(path):
        # only paths are expanded: a shared recipe must not copy the environment (tokens,
        # secrets) into its description, tags or a tracking server's address
        if _ENV_REF.search(value):
            problems.append((path, "environment references (${...}) are only expanded in "
                                   "data.root and stages.N.init_from"))
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
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError([_one_line(f"{label}: cannot read recipe "
                                     f"({error.strerror or error})")]) from None
    except UnicodeDecodeError as error:
        raise RecipeError([_one_line(f"{label}: not a UTF-8 text file (byte {error.start}: "
                                     f"{error.reason})")]) from None
    try:
        # structure first (compose builds no objects): duplicate keys and alias bombs are
        # refused before anything is constructed; safe_load then refuses every Python tag
        lines, structural = _line_map(text)
        if structural:
            raise RecipeError([_one_line(f"{label}:{line}: {message}")
                               for line, message in structural])
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError([_one_line(f"{label}{where}: {_yaml_problem(error)}")]) from None
    except RecursionError:
        raise RecipeError([f"{label}: nested too deeply to be a recipe"]) from None
    if data is None:
        raise RecipeError([f"{label}: the recipe is empty (no YAML mapping in it)"])
    if not isinstance(data, dict):
        raise RecipeError([f"{label}: a recipe is a YAML mapping of keys (name, model, data, "
                           f"stages, ...), got a {type(data).__name__}"])

    overridden: list[tuple[tuple, str]] = []  # (key path, --set item): values not from the file

    def where(key_path: tuple) -> str:
        for item_path, item in overridden:
            if key_path[:len(item_path)] == item_path:
                return f"{label} (--set {item})"
        for cut in range(len(key_path), -1, -1):
            if key_path[:cut] in lines:
                return f"{label}:{lines[key_path[:cut]]}"
        return label

    bad_overrides = []
    for item in overrides:
        try:
            overridden.append((apply_override(data, item), item))
        except ValueError as error:
            bad_overrides.append(_one_line(f"{label}: {error}"))
    if bad_overrides:
        raise RecipeError(bad_overrides)
    problems: list[tuple[tuple, str]] = []
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
        raise RecipeError([_one_line(f"{where(loc)}: {_dotted(loc)}: {msg}")
                           for loc, msg in problems])
    return recipe


def _one_line(problem: str) -> str:
    """A value quoted in a message (a path, a name) must not break the one-line-per-problem rule."""
    return problem.replace("\r", "\\r").replace("\n", "\\n")


def _message(detail: dict) -> str:
    if detail["type"] == "extra_forbidden":
        return "unknown key"
    if detail["type"] == "missing":
        return "required key is missing"
    message = detail["msg"].removeprefix("Value error, ")
    shown = detail.get("input")
    if detail["type"] in ("model_type", "dict_type"):
        message = "should be a mapping of keys"
    if not isinstance(shown, (dict, list)):
        text = repr(shown)
        message += f" (got {text if len(text) <= 80 else text[:60] + '...'})"
    return message


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
                models.registry.resolve_config(recipe.model.name, stage.variant,
                                               **recipe.model.options)
            except ValueError as error:
                problems.append((("model", "options"), f"{error} (stage {stage.name!r})"))
                break

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
