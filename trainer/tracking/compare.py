"""Run comparison: a paper-style table and plots read back from the MLflow record.

What ``binaryduo train`` logs (``stages.run_recipe`` / ``run.train``) and what is read here:

- one **parent run** per recipe run: tags ``recipe`` (the recipe's name; ``-smoke`` appended by
  ``--smoke``), ``smoke``, ``code_version``, ``world_size``, ``hardware``, ``recipe_hash``; params =
  the resolved recipe flattened (``model.name``, ``model.options.weight_bits``, ``data.preset``,
  ``stages.0.variant`` ...).
- one **nested run per stage** (tag ``mlflow.parentRunId``): tags ``stage``, ``variant``; params
  ``stage_index``, ``stage.epochs``; metrics per epoch (step = epoch): ``val_top1``, ``val_top5``,
  ``images_per_second`` ...; at the end ``best_val_top1``, ``mbit``, ``mflops``; a decouple stage
  also logs, at step 0, the decoupled model's accuracy before fine-tuning
  (``decouple_decoupled_val_top1``, ``val_top1``/``val_top5`` at step 0).

A row per stage (plus "before fine-tune" for a decouple stage): dataset, model, method, weight bits,
stage, final top-1 / top-5 (the last epoch's), best top-1, Mbit, MFLOPs, epochs done/planned, wall
time, images/s, world size and hardware, code version. The paper's numbers (docs/method.md
§5, §6) are added as reference rows for the datasets and models shown. ``--by-seed`` groups the
same records over seeds (``seed_groups``, with ``seed_stats``) and reuses the formatters here.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from binaryduo.trainer.tracking.compare_data import data_digests, mark_different_data

PARENT_TAG = "mlflow.parentRunId"
FORMATS = ("md", "csv", "json")


class CompareError(ValueError):
    """Bad input to ``compare`` (unknown experiment, bad filter, no store): one line, exit 2."""


@dataclass(frozen=True)
class Row:
    """One line of the comparison table: a stage of a run, or a paper reference."""
    source: str                      # "run" or "paper"
    dataset: str
    model: str
    method: str                      # BNN, BinaryDuo, FP (runs); as published (paper)
    weight_bits: int | None
    stage: str                       # stage name, "before fine-tune", or "" for paper rows
    top1: float | None
    top5: float | None
    best_top1: float | None = None
    mbit: float | None = None
    mflops: float | None = None
    epochs: int | None = None        # epochs done
    planned_epochs: int | None = None
    wall_seconds: float | None = None
    images_per_second: float | None = None
    world_size: int | None = None
    hardware: str = ""
    code_version: str = ""
    recipe: str = ""                 # recipe name (runs) or where the number comes from (paper)
    status: str = ""
    smoke: bool = False
    run_id: str = ""
    parent_run_id: str = ""
    train_digest: str = ""           # dataset inputs' digests (compare_data.py)
    val_digest: str = ""
    data_differs: bool = False


# The paper's numbers (docs/method.md §6 accuracy; §5 Mbit / FLOPs as in the paper's table).
PAPER_ROWS = (
    Row("paper", "CIFAR-10", "vgg7", "BNN", 32, "", 89.07, None,
        recipe="paper (FP weights, authors' setting)"),
    Row("paper", "CIFAR-10", "vgg7", "BinaryDuo", 32, "", 90.44, None,
        recipe="paper (FP weights, authors' setting)"),
    Row("paper", "ImageNet", "alexnet", "BNN", 1, "", 41.8, 67.1, recipe="paper (BNN row)"),
    Row("paper", "ImageNet", "alexnet", "XNOR-Net", 1, "", 44.2, 69.2, recipe="paper (cited)"),
    Row("paper", "ImageNet", "alexnet", "BNN+", 1, "", 46.1, 75.7, recipe="paper (cited)"),
    Row("paper", "ImageNet", "alexnet", "BinaryDuo", 1, "", 52.7, 76.0, mbit=189.0,
        mflops=119.0, recipe="paper"),
    Row("paper", "ImageNet", "resnet18", "Bi-Real", 1, "", 56.4, None,
        recipe="paper (cited; shortcut per conv)"),
    Row("paper", "ImageNet", "resnet18", "BinaryDuo", 1, "", 60.4, None, mbit=31.9, mflops=164.0,
        recipe="paper"),
    Row("paper", "ImageNet", "resnet18_sc", "BinaryDuo", 1, "", 60.9, 82.6, mbit=31.9,
        mflops=164.0, recipe="paper"),
)

_DATASET_PREFIXES = (("cifar100", "CIFAR-100"), ("cifar10", "CIFAR-10"), ("imagenet", "ImageNet"),
                     ("fashion_mnist", "Fashion-MNIST"), ("fashion-mnist", "Fashion-MNIST"))


def dataset_of(recipe: str, params: dict[str, str]) -> str:
    """The dataset of a run: from the recipe name's prefix (the shipped recipes' convention),
    else from the data section (``prepare: fashion-mnist``, preset ``imagenet``)."""
    lowered = recipe.lower()
    for prefix, label in _DATASET_PREFIXES:
        if lowered.startswith(prefix):
            return label
    if params.get("data.prepare") == "fashion-mnist":
        return "Fashion-MNIST"
    if params.get("data.preset") == "imagenet":
        return "ImageNet"
    return "?"


def method_of(variants: list[str]) -> str:
    if any(v in ("coupled", "decoupled") for v in variants):
        return "BinaryDuo"
    if variants and all(v == "fp" for v in variants):
        return "FP"
    return "BNN" if variants and all(v == "bnn" for v in variants) else "/".join(variants)


# ------------------------------------------------------------------------------------ reading


def open_store(uri: str):
    """An ``MlflowClient`` on ``uri``; a sqlite store must already exist (nothing is created)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CompareError(f"no MLflow store at {path} (train a recipe first, or pass "
                               f"--tracking-uri)")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(name)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(f"no MLflow experiment {name!r} (experiments: "
                               f"{', '.join(names) or 'none'})")
    except MlflowException as error:
        raise CompareError(f"cannot read the MLflow store: {_one_line(error)}") from None
    return found.experiment_id


