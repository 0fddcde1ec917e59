"""``binaryduo export``: a trained binary network as an OpenVINO IR with bit-packed binary
convolutions, verified against PyTorch before it is called done.

    binaryduo export RUN_DIR [--stage NAME] --format openvino [--output DIR] [--verify N|all]
    binaryduo export RUN/checkpoints/STAGE[/TAG[/model_state.pt]] ...
    binaryduo export model_state.pt --model vgg7 --variant decoupled -O weight_bits=1 ...

SOURCE is resolved as ``binaryduo analyze`` does (a run directory: its last stage's best
checkpoint). Everything the user can get wrong (a missing source, a model that has no binary form,
an output directory in use, no data to verify on) is refused before the export, one line, exit 2.
The export writes ``model.xml``/``model.bin`` and ``export_report.json``; verification (always on)
compares the IR with the PyTorch model in float64 on N images (the recipe's validation split, or
``--data``, or ``--random``) and counts the runtime BinaryConvolution kernels: a failed
verification exits 1 with its reason. From a run directory the IR, the report and an MLflow
``pyfunc`` model (``runs:/<stage run>/binary_model``) are logged to the stage's MLflow run.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from binaryduo.trainer.cli.analysis import (ModelSource, find_run_dir, recipe_model,
                                            resolve_checkpoint, validation_loader)
from binaryduo.trainer.cli.errors import (EXIT_CHECK_FAILED, UsageError, one_line_errors,
                                          parse_model_options)
from binaryduo.trainer.runtime.console import stderr_line

REPORT_FILE = "export_report.json"
VERIFY_CHUNK = 256  # images per IR call and per float64 reference chunk


def _parse_count(text: str) -> int | None:
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--verify {text}: give a number of images >= 1, or all")
    return count


def _source(args: argparse.Namespace) -> tuple[ModelSource, Path | None]:
    """The model to export and, when SOURCE lies in a run directory, that directory."""
    try:
        weights, recipe, stage = resolve_checkpoint(args.source, args.stage)
    except UsageError as error:
        raise UsageError(str(error).replace("--checkpoint ", "SOURCE ", 1)) from None
    name, variant, options = recipe_model(recipe, stage, args.model, args.variant,
                                          parse_model_options(args.option))
    if name is None or variant is None:
        raise UsageError(f"SOURCE {args.source}: not in a run directory: give --model NAME and "
                         f"--variant (bnn, coupled or decoupled) and its -O options")
    return ModelSource(name, variant, options, weights, recipe, stage), find_run_dir(weights.parent)


def _output(args: argparse.Namespace, source: ModelSource, run_dir: Path | None) -> Path:
    if args.output:
        output = Path(args.output).expanduser()
    elif run_dir is not None:
        output = run_dir / "export" / f"{source.stage or 'model'}-{args.format}"
    else:
        output = Path(f"export-{source.name}-{source.variant}-{args.format}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"--output {output}: exists and is not empty (nothing is overwritten; "
                         f"choose another --output or remove it)")
    if args.output and not output.parent.exists():
        raise UsageError(f"--output {output}: its directory {output.parent} does not exist")
    return output


def _build(source: ModelSource):
    """The PyTorch model with its weights, and the model the IR is made of (decoupled)."""
    from binaryduo import models
    from binaryduo.trainer.export import ExportRefused, exportable_model
    from binaryduo.trainer.run.checkpoint import load_model_state

    try:
        model = models.registry.build(source.name, source.variant, **source.options)
    except (ValueError, TypeError) as error:
        raise UsageError(f"model {source.name} ({source.variant}): {error}") from None
    try:
        state = load_model_state(source.weights)
        model.load_state_dict(state)
    except Exception as error:  # refused unpickling, truncated file, shape mismatch
        raise UsageError(f"SOURCE {source.weights}: not a model state of {source.name} "
                         f"({source.variant}): {str(error).splitlines()[0][:200]}") from None
    model.eval()
    try:
        exported, notes = exportable_model(model)
    except ExportRefused as error:
        raise UsageError(f"cannot export {source.weights}: {error}") from None
    return model, exported.eval(), notes


def _images(args: argparse.Namespace, source: ModelSource, config, count: int | None):
    """(images, labels or None, where they came from) for the verification."""
    import torch

    shape = (config.in_channels, config.input_size, config.input_size)
    if args.random:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn((count or VERIFY_CHUNK, *shape), generator=generator)
        return images, None, f"{len(images)} random N(0, 1) images (seed {args.seed})"
    root = args.data or ((source.recipe or {}).get("data") or {}).get("root")
    if not root:
        raise UsageError("--verify: give --data ROOT (a dataset the data package reads) or "
                         "--random")
    root = Path(os.path.expandvars(str(root))).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {root}: not a directory")
    loader = validation_loader(source.recipe, root, config, VERIFY_CHUNK, subset=count)
    images, labels = [], []
    for batch, target, valid in loader:
        keep = valid.bool()
        images.append(batch[keep].clone())
        labels.append(target[keep].clone())
    images, labels = torch.cat(images), torch.cat(labels)
    return images, labels, f"{len(images)} validation images of {root}"


def _tracking(args: argparse.Namespace, run_dir: Path | None, stage: str | None):
    """(tracking URI, the stage's MLflow run id) to log to, or (None, None)."""
    if args.no_tracking or run_dir is None or stage is None:
        return None, None
    from binaryduo.trainer.run.state import RunState
    from binaryduo.trainer.tracking.journal import Journal

    run_id = RunState.load(run_dir).stage_run_ids.get(stage)

    uri = args.tracking_uri
    if uri is None and Journal.exists(run_dir):
        uri = (Journal(run_dir).last_session() or {}).get("uri")
    if run_id is None or run_id.startswith("local-") or uri is None:
        return None, None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"--tracking-uri {uri}: no MLflow store there (the run's record is "
                         f"elsewhere; or pass --no-tracking)")
    return uri, run_id


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from binaryduo.models.cost import cost_report
    from binaryduo.trainer.export import ir_file_bytes, save_ir, to_openvino, verify
    from binaryduo.trainer.export.verify import compile_for_verification

    count = _parse_count(args.verify)
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: must be >= 1")
    source, run_dir = _source(args)
    output = _output(args, source, run_dir)
    uri, run_id = _tracking(args, run_dir, source.stage)
    model, exported, notes = _build(source)
    config = exported.config
    images, labels, origin = _images(args, source, config, count)

    torch.manual_seed(0)
    ir, summary = to_openvino(exported, (args.batch, config.in_channels, config.input_size,
                                         config.input_size))
    output.mkdir(parents=True, exist_ok=True)
    xml = save_ir(ir, output)
    compiled = compile_for_verification(xml, batch=min(VERIFY_CHUNK, len(images)))
    # the trained model itself is the reference (a coupled one through its exact decoupling)
    report = verify(compiled, model, images, labels=labels)
    ir_bytes = ir_file_bytes(xml)
    paper_mbit = cost_report(exported).mbit
    payload = {
        "source": str(source.weights), "model": source.name, "variant": source.variant,
        "options": source.options, "stage": source.stage, "format": args.format,
        "ir_batch": args.batch, "verified_on": origin, "notes": notes,
        "verification": report.to_dict(), "export": summary.to_dict(),
        "ir_bytes": ir_bytes, "ir_mbit": ir_bytes * 8 / 1e6, "paper_mbit": paper_mbit,
        "ir_size_vs_paper": ir_bytes * 8 / 1e6 / paper_mbit,
    }
    (output / REPORT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    accuracy = (f"; top-1 IR {report.ir_top1:.2f} / PyTorch {report.reference_top1:.2f}"
                if report.ir_top1 is not None else "")
    print(f"export: {xml} ({ir_bytes * 8 / 1e6:.3f} Mbit; paper rule {paper_mbit:.3f} Mbit, "
          f"{payload['ir_size_vs_paper']:.2f}x)")
    print(f"verify: {report.identical_predictions}/{report.samples} identical predictions, "
          f"max |dlogit| {report.max_abs_dlogit:.3g}, {report.binary_kernels}/"
          f"{report.expected_binary_kernels} binary kernels "
          f"({', '.join(report.binary_primitive_types) or 'none'}){accuracy}")
    if uri is not None:
        try:
            _log(uri, run_id, output, xml, config, report, payload)
        except Exception as error:  # a store that went away or refused: the files stay valid
            stderr_line(f"binaryduo: export written to {output} but not logged to run {run_id} "
                        f"at {uri}: {type(error).__name__}: "
                        f"{' '.join(str(error).split())[:200]}")
            return EXIT_CHECK_FAILED
    if not report.passed:
        stderr_line(f"binaryduo: export verification failed: {report.reason} "
                    f"(report: {output / REPORT_FILE})")
        return EXIT_CHECK_FAILED
    print(f"export: verified; report {output / REPORT_FILE}")
    return 0


def _log(uri: str, run_id: str, output: Path, xml: Path, config, report, payload) -> None:
    from binaryduo.trainer.export.serving import log_pyfunc
    from binaryduo.trainer.tracking.delivery import open_client

    client = open_client(uri)
    client.log_artifacts(run_id, str(output), artifact_path=f"export/{payload['format']}")
    for key, value in (("export_identical_predictions", report.identical_predictions),
                       ("export_verified_images", report.samples),
                       ("export_max_abs_dlogit", report.max_abs_dlogit),
                       ("export_binary_kernels", report.binary_kernels),
                       ("export_ir_mbit", payload["ir_mbit"])):
        client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "export_verified", str(report.passed).lower())
    model_uri = None
    if report.passed:  # only a verified network is offered for serving
        model_uri = log_pyfunc(client, run_id, xml,
                               (config.in_channels, config.input_size, config.input_size),
                               config.num_classes, {"source": payload["source"],
                                                    "verified_on": payload["verified_on"]})
    print(f"mlflow: logged to run {run_id} at {uri}" +
          (f"; serve with: mlflow models serve -m {model_uri} --env-manager local"
           if model_uri else ""))


