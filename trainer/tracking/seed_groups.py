"""``compare --by-seed``: the runs of one recipe at several seeds, as one row per stage.

Grouping. ``binaryduo train`` tags every parent run with ``seed`` and ``recipe_hash_without_seed``
(the hash of the resolved recipe less its seed): runs sharing the latter are one recipe at
different seeds, one group. A run made before these tags existed is grouped by its
``recipe_hash`` (the whole recipe, seed included), so it forms a group of its own (n = 1; its
seed is read from the recipe's ``seed`` param).

What counts. Only FINISHED recipe runs: a running, failed or killed run stopped somewhere in
its schedule, and its last epoch is not the recipe's result (a run stopped after 2 of 5 epochs
would pull the mean down by how early it stopped, not by how the recipe does). A seed that
appears twice in a group (re-run outside a sweep, say) counts once, by its latest finished run;
both facts are reported as notes.

Rows. One per (group, stage) -- with the "before fine-tune" pseudo-stage of a decouple stage, as
``compare`` makes it: n (seeds), the seeds, mean, sample standard deviation (n - 1), min and max
of the final (last-epoch) top-1 and top-5 and of the best top-1 (``seed_stats.summarize``), and
compare's descriptive columns. ``--baseline RECIPE`` adds, on the final-stage row (the recipe's
last stage) of every other group of the baseline's dataset, final top-1 minus the baseline's
with a 95 % t interval and p-value (``seed_stats.compare_samples``: paired by seed when both
groups ran the same seeds, else Welch).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from binaryduo.trainer.tracking import compare
from binaryduo.trainer.tracking.compare import CompareError, Row, RunRecord
from binaryduo.trainer.tracking.seed_stats import TOO_FEW, compare_samples, summarize


@dataclass
class SeedGroup:
    """The finished runs of one recipe (less its seed), one per seed."""
    key: str                     # recipe_hash_without_seed, or "recipe_hash:..." for older runs
    recipe: str
    records: dict[str, RunRecord] = field(default_factory=dict)      # seed -> latest run
    rows: dict[str, list[Row]] = field(default_factory=dict)         # seed -> compare's rows

    def seeds(self) -> list[str]:
        return sorted(self.records, key=_seed_order)


def _seed_order(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def group_records(records: list[RunRecord], client=None) -> tuple[list[SeedGroup], list[str]]:
    """The FINISHED records by recipe-without-seed, and notes (runs left out, seeds run twice).
    ``records`` in start order (``compare.read_records``): a later run of a seed replaces an
    earlier one."""
    groups: dict[str, SeedGroup] = {}
    repeats: dict[tuple[str, str], int] = {}
    unfinished: dict[str, int] = {}
    for record in records:
        info, tags = record.parent.info, record.parent.data.tags
        if info.status != "FINISHED":
            unfinished[info.status] = unfinished.get(info.status, 0) + 1
            continue
        key = tags.get("recipe_hash_without_seed") or (
            f"recipe_hash:{tags['recipe_hash']}" if "recipe_hash" in tags else f"run:{info.run_id}")
        seed = tags.get("seed") or record.parent.data.params.get("seed", "?")
        group = groups.setdefault(key, SeedGroup(key, tags.get("recipe", info.run_name or "")))
        if seed in group.records:
            repeats[key, seed] = repeats.get((key, seed), 1) + 1
        group.records[seed] = record
        group.rows[seed] = compare.rows_of(record, client)
    notes = []
    if unfinished:
        counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(unfinished.items()))
        notes.append(f"left out {sum(unfinished.values())} unfinished recipe runs ({counts}): "
                     "only FINISHED runs count, an unfinished run's last epoch is not the "
                     "recipe's result")
    for (key, seed), count in repeats.items():
        latest = groups[key].records[seed].parent.info
        started = datetime.datetime.fromtimestamp(latest.start_time / 1000).strftime(
            "%Y-%m-%d %H:%M:%S")
        notes.append(f"{groups[key].recipe} seed {seed}: {count} finished runs; using the latest "
                     f"(run {latest.run_id}, started {started})")
    return list(groups.values()), notes


@dataclass(frozen=True)
class SeedRow:
    """A stage of a group of seeds (or a paper reference: ``source`` "paper", n None)."""
    source: str                      # "runs" or "paper"
    dataset: str
    model: str
    method: str
    weight_bits: int | None
    stage: str
    n: int | None
    seeds: tuple[str, ...]
    top1_mean: float | None
    top1_std: float | None           # sample standard deviation (n - 1); None for n < 2
    top1_min: float | None
    top1_max: float | None
    top5_mean: float | None
    top5_std: float | None
    top5_min: float | None
    top5_max: float | None
    best_top1_mean: float | None
    best_top1_std: float | None
    best_top1_min: float | None
    best_top1_max: float | None
    mbit: float | None
    mflops: float | None
    epochs: int | None
    planned_epochs: int | None
    recipe: str
    group: str                       # recipe_hash_without_seed (see group_records)
    final: bool                      # the recipe's last stage (what --baseline compares)
    smoke: bool
    run_ids: tuple[str, ...]         # the stage's run per seed, in seed order
    # --baseline, on final rows of the baseline's dataset: "" | "(baseline)" | baseline's recipe
    vs_baseline: str = ""
    test: str = ""                   # "paired t", "Welch t" or "n<2"
    n_baseline: int | None = None
    diff_top1: float | None = None   # mean final top-1 minus the baseline's (paired: mean diff)
    ci_low: float | None = None      # 95 % interval of diff_top1
    ci_high: float | None = None
    df: float | None = None
    t: float | None = None
    p_value: float | None = None     # two-sided, H0: no difference


def _stats(prefix: str, values: list) -> dict:
    summary = summarize(values)
    return {f"{prefix}_mean": summary.mean, f"{prefix}_std": summary.std,
            f"{prefix}_min": summary.min, f"{prefix}_max": summary.max}


def group_rows(group: SeedGroup) -> list[SeedRow]:
    """One row per stage label (in the recipe's stage order) of one group."""
    seeds = group.seeds()
    per_seed = {seed: {row.stage: row for row in group.rows[seed]} for seed in seeds}
    labels = list(dict.fromkeys(row.stage for seed in seeds for row in group.rows[seed]))
    rows = []
    for index, label in enumerate(labels):
        present = [(seed, per_seed[seed][label]) for seed in seeds if label in per_seed[seed]]
        stage = [row for _, row in present]
        first = stage[0]
        rows.append(SeedRow(
            source="runs", dataset=first.dataset, model=first.model, method=first.method,
            weight_bits=first.weight_bits, stage=label, n=len(stage),
            seeds=tuple(seed for seed, _ in present),
            **_stats("top1", [r.top1 for r in stage]), **_stats("top5", [r.top5 for r in stage]),
            **_stats("best_top1", [r.best_top1 for r in stage]),
            mbit=first.mbit, mflops=first.mflops, epochs=max(
                (r.epochs for r in stage if r.epochs is not None), default=None),
            planned_epochs=first.planned_epochs, recipe=group.recipe, group=group.key,
            final=index == len(labels) - 1, smoke=first.smoke,
            run_ids=tuple(r.run_id for r in stage)))
    return rows


def _paper_row(row: Row) -> SeedRow:
    empty = {f.name: None for f in fields(SeedRow) if f.name.endswith(("_std", "_min", "_max"))}
    return SeedRow(**{**empty, "source": "paper", "dataset": row.dataset, "model": row.model,
                      "method": row.method, "weight_bits": row.weight_bits, "stage": "", "n": None,
                      "seeds": (), "top1_mean": row.top1, "top5_mean": row.top5,
                      "best_top1_mean": None, "mbit": row.mbit, "mflops": row.mflops,
                      "epochs": None, "planned_epochs": None, "recipe": row.recipe, "group": "",
                      "final": False, "smoke": False, "run_ids": ()})


def seed_rows(groups: list[SeedGroup], *, paper: bool = True) -> list[SeedRow]:
    """Every group's rows, ordered as ``compare_rows`` orders runs: by (dataset, model), the
    paper's rows of that pair first; without groups, every paper row."""
    run_rows = [row for group in groups for row in group_rows(group)]
    pairs = list(dict.fromkeys((r.dataset, r.model) for r in run_rows)) or \
        list(dict.fromkeys((r.dataset, r.model) for r in compare.PAPER_ROWS))
    rows = []
    for pair in pairs:
        if paper:
            rows += [_paper_row(r) for r in compare.PAPER_ROWS if (r.dataset, r.model) == pair]
        rows += [r for r in run_rows if (r.dataset, r.model) == pair]
    return rows


def with_baseline(rows: list[SeedRow], groups: list[SeedGroup], baseline: str
                  ) -> tuple[list[SeedRow], list[str]]:
    """``rows`` with the final-stage row of every group of the baseline's dataset compared with
    the baseline's (final top-1, other - baseline); ``baseline`` names a recipe (or a group's
    hash). CompareError when it names no group, or several."""
    matches = [g for g in groups if baseline in (g.recipe, g.key)]
    if not matches:
        names = sorted({g.recipe for g in groups})
        raise CompareError(f"--baseline {baseline!r}: no finished runs of that recipe among the "
                           f"compared runs (recipes: {', '.join(names) or 'none'})")
    if len(matches) > 1:
        raise CompareError(f"--baseline {baseline!r}: names {len(matches)} different recipes "
                           f"(recipe_hash_without_seed {', '.join(g.key for g in matches)}); "
                           "pass one of these hashes, or narrow with --filter / --sweep")
    final = {row.group: row for row in rows if row.source == "runs" and row.final}
    if matches[0].key not in final:  # finished, yet no stage run recorded a result
        raise CompareError(f"--baseline {baseline!r}: its finished runs have no stage results "
                           f"in the store")
    base = final[matches[0].key]

    def values(group: SeedGroup) -> dict[str, float]:
        row = final[group.key]
        return {seed: r.top1 for seed in group.seeds() for r in group.rows[seed]
                if r.stage == row.stage and r.top1 is not None}

    base_values = values(matches[0])
    compared = {}
    for group in groups:
        row = final.get(group.key)
        if row is None or group is matches[0] or row.dataset != base.dataset:
            continue
        d = compare_samples(values(group), base_values)
        compared[group.key] = replace(
            row, vs_baseline=base.recipe, test=d.test, n_baseline=d.n_baseline, diff_top1=d.diff,
            ci_low=d.ci_low, ci_high=d.ci_high, df=d.df, t=d.t, p_value=d.p_value)
    compared[base.group] = replace(base, vs_baseline="(baseline)", n_baseline=base.n)
    notes = [] if len(compared) > 1 else [
        f"--baseline {baseline!r}: no other recipe of dataset {base.dataset} to compare with"]
    return [compared.get(r.group, r) if r.source == "runs" and r.final else r for r in rows], notes


# ----------------------------------------------------------------------------------- formatting


def _number(value: float | None, signed: bool = False) -> str:
    return "" if value is None else f"{value:+.2f}" if signed else f"{value:.2f}"


def _spread(row: SeedRow, prefix: str) -> str:
    mean, std = getattr(row, f"{prefix}_mean"), getattr(row, f"{prefix}_std")
    return _number(mean) + (f" ± {std:.2f}" if std is not None else "")


def _cell(row: SeedRow, attribute: str) -> str:
    if attribute in ("top1", "top5", "best_top1"):
        return _spread(row, attribute)
    if attribute.endswith("_range"):
        prefix = attribute.removesuffix("_range")
        low, high = getattr(row, f"{prefix}_min"), getattr(row, f"{prefix}_max")
        return f"{low:.2f}–{high:.2f}" if row.n and row.n >= 2 and low is not None else ""
    if attribute == "seeds":
        return " ".join(row.seeds)
    if attribute == "diff_top1":
        if row.vs_baseline == "(baseline)":
            return "baseline"
        if row.diff_top1 is None:
            return ""
        if row.ci_low is None:
            return f"{row.diff_top1:+.2f} (n<2)"
        return f"{row.diff_top1:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"
    if attribute == "test":
        if not row.test or row.test == TOO_FEW:
            return row.test
        ns = f"n={row.n}" if row.test.startswith("paired") else f"n={row.n} vs {row.n_baseline}"
        return f"{row.test} ({ns}, df {row.df:.3g})"
    if attribute == "p_value":
        return "" if row.p_value is None else f"{row.p_value:.3g}"
    if attribute == "recipe" and row.source == "runs" and row.smoke:
        return f"{row.recipe} (smoke)"
    if attribute == "epochs" and row.epochs is not None and row.planned_epochs not in (
            None, row.epochs):
        return f"{row.epochs}/{row.planned_epochs}"
    value = getattr(row, attribute)
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


COLUMNS = (
    ("dataset", "dataset"), ("model", "model"), ("method", "method"), ("W bits", "weight_bits"),
    ("stage", "stage"), ("n", "n"), ("seeds", "seeds"), ("top-1 mean ± std", "top1"),
    ("top-1 min–max", "top1_range"), ("top-5 mean ± std", "top5"),
    ("top-5 min–max", "top5_range"),
    ("best top-1 mean ± std", "best_top1"), ("Mbit", "mbit"), ("MFLOPs", "mflops"),
    ("epochs", "epochs"), ("recipe / source", "recipe"),
)
BASELINE_COLUMNS = (("Δ top-1 vs baseline [95% CI]", "diff_top1"), ("test", "test"),
                    ("p", "p_value"))
LEGEND = ("*italic*: the paper's numbers (Kim et al., ICLR 2020; docs/method.md §5-§6). One row "
          "per recipe (less its seed) and stage, over its FINISHED runs (the latest per seed): n "
          "seeds, mean ± sample standard deviation (n − 1) and min–max of the last epoch's "
          "validation accuracy (%) and of the best epoch's top-1.")
BASELINE_LEGEND = (" Δ top-1: the recipe's final stage minus the baseline's final stage, mean "
                   "final top-1, with a 95 % t interval; paired by seed when both ran the same "
                   "seeds, else Welch; p: two-sided t test of no difference.")


def format_seed_rows(rows: list[SeedRow], fmt: str) -> str:
    """md (the baseline's columns only when --baseline), or csv / json: every SeedRow field."""
    if fmt == "csv":
        return compare.format_csv(rows, SeedRow)
    if fmt == "json":
        return compare.format_json(rows)
    baseline = any(r.vs_baseline for r in rows)
    columns = COLUMNS[:-1] + (BASELINE_COLUMNS if baseline else ()) + COLUMNS[-1:]
    return compare.format_markdown(rows, columns, _cell,
                                   LEGEND + (BASELINE_LEGEND if baseline else ""))


# -------------------------------------------------------------------------------------- plots


def plot_seed_groups(groups: list[SeedGroup], rows: list[SeedRow], path: Path) -> Path:
    """Two panels: per group, validation top-1 per epoch, the mean over seeds as a line and
    ± one sample standard deviation as a band (stages one after the other, as ``compare --plot``
    draws a run); and the mean top-1 of every stage against Mbit with ± std error bars, the
    paper's numbers as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, sizes) = plt.subplots(1, 2, figsize=(13, 5))
    colours: dict[str, object] = {}
    for group in groups:
        # (x, k): the k-th point at epoch x of a run -- a decouple stage's step 0 (before
        # fine-tuning) shares its x with the previous stage's last epoch
        points: dict[tuple[int, int], list[float]] = {}
        boundaries: set[int] = set()
        for record in group.records.values():
            xs, ys, cuts = compare.curve_of(record)
            boundaries.update(cuts)
            for index, (x, y) in enumerate(zip(xs, ys)):
                points.setdefault((x, xs[:index].count(x)), []).append(y)
        if not points:
            continue
        keys = sorted(points)
        xs = [x for x, _ in keys]
        stats = [summarize(points[key]) for key in keys]
        means = [s.mean for s in stats]
        line, = curves.plot(xs, means, marker="o", markersize=3,
                            label=f"{group.recipe} (n={len(group.records)})")
        colour = colours[group.key] = line.get_color()
        spread = [s.std or 0.0 for s in stats]
        if len(xs) == 1:   # a one-epoch curve: a band of no width, an error bar instead
            curves.errorbar(xs, means, yerr=spread, color=colour, capsize=3)
        curves.fill_between(xs, [m - s for m, s in zip(means, spread)],
                            [m + s for m, s in zip(means, spread)], color=colour, alpha=0.2)
        for boundary in sorted(boundaries):
            curves.axvline(boundary, color=colour, linestyle=":", linewidth=1)
    curves.set(xlabel="epoch (stages in order; dotted: stage boundary)",
               ylabel="validation top-1 (%)", title="validation top-1 per epoch, mean ± std")
    curves.grid(alpha=0.3)
    if groups:
        curves.legend(fontsize=7)

    shown = [r for r in rows if r.mbit is not None and r.top1_mean is not None
             and "before fine-tune" not in r.stage]
    for row in shown:
        if row.source == "paper":
            sizes.scatter(row.mbit, row.top1_mean, marker="*", s=90, color="black")
            text = f"paper {row.model} {row.method}"
        else:
            sizes.errorbar(row.mbit, row.top1_mean, yerr=row.top1_std or 0.0, fmt="o",
                           markersize=5, capsize=3, color=colours.get(row.group, "tab:blue"))
            text = f"{row.recipe}: {row.stage.split(' ')[0]} (n={row.n})"
        sizes.annotate(text, (row.mbit, row.top1_mean), fontsize=6, xytext=(3, 3),
                       textcoords="offset points")
    return compare.finish_plot(figure, sizes, [r.mbit for r in shown], path,
                               title="accuracy vs size, mean ± std over seeds (star: paper)")
