"""The recipe's typed schema: one pydantic model per YAML section, ``Recipe`` for the whole file.

Every section is strict (a YAML string ``"3"`` is not an integer) and forbids unknown keys (a typo
is an error, not a default). Every name that becomes a path (recipe, stage, MLflow experiment) is
one plain path component, so nothing a recipe says can place a run's files (checkpoints,
artifacts) outside the run directory; a recipe may name a tracking server but not a local store.
Checks that need more than one field, the model registry or the file system are in
:mod:`binaryduo.trainer.recipe.checks`; reading the YAML is :mod:`binaryduo.trainer.recipe.loading`.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator


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
    # the length is checked by ``load_recipe`` (``checks.semantic_problems``): --smoke appends
    # "-smoke" to a valid name and validates the result again
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
    #: Side in pixels of the square images the pipeline gives (the preset's crop, resize and
    #: pad scale with it); None = the preset's: 224 (``imagenet``), 32 (``small``). The model's
    #: ``input_size`` option must match it.
    image_size: int | None = Field(default=None, gt=0)
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


class ParameterGroupSection(_Strict):
    """One parameter role's own settings (``optimizer.groups.<role>``)."""

    #: Replaces the optimizer's ``weight_decay`` for this role (None: the optimizer's).
    weight_decay: float | None = Field(default=None, ge=0)
    #: This role's LR is the schedule's LR times ``lr_mult``.
    lr_mult: float = Field(default=1.0, gt=0)


class OptimizerSection(_Strict):
    #: ``adam`` adds the weight decay to the gradient (L2); ``adamw`` decays the weights
    #: directly (decoupled, Loshchilov & Hutter), as ReActNet's recipe does.
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(gt=0)
    #: ``sgd`` only.
    momentum: float = Field(default=0.9, ge=0, lt=1)
    #: ``sgd`` only.
    nesterov: bool = True
    #: ``adam``/``adamw`` only.
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    #: Every parameter's, BN included (the authors' setting), unless ``groups`` says otherwise.
    weight_decay: float = Field(default=1e-4, ge=0)
    #: Per parameter role (models.parameter_roles): ``binary_layers`` (the binary-activation
    #: layers' latent weights), ``norm_and_bias`` (BN scales/shifts and biases) and
    #: ``full_precision`` (first conv, classifier, 1x1 shortcuts), e.g. ReActNet's
    #: ``{binary_layers: {weight_decay: 0}}``. A role left out keeps the optimizer's settings.
    groups: dict[Literal["binary_layers", "norm_and_bias", "full_precision"],
                 ParameterGroupSection] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _settings_of_this_optimizer(self):
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        # a setting the chosen optimizer would ignore is a mistake in the recipe, not a no-op
        if self.name == "sgd" and self.betas != [0.9, 0.999]:
            raise ValueError("betas apply to adam/adamw only (name is 'sgd')")
        if self.name != "sgd" and (self.momentum != 0.9 or not self.nesterov):
            raise ValueError(f"momentum/nesterov apply to sgd only (name is {self.name!r}; "
                             f"adam's are betas)")
        return self


class ScheduleSection(_Strict):
    """Learning rate as a pure function of the epoch (see ``trainer.schedules``)."""

    #: ``linear``: from the LR (after warm-up) straight down to 0 at the end of the stage
    #: (ReActNet's schedule).
    kind: Literal["step", "cosine", "linear", "constant"] = "step"
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


class TeacherSection(_Strict):
    """The network a stage distils from: an earlier stage of this recipe (``stage``), or a model
    with a checkpoint file (``model`` + ``checkpoint``)."""

    #: An earlier stage of this recipe: its ``checkpoint_tag`` checkpoint, built as that stage.
    stage: StageName | None = None
    #: Which checkpoint of ``stage``: its ``best`` validation top-1 or its ``last``.
    checkpoint_tag: Literal["best", "last"] = "best"
    #: A registry model (``binaryduo report --all`` lists them) or ``torchvision/<name>`` (e.g.
    #: ``torchvision/resnet34``, whose ImageNet weights file torchvision publishes).
    model: str | None = None
    #: Registry models: the variant the checkpoint holds (``fp``: the full-precision reference).
    variant: Literal["fp", "bnn", "coupled", "decoupled"] = "fp"
    #: Model options (registry models) or constructor arguments (torchvision, e.g. num_classes).
    options: dict[str, Any] = Field(default_factory=dict)
    #: A model file (a state dict, loaded without executing code), relative to the working
    #: directory.
    checkpoint: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.stage is None) == (self.model is None):
            raise ValueError("give the teacher's stage, or its model and checkpoint (one of them)")
        if self.model is not None and self.checkpoint is None:
            raise ValueError(f"teacher model {self.model!r} needs a checkpoint file")
        if self.stage is not None and (self.checkpoint is not None or self.options):
            raise ValueError("a teacher stage is built and loaded as that stage: no checkpoint "
                             "or options")
        return self