def _one_line(error: Exception) -> str:
    return " ".join(str(getattr(error, "message", error)).split())[:500]


def search_parents(client, experiment: str, filters: list[str] = (), *,
                   include_smoke: bool = False) -> list:
    """Parent runs (one per recipe run) of ``experiment`` matching every MLflow filter string
    (applied to the parent runs: their params are the recipe, their tags the run's)."""
    from mlflow.exceptions import MlflowException

    clauses = [f.strip() for f in filters if f.strip()]
    if not include_smoke:
        clauses.append("tags.smoke = 'false'")
    try:
        runs = client.search_runs([experiment], filter_string=" and ".join(clauses),
                                  order_by=["attributes.start_time ASC"], max_results=50000)
    except MlflowException as error:
        raise CompareError(f"--filter: {_one_line(error)}") from None
    return [r for r in runs if PARENT_TAG not in r.data.tags]


def stage_runs(client, experiment: str, parent) -> list:
    """The stage runs of ``parent`` in stage order."""
    children = client.search_runs(
        [experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=1000)
    return sorted(children, key=lambda r: int(r.data.params.get("stage_index", 0)))


def latest_parent(client, experiment: str, recipe: str, *, include_smoke: bool = False):
    """The most recent FINISHED parent run of ``recipe`` (what ``binaryduo demo`` reports)."""
    runs = client.search_runs(
        [experiment], filter_string=f"tags.recipe = '{recipe}'"
        + ("" if include_smoke else " and tags.smoke = 'false'"),
        order_by=["attributes.start_time DESC"], max_results=50)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags and r.info.status == "FINISHED"]
    if not parents:
        raise RuntimeError(f"no finished MLflow run of recipe {recipe!r}")
    return parents[0]


def stage_metrics(client, experiment: str, parent) -> dict[str, dict[str, float]]:
    """``{stage name: latest metrics}`` of a parent run."""
    return {run.data.tags["stage"]: run.data.metrics for run in stage_runs(client, experiment,
                                                                            parent)}


