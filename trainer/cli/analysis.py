"""``binaryduo analyze gradient-mismatch``: STE gradient vs CDG per layer and activation type.

    binaryduo analyze gradient-mismatch --checkpoint RUN_DIR [--stage NAME]
    binaryduo analyze gradient-mismatch --model vgg7 -O width_mult=0.5 -O in_channels=1 \\
        [--checkpoint model_state.pt] --data ~/.cache/binaryduo/fashion-mnist
        [--activations fp,2-bit,ternary,binary] [--stes clipped_identity,approxsign,swishsign]
        [--layers conv2,conv3] [--coordinates 128] [--delta 0.5] [--delta-scale weight-rms]
        [--batch 128] [--batch-index 0] [--seed 0] [--dtype float32] [--naive]
        [--json] [--output-json PATH] [--plot PATH] [--tracking-uri URI]

``register(analyses)`` adds the subcommand to ``binaryduo analyze``. Everything the user can get
wrong (unknown activation or STE, delta <= 0, a missing checkpoint or dataset, a model option the
registry refuses, binary weights, a checkpoint that does not fit the model) is checked before any
gradient is computed and raised as the CLI's ``UsageError`` (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from binaryduo.trainer.cli.errors import UsageError, parse_model_options

#: Checkpoint files and run-directory markers written by ``binaryduo train``.
MODEL_FILE = "model_state.pt"
MANIFEST = "manifest.json"
RESOLVED_RECIPE = "recipe.resolved.yaml"
DEFAULT_EXPERIMENT = "gradient-mismatch"


@dataclass
class ModelSource:
    """Where the model comes from: registry name/variant/options, and optionally weights."""

    name: str | None
    variant: str
    options: dict
    weights: Path | None = None
    recipe: dict | None = None
    stage: str | None = None


def find_run_dir(path: Path) -> Path | None:
    """The run directory (it holds ``recipe.resolved.yaml``) at or up to 4 levels above ``path``."""
    for candidate in [path, *path.parents][:5]:
        if (candidate / RESOLVED_RECIPE).is_file():
            return candidate
    return None


def _best_model_file(stage_dir: Path) -> Path:
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    # the best complete epoch, else the last complete one (``latest`` may be a mid-epoch
    # checkpoint written at a preemption)
    epochs = manifest.get("epochs") or []
    tag = ((manifest.get("best") or {}).get("tag") or (epochs[-1]["tag"] if epochs else None)
           or manifest.get("latest"))
    if not tag or not (stage_dir / tag / MODEL_FILE).is_file():
        raise UsageError(f"--checkpoint {stage_dir}: its manifest names no complete checkpoint")
    return stage_dir / tag / MODEL_FILE


def resolve_checkpoint(path_text: str, stage: str | None) -> tuple[Path, dict | None, str | None]:
    """(model file, resolved recipe or None, stage name or None) for a run directory, a stage's
    checkpoint directory (its best epoch), an epoch directory or a ``model_state.pt`` file."""
    import yaml

    path = Path(path_text).expanduser()
    if not path.exists():
        raise UsageError(f"--checkpoint {path_text}: no such file or directory")
    if path.is_dir() and (path / RESOLVED_RECIPE).is_file():
        recipe = yaml.safe_load((path / RESOLVED_RECIPE).read_text())
        names = [s["name"] for s in recipe.get("stages", [])]
        chosen = stage or (names[-1] if names else None)
        if chosen not in names:
            raise UsageError(f"--stage {chosen}: not a stage of {path} ({', '.join(names)})")
        stage_dir = path / "checkpoints" / chosen
        if not (stage_dir / MANIFEST).is_file():
            raise UsageError(f"--checkpoint {path_text}: stage {chosen!r} has no checkpoints")
        return _best_model_file(stage_dir), recipe, chosen
    if path.is_dir() and (path / MANIFEST).is_file():
        model_file = _best_model_file(path)
    elif path.is_dir() and (path / MODEL_FILE).is_file():
        model_file = path / MODEL_FILE
    elif path.is_file():
        model_file = path
    else:
        raise UsageError(f"--checkpoint {path_text}: not a run directory, a stage or epoch "
                         f"checkpoint directory, or a {MODEL_FILE} file")
    run_dir = find_run_dir(model_file.parent)
    if run_dir is None:
        return model_file, None, None
    recipe = yaml.safe_load((run_dir / RESOLVED_RECIPE).read_text())
    parts = model_file.relative_to(run_dir).parts  # checkpoints/<stage>/<epoch>/model_state.pt
    chosen = parts[1] if len(parts) == 4 and parts[0] == "checkpoints" else None
    return model_file, recipe, chosen


def recipe_model(recipe: dict | None, stage: str | None, name: str | None, variant: str | None,
                 options: dict) -> tuple[str | None, str | None, dict]:
    """(model name, variant, options): the command line's, completed from the run's recipe
    (its model, the stage's variant, its options and the stage's weight bits under the command
    line's -O)."""
    if recipe is not None:
        stages = {s["name"]: s for s in recipe.get("stages", [])}
        name = name or recipe["model"]["name"]
        if variant is None and stage in stages:
            variant = stages[stage]["variant"]
        stage_bits = stages.get(stage, {}).get("weight_bits")
        options = {**(recipe["model"].get("options") or {}),
                   **({"weight_bits": stage_bits} if stage_bits is not None else {}), **options}
    return name, variant, options


def _model_source(args: argparse.Namespace) -> ModelSource:

    options = parse_model_options(args.option)
    weights = recipe = stage = None
    if args.checkpoint:
        weights, recipe, stage = resolve_checkpoint(args.checkpoint, args.stage)
    elif args.stage:
        raise UsageError("--stage needs --checkpoint RUN_DIR")
    name, variant, options = recipe_model(recipe, stage, args.model, args.variant, options)
    if name is None:
        raise UsageError("gradient-mismatch: give --model NAME or --checkpoint RUN_DIR")
    options.setdefault("weight_bits", 32)  # the analysis measures FP weights (trainer/analysis/mismatch.py)
    return ModelSource(name, variant or "bnn", options, weights, recipe, stage)


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _validate(args: argparse.Namespace):
    """Every check that needs no gradient; returns what the run needs."""
    from binaryduo import models
    from binaryduo.models.quantizers import STE

    from binaryduo.trainer.analysis import mismatch_report as report

    try:
        activations = [report.parse_activation(a) for a in _split_list(args.activations)]
        settings = report.Settings(coordinates=args.coordinates, delta=args.delta,
                                   delta_scale=args.delta_scale, seed=args.seed,
                                   chunk_size=args.chunk_size, naive=args.naive)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not activations:
        raise UsageError("--activations: give at least one activation type")
    stes = _split_list(args.stes)
    for ste in stes:
        if ste not in report.STE_NAMES:
            raise UsageError(f"--stes: unknown STE shape {ste!r}; expected one of "
                             f"{', '.join(report.STE_NAMES)}")
    if not stes and any(a.quantized for a in activations):
        raise UsageError("--stes: give at least one STE shape for the quantized activations")
    if args.batch < 2:
        raise UsageError(f"--batch {args.batch}: must be >= 2 (two halves)")
    if args.batch_index < 0:
        raise UsageError(f"--batch-index {args.batch_index}: must be >= 0")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size}: must be >= 1")

    source = _model_source(args)
    for activation in activations:
        for ste in (stes if activation.quantized else [STE.CLIPPED_IDENTITY.value]):
            try:
                models.registry.resolve_config(source.name, source.variant,
                                               **{**source.options, **activation.options,
                                                  "ste": ste})
            except ValueError as error:
                raise UsageError(f"activation {activation.name}: {error}") from None
    data_root = args.data or ((source.recipe or {}).get("data") or {}).get("root")
    if not data_root:
        raise UsageError("gradient-mismatch: give --data ROOT (a dataset the data package reads)")
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise UsageError(f"--data {data_root}: not a directory")
    for flag, target in (("--output-json", args.output_json), ("--plot", args.plot)):
        if target and not Path(target).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{flag} {target}: its directory does not exist")
    return activations, stes, settings, source, data_root