class DistillSection(_Strict):
    """Knowledge distillation: loss = (1 - weight) * CE(student, labels)
    + weight * temperature^2 * KL(softmax(teacher / T) || softmax(student / T)), the teacher in
    eval mode under no_grad in the run's precision, on the same (augmented) batch."""

    teacher: TeacherSection
    #: The KL term's share of the loss, in [0, 1] (1: distillation only, as ReActNet's).
    weight: float = Field(ge=0, le=1)
    #: Softens both distributions; the T^2 factor keeps the gradient's scale (Hinton et al.).
    temperature: float = Field(default=1.0, gt=0)


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
    #: Largest float64 |logit difference| the decoupling check accepts (the construction).
    decouple_tolerance: float = Field(default=1e-9, gt=0)
    #: Largest fraction of the check batch's quantized activations that may differ between the
    #: coupled and the decoupled network in the run's own precision (fp32, or bf16 autocast):
    #: round-off within reach of a threshold, not a construction error (the float64 check).
    decouple_flip_tolerance: float = Field(default=1e-4, ge=0, le=1)
    #: This stage's weights, where they differ from ``model.options.weight_bits``: 1 =
    #: alpha*sign(W), 32 = FP. A stage that starts from the previous one (``init_from:
    #: previous``) with other weight bits *switches* them (two-step training, as ReActNet's):
    #: alpha*sign(W) of the previous stage's latent FP weights; after ``decouple`` the decoupling
    #: is checked on the previous weight bits first (transitions.py).
    weight_bits: Literal[1, 32] | None = None
    #: Distil from a teacher network (None: plain cross-entropy, the paper's).
    distill: DistillSection | None = None

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
    #: Each stage's final network as an MLflow Model (``mlflow.pytorch``: loadable with
    #: ``mlflow.pytorch.load_model``, listed in the Models view, registrable with
    #: ``binaryduo train --register NAME``); false: only the state-dict artifact ``model/``.
    log_models: bool = True
    #: CPU, memory, disk and network (and per GPU utilisation, memory and power where an NVIDIA
    #: driver answers NVML), sampled by rank 0 and logged as MLflow's system metrics
    #: (``system/...``, the run's "System metrics" tab) to the parent run and to the stage run
    #: that is training (binaryduo.trainer.tracking.system_metrics).
    system_metrics: bool = True
    #: Seconds between two system-metrics points (each the average of 5 samples).
    system_metrics_interval_s: float = Field(default=10.0, ge=1.0)


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


#: What ``health.metrics`` may list (binaryduo.models.health.METRICS; docs/health.md).
HealthMetric = Literal["flip_ratio", "flip_ratio_step", "ste_coverage", "occupancy", "alpha",
                       "grad_norm"]


class HealthSection(_Strict):
    """Binary-network health metrics per layer, logged to MLflow every epoch (docs/health.md)."""

    enabled: bool = True
    #: Which metrics (default: all); ``occupancy`` is one metric per activation level.
    metrics: list[HealthMetric] = Field(default_factory=lambda: list(HealthMetric.__args__),
                                        min_length=1)
    #: Per-step statistics (activations, per-step flips, gradient norms) on every N-th global
    #: step only: 1 = every step; more = less overhead, fewer samples. 4 keeps the cost within
    #: the 3 % target (recording every step costs 1.6-5.1 % of a CPU step; docs/health.md, Cost);
    #: the epoch's ``flip_ratio`` and ``alpha`` are exact whatever N is.
    sample_every_steps: int = Field(default=4, gt=0)
    #: Also log the epoch's values so far every ``logging.every_steps`` steps, as
    #: ``health_steps/<layer>/<metric>`` at the global step (one all-reduce and one host read
    #: each time; the per-epoch ``health/...`` values are logged either way).
    log_steps: bool = True


