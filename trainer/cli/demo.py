"""``binaryduo demo``: the BNN baseline and BinaryDuo on Fashion-MNIST at equal budget, and a
paper-style table read back from MLflow."""
from __future__ import annotations

import subprocess
import sys
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

from binaryduo.trainer.tracking.server import resolve_tracking_uri

RECIPES = ("fashion_mnist_vgg7_bnn.yaml", "fashion_mnist_vgg7_binaryduo.yaml")
#: the multi-seed study behind the README's "Seed study" (Makefile: sweeps, then compare --by-seed)
STUDY_COMMAND = "make study"


def demo_recipe_dir() -> Traversable:
    """The demo recipes as installed package data (``binaryduo.recipes``): found the same way
    from a wheel and from an editable install, whatever the working directory."""
    return files("binaryduo.recipes") / "demo"


def demo_table(uri: str, experiment: str = "binaryduo") -> str:
    """Top-1 of BNN, coupled, decoupled before / after fine-tuning, Mbit and FLOPs, from MLflow
    (read with :mod:`.compare`, which ``binaryduo compare`` uses for every recipe)."""
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
    lines = [f"{'Fashion-MNIST, VGG-7 (half width, FP weights)':<42} {'top-1':>7} {'Mbit':>7} "
             f"{'MFLOPs':>7}", "-" * 66]
    lines += [f"{name:<42} {top1:>7.2f} {mbit:>7.3f} {mflops:>7.3f}"
              for name, top1, mbit, mflops in rows]
    lines.append(f"BinaryDuo - BNN: {finetune['val_top1'] - bnn['val_top1']:+.2f} points at "
                 f"this one seed; seed noise is of the same size, so this is not the claim's test")
    lines.append(f"several seeds: `{STUDY_COMMAND}` (both methods, FP and binary weights, 3 "
                 f"seeds each: 12 runs like these two); its result, mean ± std and the "
                 f"difference's 95 % interval, is in the README's \"Seed study\"")
    return "\n".join(lines)


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
    print()
    print(demo_table(uri))
    print(f"\nall runs of the store: binaryduo compare --tracking-uri {uri}")
    print(f"open the MLflow record: mlflow ui --backend-store-uri {uri}")
    return 0