@dataclass
class RunRecord:
    """A parent run, its stage runs and each stage's validation history (for the plot)."""
    parent: object
    stages: list
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # run id -> top1


def read_records(client, experiment: str, filters: list[str] = (), *,
                 include_smoke: bool = False, latest: bool = False) -> list[RunRecord]:
    parents = search_parents(client, experiment, filters, include_smoke=include_smoke)
    if latest:  # keep the most recent run of each recipe
        newest: dict[str, object] = {}
        for run in parents:
            newest[run.data.tags.get("recipe", run.info.run_id)] = run
        parents = sorted(newest.values(), key=lambda r: r.info.start_time)
    records = []
    for parent in parents:
        record = RunRecord(parent, stage_runs(client, experiment, parent))
        for stage in record.stages:
            history = client.get_metric_history(stage.info.run_id, "val_top1")
            record.histories[stage.info.run_id] = sorted((m.step, m.value) for m in history)
        records.append(record)
    return records


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def rows_of(record: RunRecord, client=None, now: float | None = None) -> list[Row]:
    """Table rows of one recipe run: one per stage, plus the decoupled model before fine-tuning."""
    parent = record.parent
    tags, params = parent.data.tags, parent.data.params
    recipe = tags.get("recipe", parent.info.run_name or "")
    variants = [s.data.tags.get("variant", "") for s in record.stages]
    common = dict(
        source="run", dataset=dataset_of(recipe, params), model=params.get("model.name", "?"),
        method=method_of(variants), world_size=_int(tags.get("world_size")),
        hardware=tags.get("hardware", ""), code_version=tags.get("code_version", ""),
        recipe=recipe, smoke=tags.get("smoke") == "true", parent_run_id=parent.info.run_id)
    now_ms = (now if now is not None else time.time()) * 1000
    common.update(data_digests(parent))
    rows = []
    for stage in record.stages:
        metrics, stage_tags = stage.data.metrics, stage.data.tags
        variant = stage_tags.get("variant", "")
        # the stage's own weight_bits (two-step weights, an FP teacher stage), else the model's
        bits = _int(stage.data.params.get("stage.weight_bits"))
        if bits is None:
            bits = _int(params.get("model.options.weight_bits"))
        if bits is None:
            bits = 32 if variant == "fp" else 1  # the registry's default
        history = record.histories.get(stage.info.run_id, [])
        epochs_done = len({step for step, _ in history if step >= 1})
        end = stage.info.end_time or (now_ms if stage.info.status == "RUNNING" else None)
        wall = (end - stage.info.start_time) / 1000 if end and stage.info.start_time else None
        speed = None
        if client is not None:
            values = [m.value for m in client.get_metric_history(stage.info.run_id,
                                                                 "images_per_second")]
            speed = statistics.median(values) if values else None
        base = dict(common, weight_bits=bits, mbit=metrics.get("mbit"),
                    mflops=metrics.get("mflops"), run_id=stage.info.run_id,
                    status=stage.info.status)
        name = stage_tags.get("stage", stage.info.run_name or "")
        if "decouple_decoupled_val_top1" in metrics:
            before5 = next((v for s, v in _history(client, stage, "val_top5") if s == 0), None)
            rows.append(Row(**base, stage=f"{name}: before fine-tune",
                            top1=metrics["decouple_decoupled_val_top1"], top5=before5, epochs=0))
        final = [v for s, v in history if s >= 1]
        rows.append(Row(**base, stage=f"{name} ({variant})",
                        top1=final[-1] if final else None,
                        top5=metrics.get("val_top5") if final else None,
                        best_top1=metrics.get("best_val_top1", max(final, default=None)),
                        epochs=epochs_done, planned_epochs=_int(stage.data.params.get(
                            "stage.epochs")), wall_seconds=wall, images_per_second=speed))
    return rows