def _no_fp16(value: Any) -> Any:
    if value == "fp16":
        raise ValueError("fp16 is not supported: its 5-bit exponent needs loss scaling, which "
                         "skips steps, and BatchNorm statistics and the quantizer thresholds "
                         "need float32 anyway; use bf16 (same speed on GPUs that have it)")
    return value


#: Keys added to the schema after runs were made with it, and the default each came with. While a
#: recipe leaves one at that default it is left out of :meth:`Recipe.identity`, so a run started
#: before the key existed still resumes (its ``run_state.json`` holds the hash without the key).
LATER_KEYS_AT_DEFAULT: dict[tuple[str, ...], Any] = {
    ("stages", "*", "decouple_flip_tolerance"): 1e-4,
    ("compile",): False,
    ("data", "image_size"): None,
    ("health",): HealthSection().model_dump(mode="json"),
    ("logging", "log_models"): True,
    ("logging", "system_metrics"): True,
    ("logging", "system_metrics_interval_s"): 10.0,
    ("stages", "*", "optimizer", "betas"): [0.9, 0.999],
    ("stages", "*", "optimizer", "groups"): {},
    ("stages", "*", "weight_bits"): None,
    ("stages", "*", "distill"): None,
}


def _drop_at_default(tree: Any, path: tuple[str, ...], default: Any) -> None:
    """Removes the key at ``path`` (``*``: every item of a list) where it equals ``default``."""
    head, rest = path[0], path[1:]
    if head == "*":
        children = tree if isinstance(tree, list) else []
    elif not (isinstance(tree, dict) and head in tree):
        return
    elif not rest:
        if tree[head] == default:
            del tree[head]
        return
    else:
        children = [tree[head]]
    for child in children:
        _drop_at_default(child, rest, default)


class Recipe(_Strict):
    """A complete run: ``binaryduo validate`` checks it, ``binaryduo train`` runs it."""

    #: Names the run directory ``runs/<name>-<time>`` and the MLflow parent run.
    name: RecipeName
    #: What the recipe claims and the evidence for it (free text, saved with the run).
    description: str = ""
    seed: int = 0
    #: ``auto``: bf16 on GPU, fp32 on CPU. ``bf16`` is mixed precision: float32 weights,
    #: optimizer state, BN statistics, gradient reduction and checkpoints; the forward pass under
    #: bf16 autocast, with BatchNorm and the quantizer thresholds in float32.
    precision: Annotated[Literal["auto", "fp32", "bf16"], BeforeValidator(_no_fp16)] = "auto"
    #: ``torch.compile`` the model every stage trains (and evaluates), in place, as DeepSpeed's
    #: ``engine.compile()`` does (default inductor backend), so checkpoints keep their keys.
    #: Top level beside ``precision``: like it, how the same model is executed, not how it is
    #: distributed. Part of the recipe's identity when true: inductor reorders reductions
    #: (alpha = mean|W| and BN statistics differ by ulps, enough to flip a near-tie of a
    #: threshold or max-pool), so a compiled run does not reproduce an eager one bit for bit.
    #: On several ranks with ``deepspeed.sync_batchnorm`` the global-batch BN's all-reduce is
    #: traced too (a functional collective; on gloo measured one graph, no break).
    compile: bool = False
    model: ModelSection
    data: DataSection
    stages: list[StageSection] = Field(min_length=1)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    health: HealthSection = Field(default_factory=HealthSection)

    def model_options(self, stage: StageSection) -> dict:
        """The model options ``stage`` builds its network with: ``model.options`` with the
        stage's ``weight_bits`` where it sets them."""
        if stage.weight_bits is None:
            return dict(self.model.options)
        return {**self.model.options, "weight_bits": stage.weight_bits}

    def identity(self) -> dict:
        """What makes two runs the same recipe (hashed into ``recipe_hash``): the resolved
        recipe, less keys added later while at the default they were added with."""
        resolved = self.model_dump(mode="json")
        for path, default in LATER_KEYS_AT_DEFAULT.items():
            _drop_at_default(resolved, path, default)
        return resolved

    def identity_without_seed(self) -> dict:
        """:meth:`identity` less the seed: what the runs of one recipe at different seeds share
        (hashed into the ``recipe_hash_without_seed`` tag, by which ``compare --by-seed``
        groups runs)."""
        identity = self.identity()
        del identity["seed"]
        return identity