def register(commands) -> argparse.ArgumentParser:
    parser = one_line_errors(commands.add_parser(
        "export", help="export a trained binary network (OpenVINO IR, bit-packed binary convs)",
        description=__doc__.split("\n\n")[0]))
    parser.add_argument("source", metavar="SOURCE",
                        help="a run directory, a stage/epoch checkpoint directory or a "
                             "model_state.pt")
    parser.add_argument("--format", choices=["openvino"], default="openvino")
    parser.add_argument("--stage", help="the run's stage (default: its last)")
    parser.add_argument("--model", help="registry name, for a model_state.pt outside a run")
    parser.add_argument("--variant", choices=["bnn", "coupled", "decoupled"],
                        help="for a model_state.pt outside a run")
    parser.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="model option (repeatable)")
    parser.add_argument("--output", help="directory for model.xml/.bin and the report "
                                         "(default: RUN_DIR/export/<stage>-openvino)")
    parser.add_argument("--batch", type=int, default=1,
                        help="the IR's batch size (OpenVINO's binary kernel needs static "
                             "shapes; default 1)")
    parser.add_argument("--verify", default="256", metavar="N|all",
                        help="verify on N images (default 256) or all of the validation split")
    parser.add_argument("--data", help="dataset root for the verification (default: the "
                                       "recipe's)")
    parser.add_argument("--random", action="store_true",
                        help="verify on random images instead of a dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random")
    parser.add_argument("--tracking-uri", help="MLflow store of the run (default: the run's)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="do not log the export to the run's MLflow record")
    parser.set_defaults(handler=cmd_export)
    return parser