def _history(client, run, key: str) -> list[tuple[int, float]]:
    if client is None:
        return []
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def compare_rows(records: list[RunRecord], client=None, *, paper: bool = True) -> list[Row]:
    """Rows of every run, grouped by (dataset, model) with the paper's rows of that group first;
    without runs, every paper row."""
    run_rows = mark_different_data([r for record in records for r in rows_of(record, client)])
    groups = list(dict.fromkeys((r.dataset, r.model) for r in run_rows))
    if not run_rows:
        groups = list(dict.fromkeys((r.dataset, r.model) for r in PAPER_ROWS))
    rows = []
    for group in groups:
        if paper:
            rows += [r for r in PAPER_ROWS if (r.dataset, r.model) == group]
        rows += [r for r in run_rows if (r.dataset, r.model) == group]
    return rows


# ----------------------------------------------------------------------------------- formatting

COLUMNS = (  # (header, Row attribute or callable)
    ("dataset", "dataset"), ("model", "model"), ("method", "method"), ("W bits", "weight_bits"),
    ("stage", "stage"), ("top-1", "top1"), ("top-5", "top5"), ("best top-1", "best_top1"),
    ("Mbit", "mbit"), ("MFLOPs", "mflops"), ("epochs", "epochs"), ("wall", "wall_seconds"),
    ("img/s", "images_per_second"), ("world", "world_size"), ("data", "train_digest"),
    ("code", "code_version"),
    ("recipe / source", "recipe"),
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _cell(row: Row, attribute: str) -> str:
    value = getattr(row, attribute)
    if attribute == "wall_seconds":
        return _duration(value)
    if attribute == "epochs":
        if value is None:
            return ""
        return f"{value}/{row.planned_epochs}" if row.planned_epochs not in (None, value) \
            else str(value)
    if attribute == "code_version" and len(value) > 12:
        return value[:12] + ("-dirty" if value.endswith("-dirty") else "")
    if attribute == "train_digest" and row.source == "run":
        shown = value[:8] or ("?" if row.val_digest else "")
        return f"{shown} ≠" if row.data_differs else shown
    if attribute == "world_size" and value is not None:
        return f"{value} x {row.hardware}" if row.hardware else str(value)
    if attribute == "recipe" and row.source == "run":
        flags = [f for f, on in (("smoke", row.smoke), (row.status.lower(),
                                                        row.status not in ("", "FINISHED")))
                 if on]
        return value + (f" ({', '.join(flags)})" if flags else "")
    if value is None:
        return ""
    if isinstance(value, float):
        if attribute == "images_per_second":
            return f"{value:.0f}"
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return str(value)


LEGEND = ("*italic*: the paper's numbers (Kim et al., ICLR 2020; docs/method.md §5-§6); "
          "top-1/top-5 = last epoch's validation accuracy (%), best top-1 = best epoch; "
          "epochs = done/planned; data = digest of the training data (MLflow dataset input), "
          "≠: runs of that dataset and model used different training or validation data.")


def format_markdown(rows: list, columns=COLUMNS, cell=None, legend: str = LEGEND) -> str:
    """A Markdown table of ``rows`` (paper rows in italics); ``columns``/``cell``: another row
    type's (``seed_groups``)."""
    cell = cell or _cell
    header = [h for h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell(row, a) for _, a in columns]
        if row.source == "paper":
            cells = [f"*{c}*" if c else c for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    lines.append(legend)
    return "\n".join(lines)


def format_csv(rows: list, row_type=Row) -> str:
    """Every field of ``row_type``, one line per row; a list field as its items separated by
    spaces."""
    buffer = io.StringIO()
    names = list(row_type.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else " ".join(map(str, v))
                             if isinstance(v, (list, tuple)) else v)
                         for k, v in asdict(row).items()})
    return buffer.getvalue().rstrip("\n")


def format_json(rows: list[Row]) -> str:
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return json.dumps([{k: clean(v) for k, v in asdict(r).items()} for r in rows], indent=2)


def format_rows(rows: list[Row], fmt: str) -> str:
    return {"md": format_markdown, "csv": format_csv, "json": format_json}[fmt](rows)


# -------------------------------------------------------------------------------------- plots
# (compare_plot.py; here too, where the CLI and seed_groups look for them)
from binaryduo.trainer.tracking.compare_plot import (curve_of, finish_plot,  # noqa: E402,F401
                                                     plot_comparison)