def _load_state(source: ModelSource):
    from binaryduo.trainer.run.checkpoint import load_model_state

    try:
        return load_model_state(source.weights)
    except Exception as error:  # unpickling refused, truncated file, not a torch file
        raise UsageError(f"--checkpoint {source.weights}: cannot be read as a model state "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                         ) from None


def validation_loader(recipe: dict | None, data_root: Path, config, batch_size: int,
                      subset: int | None = None):
    """The validation split of ``data_root`` on the CPU, as the recipe's data section reads it
    (format, preset; without a recipe the preset follows the model's input size), at the model's
    channels and input size; a dataset that cannot be read is a UsageError."""
    from binaryduo.data.layout import LayoutError
    from binaryduo.data.pipelines import LoaderSpec, build_loader

    data = (recipe or {}).get("data") or {}
    preset = data.get("preset") or ("small" if config.input_size <= 64 else "imagenet")
    try:
        spec = LoaderSpec(root=data_root, format=data.get("format", "auto"), preset=preset,
                          batch_size=batch_size, channels=config.in_channels,
                          image_size=config.input_size, subset=subset, drop_last=False)
        return build_loader(spec, train=False, seed=0, device="cpu")
    except (LayoutError, ValueError, OSError) as error:
        raise UsageError(f"--data {data_root}: {error}") from None


