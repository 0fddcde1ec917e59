"""``binaryduo demo``: the BNN baseline and BinaryDuo on Fashion-MNIST at equal budget, a
paper-style table read back from MLflow, and the trained BinaryDuo network exported to OpenVINO
(bit-packed binary convolutions) and verified on the whole test set."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

from binaryduo.trainer.tracking.server import resolve_tracking_uri

RECIPES = ("fashion_mnist_vgg7_bnn.yaml", "fashion_mnist_vgg7_binaryduo.yaml")
#: the run whose final (decoupled, fine-tuned) network the demo exports
EXPORTED_RECIPE = "fashion_mnist_vgg7_binaryduo"
#: the multi-seed study behind the README's "Seed study" (Makefile: sweeps, then compare --by-seed)
STUDY_COMMAND = "make study"


def demo_recipe_dir() -> Traversable:
    """The demo recipes as installed package data (``binaryduo.recipes``): found the same way
    from a wheel and from an editable install, whatever the working directory."""
    return files("binaryduo.recipes") / "demo"


def demo_table(uri: str, experiment: str = "binaryduo", export: dict | None = None) -> str:
    """Top-1 of BNN, coupled, decoupled before / after fine-tuning, Mbit and FLOPs, from MLflow
    (read with :mod:`.compare`, which ``binaryduo compare`` uses for every recipe); with
    ``export`` (an ``export_report.json``), the exported IR's row and its verification."""
    from binaryduo.trainer.tracking.compare import experiment_id, latest_parent, open_store, stage_metrics

    client = open_store(uri)
    experiment_id_ = experiment_id(client, experiment)

    def stages(recipe: str) -> dict[str, dict[str, float]]:
        return stage_metrics(client, experiment_id_, latest_parent(client, experiment_id_, recipe))

    bnn = stages("fashion_mnist_vgg7_bnn")["bnn"]
    duo = stages("fashion_mnist_vgg7_binaryduo")
    coupled, finetune = duo["coupled"], duo["finetune"]
    rows = [
        ("BNN (binary activations)", bnn["val_top1"], bnn["mbit"], bnn["mflops"]),
        ("BinaryDuo: coupled (ternary)", coupled["val_top1"], coupled["mbit"], coupled["mflops"]),
        ("BinaryDuo: decoupled, before fine-tune", finetune["decouple_decoupled_val_top1"],
         finetune["mbit"], finetune["mflops"]),
        ("BinaryDuo: decoupled, after fine-tune", finetune["val_top1"], finetune["mbit"],
         finetune["mflops"]),
    ]
    if export is not None:
        check = export["verification"]
        rows.append(("  exported: OpenVINO IR, bit-packed", check["ir_top1"], export["ir_mbit"],
                     finetune["mflops"]))
    lines = [f"{'Fashion-MNIST, VGG-7 (half width, binary weights)':<42} {'top-1':>7} {'Mbit':>7} "
             f"{'MFLOPs':>7}", "-" * 66]
    lines += [f"{name:<42} {top1:>7.2f} {mbit:>7.3f} {mflops:>7.3f}"
              for name, top1, mbit, mflops in rows]
    if export is not None:
        lines.append(f"export verified: {check['identical_predictions']}/{check['samples']} "
                     f"identical predictions, max |dlogit| {check['max_abs_dlogit']:.3g}, "
                     f"{check['binary_kernels']}/{check['expected_binary_kernels']} binary convs "
                     f"on OpenVINO's binary kernel; IR {export['ir_size_vs_paper']:.2f}x the "
                     f"paper-rule Mbit")
    lines.append(f"BinaryDuo - BNN: {finetune['val_top1'] - bnn['val_top1']:+.2f} points at "
                 f"this one seed; seed noise is of the same size, so this is not the claim's test")
    lines.append(f"several seeds: `{STUDY_COMMAND}` (both methods, FP and binary weights, 3 "
                 f"seeds each: 12 runs like these two); its result, mean ± std and the "
                 f"difference's 95 % interval, is in the README's \"Seed study\"")
    return "\n".join(lines)


def export_demo_model(run_dir: Path, uri: str) -> tuple[int, dict | None]:
    """``binaryduo export RUN_DIR --verify all``: the run's final network as an OpenVINO IR,
    checked against the PyTorch model on every validation image and logged to its MLflow stage
    run. Returns the command's exit code and, if it passed, its report."""
    command = [sys.executable, "-m", "binaryduo.trainer.cli", "export", str(run_dir),
               "--verify", "all", "--tracking-uri", uri]
    print(f"$ binaryduo export {run_dir} --verify all", flush=True)
    done = subprocess.run(command)
    if done.returncode != 0:
        return done.returncode, None
    # the export command's default output, RUN_DIR/export/<last stage>-openvino: the newest report
    report = max((run_dir / "export").glob("*-openvino/export_report.json"),
                 key=lambda path: path.stat().st_mtime)
    return 0, json.loads(report.read_text())


def run_demo(*, output: str, tracking_uri: str | None) -> int:
    uri = resolve_tracking_uri(tracking_uri, None)
    for recipe in RECIPES:
        # as_file: a real file for the training subprocess even if the package were zipped
        with as_file(demo_recipe_dir() / recipe) as path:
            command = [sys.executable, "-m", "binaryduo.trainer.cli", "train", str(path),
                       "--output", str(Path(output) / path.stem), "--tracking-uri", uri]
            print(f"$ binaryduo train recipes/demo/{recipe} --output {Path(output) / path.stem}",
                  flush=True)
            done = subprocess.run(command)
        if done.returncode != 0:
            print(f"binaryduo: demo stopped: {recipe} exited {done.returncode}", file=sys.stderr)
            return done.returncode
    code, export = export_demo_model(Path(output) / EXPORTED_RECIPE, uri)
    if code != 0:
        print(f"binaryduo: demo stopped: the export of {EXPORTED_RECIPE} exited {code}",
              file=sys.stderr)
        return code
    print()
    print(demo_table(uri, export=export))
    print(f"\nall runs of the store: binaryduo compare --tracking-uri {uri}")
    print(f"open the MLflow record: mlflow ui --backend-store-uri {uri}")
    return 0