def _fixed_batch(source: ModelSource, data_root: Path, args: argparse.Namespace, config):
    """The ``--batch-index``-th validation batch (eval transform, dataset order, real images)."""
    loader = validation_loader(source.recipe, data_root, config, args.batch)
    if args.batch_index >= len(loader):
        raise UsageError(f"--batch-index {args.batch_index}: the validation split has "
                         f"{len(loader)} batches of {args.batch}")
    for index, (images, labels, valid) in enumerate(loader):
        if index == args.batch_index:
            keep = valid.bool()
            return images[keep].clone(), labels[keep].clone()
    raise UsageError("the validation split is empty")


def cmd_gradient_mismatch(args: argparse.Namespace) -> int:
    activations, stes, settings, source, data_root = _validate(args)

    import torch

    from binaryduo import models

    from binaryduo.trainer.analysis import mismatch
    from binaryduo.trainer.analysis import mismatch_report as report

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    state = _load_state(source) if source.weights is not None else None
    torch.manual_seed(args.seed)
    base = models.build(source.name, source.variant, **source.options)
    if state is not None:
        try:
            base.load_state_dict(state)
        except RuntimeError as error:
            detail = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise UsageError(f"--checkpoint {source.weights} does not fit {source.name} "
                             f"({source.variant}, {source.options}): "
                             f"{detail[-1][:200] if detail else error}") from None
    state = {k: v.clone() for k, v in base.state_dict().items()}
    try:
        report.select_layers(mismatch.weight_layers(base), _split_list(args.layers or ""))
    except ValueError as error:
        raise UsageError(str(error)) from None
    images, labels = _fixed_batch(source, data_root, args, base.config)
    if int(labels.max()) >= base.config.num_classes:
        raise UsageError(f"--data {data_root}: labels reach {int(labels.max())}, the model has "
                         f"{base.config.num_classes} classes")
    images = images.to(dtype)

    def build(activation, ste):
        model = models.build(source.name, source.variant,
                             **{**source.options, **activation.options, "ste": ste})
        model.load_state_dict(state)
        return model.to(dtype).eval()

    def progress(message):
        if not args.json:
            print(f"  {message}", file=sys.stderr, flush=True)

    result = report.run_mismatch(build, activations, stes, images, labels, settings,
                                 layers=_split_list(args.layers or ""), progress=progress)
    result.context = {
        "model": source.name, "variant": source.variant, "options": source.options,
        "checkpoint": str(source.weights) if source.weights else None, "stage": source.stage,
        "data": str(data_root), "batch": int(images.shape[0]), "batch_index": args.batch_index,
        "dtype": args.dtype, "bn_mode": "eval", "loss": "mean cross-entropy (no weight decay)",
        "activations": [a.name for a in activations], "stes": stes,
        "estimator": "naive loop" if settings.naive else "batched (vmap)"}
    payload = json.dumps(result.to_dict(), indent=2)
    print(payload if args.json else result.format_table())
    if args.output_json:
        Path(args.output_json).expanduser().write_text(payload + "\n")
    title = (f"{source.name} {source.variant}"
             + (f" ({Path(source.weights).parent.name})" if source.weights
                else " (initial weights)")
             + f": batch {images.shape[0]}, {settings.coordinates} coords/layer, "
             f"delta {settings.delta:g} x {settings.delta_scale}")
    if args.plot:
        report.plot_mismatch(result, Path(args.plot).expanduser(), title)
    if args.tracking_uri:
        _log_to_mlflow(args, result, payload, title)
    return 0


def _log_to_mlflow(args: argparse.Namespace, result, payload: str, title: str) -> None:
    from binaryduo.trainer.analysis import mismatch_report as report
    from binaryduo.trainer.tracking.tracker import Tracker, flatten

    tracker = Tracker(args.tracking_uri, args.experiment, enabled=True)
    run_id = tracker.start_run("gradient-mismatch", tags={"analysis": "gradient-mismatch",
                                                          "model": result.context["model"]})
    try:
        tracker.log_params(run_id, {**flatten(result.context, "context."),
                                    **flatten(dict(result.settings.__dict__), "settings.")})
        metrics = {}
        for record in result.records:
            key = f"{record.activation}.{record.ste}.{report.short_name(record.layer)}"
            metrics[f"cosine.{key}"] = record.cosine
            metrics[f"spread.{key}"] = record.spread
        tracker.log_metrics(run_id, metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "gradient_mismatch.json").write_text(payload + "\n")
            (folder / "gradient_mismatch.txt").write_text(result.format_table() + "\n")
            report.plot_mismatch(result, folder / "gradient_mismatch.png", title)
            for suffix in ("json", "txt", "png"):
                name = f"gradient_mismatch.{suffix}"
                tracker.log_artifact(run_id, folder / name)
        tracker.finish(run_id)
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    if not args.json:
        print(f"MLflow run {run_id} at {args.tracking_uri}")


def register(analyses) -> argparse.ArgumentParser:
    """Adds ``gradient-mismatch`` (and ``health``) to the ``analyze`` subparsers."""
    from binaryduo.trainer.analysis.mismatch_report import DEFAULT_ACTIVATIONS, DELTA_SCALES, STE_NAMES

    parser = analyses.add_parser(
        "gradient-mismatch", help="cosine of the STE gradient and the CDG, per layer",
        description="For each activation type (weights shared) and STE shape: the cosine "
                    "similarity, per layer, between the STE gradient and the coordinate discrete "
                    "gradient [L(w+d e_i) - L(w-d e_i)] / 2d over sampled weight coordinates, on "
                    "one fixed validation batch with BN in eval mode (the BinaryDuo paper's "
                    "estimator; docs/method.md §7).")
    parser.add_argument("--model", help="registry name (default: the checkpoint's recipe)")
    parser.add_argument("--variant", default=None,
                        help="registry variant (default: the checkpoint's stage, else bnn)")
    parser.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="model option (repeatable); weight_bits defaults to 32")
    parser.add_argument("--checkpoint", help="run directory, stage or epoch checkpoint directory, "
                                             "or model_state.pt (default: initial weights)")
    parser.add_argument("--stage", help="stage of a run directory (default: its last stage)")
    parser.add_argument("--data", help="dataset root (default: the checkpoint recipe's)")
    parser.add_argument("--batch", type=int, default=128, help="images in the fixed batch")
    parser.add_argument("--batch-index", type=int, default=0,
                        help="which validation batch (dataset order)")
    parser.add_argument("--activations", default=",".join(DEFAULT_ACTIVATIONS),
                        help="comma list of fp, binary, ternary, K-bit")
    parser.add_argument("--stes", default=",".join(STE_NAMES),
                        help="comma list of STE shapes for the quantized activations")
    parser.add_argument("--layers", help="comma list of layers (default: every conv/linear)")
    parser.add_argument("--coordinates", type=int, default=128, help="sampled weights per layer")
    parser.add_argument("--delta", type=float, default=0.5, help="CDG step (see --delta-scale)")
    parser.add_argument("--delta-scale", default="weight-rms", choices=DELTA_SCALES,
                        help="weight-rms: the step is delta x the layer's weight RMS")
    parser.add_argument("--seed", type=int, default=0, help="coordinate sampling seed")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="perturbations per vectorised pass (default: automatic)")
    parser.add_argument("--naive", action="store_true",
                        help="one forward per coordinate and sign (the reference; slow)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--output-json", metavar="PATH", help="also write the JSON here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot here")
    parser.add_argument("--tracking-uri", help="log an MLflow run (params, metrics, artifacts)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    parser.set_defaults(handler=cmd_gradient_mismatch)
    from binaryduo.trainer.cli.health import register as register_health

    register_health(analyses)  # ``analyze health RUN_DIR`` (trainer/cli/health.py)
    return parser
