"""``binaryduo compare --by-seed`` / ``--baseline`` (issue 15): statistics over seeds.

(a) ``seed_stats`` against known values: R's ``t.test`` on Student's sleep data (printed in every
R installation's example, and in textbooks), and small samples whose t quantiles have closed
forms (df = 1: tan(0.475 pi); df = 2: sqrt(2 q^2 / (1 - q^2)) with q = 0.95).
(b) the aggregation on a store filled by real ``binaryduo train --smoke`` runs of two tiny
Fashion-MNIST recipes at several seeds (plus a re-run seed, a failed run and a run from before
the seed tags, written with MlflowClient): compare's json equals the runs' MLflow metrics
aggregated by hand here (``statistics``: mean, stdev with n - 1).
(c) bad input: one ``binaryduo: error:`` line, exit 2, nothing written.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest
from mlflow.tracking import MlflowClient

from binaryduo.trainer.tracking.seed_stats import (PAIRED, TOO_FEW, WELCH, Summary,
                                                   compare_samples, paired_difference,
                                                   summarize, welch_difference)

# ------------------------------------------------------------------- (a) statistics, known values

# Student (1908) / Cushny & Peebles: extra hours of sleep of 10 patients under two drugs (R's
# `sleep` data set). R 4.x prints, for t.test(g1, g2, paired = TRUE):
#   t = -4.0621, df = 9, p-value = 0.002833, 95 % CI -2.4598858 -0.7001142, mean diff -1.58
# and for t.test(g1, g2) (Welch, R's default):
#   t = -1.8608, df = 17.776, p-value = 0.07939, 95 % CI -3.3654832 0.2054832
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_summary_mean_sample_std_min_max():
    s = summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])  # population std 2, n-1: sqrt(32/7)
    assert (s.n, s.mean, s.min, s.max) == (8, 5.0, 2.0, 9.0)
    assert s.std == pytest.approx(math.sqrt(32 / 7), rel=1e-15)
    assert summarize([1.5]) == Summary(1, 1.5, None, 1.5, 1.5)   # n = 1: no spread
    assert summarize([]).n == 0 and summarize([None, 3.0]).mean == 3.0
    sleep = summarize(SLEEP_1)
    assert sleep.mean == pytest.approx(0.75) and sleep.std == pytest.approx(1.789010, abs=1e-6)


def test_paired_t_interval_sleep_data():
    d = paired_difference(SLEEP_1, SLEEP_2)
    assert d.test == PAIRED and d.n_other == d.n_baseline == 10 and d.df == 9
    assert d.diff == pytest.approx(-1.58, abs=1e-12)
    assert d.t == pytest.approx(-4.0621, abs=5e-5)
    assert d.p_value == pytest.approx(0.002833, abs=5e-7)
    assert (d.ci_low, d.ci_high) == (pytest.approx(-2.4598858, abs=5e-8),
                                     pytest.approx(-0.7001142, abs=5e-8))


def test_welch_interval_sleep_data():
    d = welch_difference(SLEEP_1, SLEEP_2)
    assert d.test == WELCH and d.df == pytest.approx(17.776, abs=5e-4)
    assert d.t == pytest.approx(-1.8608, abs=5e-5)
    assert d.p_value == pytest.approx(0.07939, abs=5e-6)
    assert (d.ci_low, d.ci_high) == (pytest.approx(-3.3654832, abs=5e-8),
                                     pytest.approx(0.2054832, abs=5e-8))


def test_closed_form_cases():
    # paired, differences 1, 2, 3: mean 2, s_d 1, SE 1/sqrt 3, df 2. For df = 2 the t
    # distribution has F(t) = 1/2 + t / (2 sqrt(2 + t^2)): the 97.5 % quantile solves
    # t / sqrt(2 + t^2) = 0.95, t = sqrt(2 * 0.9025 / 0.0975) = 4.30265 (tables: 4.303); the
    # two-sided p of t = 2 sqrt 3 is 1 - sqrt(12 / 14) = 0.07418.
    d = compare_samples({"0": 2.0, "1": 4.0, "2": 6.0}, {"0": 1.0, "1": 2.0, "2": 3.0})
    q = math.sqrt(2 * 0.9025 / 0.0975)
    assert d.test == PAIRED and d.df == 2 and d.diff == 2.0
    assert d.se == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    assert d.t == pytest.approx(2 * math.sqrt(3), rel=1e-12)
    assert d.p_value == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)
    assert d.ci_low == pytest.approx(2 - q / math.sqrt(3), rel=1e-9)
    assert d.ci_high == pytest.approx(2 + q / math.sqrt(3), rel=1e-9)
    # Welch, equal n and variances (1, 2, 3 vs 3, 4, 5): SE^2 = 1/3 + 1/3, df = 2 (n - 1) = 4;
    # t_{0.975, 4} = 2.776 (tables), t = -2 / sqrt(2/3) = -sqrt 6. For df = 4,
    # F(t) = 1/2 + 3/8 * u * (1 - u^2 / 12 * ...) with u = t / sqrt(1 + t^2/4):
    # F(sqrt 6) = 1/2 + 3/8 * sqrt(6/2.5) * (1 - 6 / 30) = 0.964758, p = 0.070484.
    d = compare_samples({"0": 1.0, "1": 2.0, "2": 3.0}, {"3": 3.0, "4": 4.0, "5": 5.0})
    assert d.test == WELCH and d.df == pytest.approx(4.0, rel=1e-12) and d.diff == -2.0
    assert d.t == pytest.approx(-math.sqrt(6), rel=1e-12)
    assert d.p_value == pytest.approx(2 * (0.5 - 0.375 * math.sqrt(6 / 2.5) * 0.8), rel=1e-9)
    assert d.ci_high - d.diff == pytest.approx(2.776 * math.sqrt(2 / 3), abs=1e-3)
    # Welch-Satterthwaite by hand: (1,2,3) vs (4,6): v = 1/3 and 2/2, df = (4/3)^2 / (1/18 + 1)
    d = welch_difference([1.0, 2.0, 3.0], [4.0, 6.0])
    assert d.df == pytest.approx(32 / 19, rel=1e-12) and d.t == pytest.approx(-3 / math.sqrt(4 / 3))
    # n = 2 paired: df = 1 (Cauchy), t_{0.975, 1} = tan(0.475 pi) = 12.706, p = 1 - 2/pi atan|t|
    d = compare_samples({"a": 3.0, "b": 5.0}, {"a": 1.0, "b": 2.0})   # differences 2, 3
    assert d.test == PAIRED and d.df == 1 and d.se == pytest.approx(0.5)
    assert d.ci_high == pytest.approx(2.5 + math.tan(0.475 * math.pi) * 0.5, rel=1e-9)
    assert d.p_value == pytest.approx(1 - 2 / math.pi * math.atan(5.0), rel=1e-9)


def test_which_test_and_degenerate_cases():
    # same seeds but n = 1, or one group of one: a difference of means, no interval
    for other, base in (({"1": 3.0}, {"1": 1.0}), ({"1": 3.0, "2": 5.0}, {"7": 1.0})):
        d = compare_samples(other, base)
        assert d.test == TOO_FEW and d.ci_low is None and d.p_value is None
        assert d.diff == statistics.mean(other.values()) - statistics.mean(base.values())
    # different seed sets of n >= 2: Welch (not paired), even with equal sizes
    assert compare_samples({"1": 1.0, "2": 2.0}, {"1": 1.0, "3": 2.5}).test == WELCH
    # no spread at all: the interval is the point; p = 0 unless the difference is 0
    d = compare_samples({"1": 2.0, "2": 3.0}, {"1": 1.0, "2": 2.0})
    assert (d.ci_low, d.ci_high, d.p_value, d.t) == (1.0, 1.0, 0.0, math.inf)
    d = welch_difference([1.0, 1.0], [1.0, 1.0, 1.0])
    assert (d.diff, d.ci_low, d.ci_high, d.p_value) == (0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------- (b) real tiny runs at several seeds

BNN = "fashion_mnist_tiny_bnn"
DUO = "fashion_mnist_tiny_duo"
OLD = "fashion_mnist_tiny_old"
# (recipe, seed, sweep): the last re-runs seed 2 of the BNN in another sweep (later: it counts)
RUNS = [(BNN, 1, "s1"), (BNN, 2, "s1"), (BNN, 3, "s1"), (DUO, 1, "s1"), (DUO, 2, "s1"),
        (BNN, 2, "s2")]
BNN_STAGES = """\
stages:
  - name: bnn
    variant: bnn
    epochs: 1
    optimizer: {lr: 0.05}
    schedule: {kind: cosine}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory, fashion_mnist, tiny_recipe_text, run_binaryduo):
    """A store of 6 real --smoke runs (RUNS), then, written directly: a FAILED run of the
    BinaryDuo recipe at seed 9 and a finished run from before the seed tags (recipe_hash only;
    seed 5 in the recipe's params)."""
    root = tmp_path_factory.mktemp("seed-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    duo = tiny_recipe_text.replace("DATA", str(fashion_mnist)).replace("tiny-duo", DUO)
    bnn = duo[:duo.index("stages:")] + BNN_STAGES
    for name, text in ((DUO, duo), (BNN, bnn)):
        (root / f"{name}.yaml").write_text(text.replace(DUO, name))
    for name, seed, sweep in RUNS:
        run_binaryduo("train", root / f"{name}.yaml", "--smoke", "--set", f"seed={seed}",
                      "--tag", f"sweep_id={sweep}", "--output", root / f"{name}-{seed}-{sweep}",
                      "--tracking-uri", uri, cwd=root)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("binaryduo").experiment_id
    duo_parent = parents(client, experiment, f"{DUO}-smoke")[0]
    failed = client.create_run(experiment, run_name=f"{DUO}-smoke", tags={
        **{k: duo_parent.data.tags[k] for k in ("recipe", "smoke", "recipe_hash_without_seed")},
        "seed": "9"})
    client.log_param(failed.info.run_id, "model.name", "vgg7")
    client.set_terminated(failed.info.run_id, "FAILED")
    old = client.create_run(experiment, run_name=f"{OLD}-smoke", tags={
        "recipe": f"{OLD}-smoke", "smoke": "true", "recipe_hash": "0123456789abcdef"})
    client.log_param(old.info.run_id, "model.name", "vgg7")
    client.log_param(old.info.run_id, "seed", "5")
    stage = client.create_run(experiment, run_name="bnn", tags={
        "mlflow.parentRunId": old.info.run_id, "stage": "bnn", "variant": "bnn"})
    client.log_param(stage.info.run_id, "stage_index", "0")
    client.log_param(stage.info.run_id, "stage.epochs", "1")
    for key, value in (("val_top1", 12.5), ("val_top5", 50.0), ("best_val_top1", 12.5),
                       ("mbit", 0.1), ("mflops", 0.1)):
        client.log_metric(stage.info.run_id, key, value, step=1)
    client.set_terminated(stage.info.run_id)
    client.set_terminated(old.info.run_id)
    return root, uri


def parents(client, experiment, recipe, sweep=None):
    """The FINISHED parent runs of ``recipe``, oldest first."""
    runs = client.search_runs([experiment], f"tags.recipe = '{recipe}'",
                              order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags
            and r.info.status == "FINISHED" and sweep in (None, r.data.tags.get("sweep_id"))]


def by_hand(uri, recipe, sweep=None):
    """{stage label: {seed: (top1, top5, best top1, stage run id, metrics)}} read back from MLflow:
    the latest finished run of each seed, as compare must choose it."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("binaryduo").experiment_id
    table: dict[str, dict] = {}
    for parent in parents(client, experiment, recipe, sweep):   # later runs overwrite
        seed = parent.data.tags["seed"]
        for stage in client.search_runs(
                [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
            m, name = stage.data.metrics, stage.data.tags["stage"]
            if "decouple_decoupled_val_top1" in m:
                before5 = [x.value for x in client.get_metric_history(stage.info.run_id,
                                                                      "val_top5") if x.step == 0]
                table.setdefault(f"{name}: before fine-tune", {})[seed] = (
                    m["decouple_decoupled_val_top1"], before5[0], None, stage.info.run_id, m)
            table.setdefault(f"{name} ({stage.data.tags['variant']})", {})[seed] = (
                m["val_top1"], m["val_top5"], m["best_val_top1"], stage.info.run_id, m)
    return table


@pytest.fixture
def compare(compare_cli):
    return compare_cli


SEEDS = ("--by-seed", "--include-smoke", "--no-paper")


@pytest.mark.slow
def test_json_aggregates_equal_hand_computation(store, compare):
    root, uri = store
    result = compare(uri, *SEEDS, "--sweep", "s1", "--format", "json", cwd=root)
    rows = json.loads(result.stdout)
    assert result.stderr == ""   # within sweep s1: no re-run seed, no unfinished run
    assert [(r["recipe"], r["stage"], r["final"]) for r in rows] == [
        (f"{BNN}-smoke", "bnn (bnn)", True),
        (f"{DUO}-smoke", "coupled (coupled)", False),
        (f"{DUO}-smoke", "finetune: before fine-tune", False),
        (f"{DUO}-smoke", "finetune (decoupled)", True)]
    for row in rows:
        expected = by_hand(uri, row["recipe"], "s1")[row["stage"]]
        seeds = sorted(expected, key=int)
        assert row["seeds"] == seeds == (["1", "2", "3"] if "bnn" in row["recipe"] else ["1", "2"])
        assert row["n"] == len(seeds)
        assert row["run_ids"] == [expected[s][3] for s in seeds]
        for index, key in enumerate(("top1", "top5", "best_top1")):
            values = [expected[s][index] for s in seeds]
            if values[0] is None:   # before fine-tune: no best epoch
                assert row[f"{key}_mean"] is None
                continue
            assert row[f"{key}_mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
            assert (row[f"{key}_min"], row[f"{key}_max"]) == (min(values), max(values))
        metrics = expected[seeds[0]][4]
        assert (row["mbit"], row["mflops"]) == (metrics["mbit"], metrics["mflops"])
        assert row["dataset"] == "Fashion-MNIST" and row["model"] == "vgg7"
        assert row["method"] == ("BNN" if "bnn" in row["recipe"] else "BinaryDuo")
        assert row["epochs"] == (0 if "before" in row["stage"] else 1) and row["smoke"] is True
        assert row["vs_baseline"] == "" and row["diff_top1"] is None


@pytest.mark.slow
def test_unfinished_rerun_and_untagged_runs(store, compare):
    root, uri = store
    result = compare(uri, *SEEDS, "--format", "json", "--baseline", f"{BNN}-smoke", cwd=root)
    rows = {(r["recipe"], r["stage"]): r for r in json.loads(result.stdout)}
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("binaryduo: note: ") for n in notes)
    assert "left out 1 unfinished recipe runs (1 failed)" in notes[0]
    latest = by_hand(uri, f"{BNN}-smoke")["bnn (bnn)"]   # seed 2: the s2 re-run
    assert f"{BNN}-smoke seed 2: 2 finished runs; using the latest (run " in notes[1]
    bnn = rows[f"{BNN}-smoke", "bnn (bnn)"]
    assert bnn["run_ids"] == [latest[s][3] for s in ("1", "2", "3")]
    assert bnn["vs_baseline"] == "(baseline)" and bnn["n"] == 3
    duo = rows[f"{DUO}-smoke", "finetune (decoupled)"]
    assert duo["seeds"] == ["1", "2"] and duo["test"] == "Welch t"   # seed 9 failed: left out
    # before the seed tags: its own group of one, seed from the recipe's params, no interval
    old = rows[f"{OLD}-smoke", "bnn (bnn)"]
    assert (old["n"], old["seeds"], old["top1_mean"], old["top1_std"]) == (1, ["5"], 12.5, None)
    assert old["group"] == "recipe_hash:0123456789abcdef" and old["test"] == "n<2"
    base = [latest[s][0] for s in ("1", "2", "3")]
    assert old["diff_top1"] == pytest.approx(12.5 - statistics.mean(base), rel=1e-12)
    assert old["ci_low"] is None and old["p_value"] is None
    markdown = compare(uri, *SEEDS, "--baseline", f"{BNN}-smoke", cwd=root).stdout
    line = next(x for x in markdown.splitlines() if f"{OLD}-smoke" in x)
    assert "| n<2 |" in line and " (n<2) |" in line


@pytest.mark.slow
def test_baseline_welch_and_paired(store, compare):
    root, uri = store
    bnn_by_hand = by_hand(uri, f"{BNN}-smoke", "s1")["bnn (bnn)"]
    duo_by_hand = by_hand(uri, f"{DUO}-smoke", "s1")["finetune (decoupled)"]
    # seeds 1, 2 vs 1, 2, 3: Welch
    rows = json.loads(compare(uri, *SEEDS, "--sweep", "s1", "--baseline", f"{BNN}-smoke",
                              "--format", "json", cwd=root).stdout)
    duo = next(r for r in rows if r["final"] and r["recipe"] == f"{DUO}-smoke")
    other = [duo_by_hand[s][0] for s in ("1", "2")]
    base = [bnn_by_hand[s][0] for s in ("1", "2", "3")]
    va, vb = statistics.variance(other) / 2, statistics.variance(base) / 3
    assert duo["vs_baseline"] == f"{BNN}-smoke" and duo["test"] == "Welch t"
    assert (duo["n"], duo["n_baseline"]) == (2, 3)
    assert duo["diff_top1"] == pytest.approx(statistics.mean(other) - statistics.mean(base))
    if va + vb > 0:
        assert duo["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 + vb ** 2 / 2), rel=1e-12)
        assert duo["t"] == pytest.approx(duo["diff_top1"] / math.sqrt(va + vb), rel=1e-12)
        assert duo["ci_low"] < duo["diff_top1"] < duo["ci_high"]
    assert [r["vs_baseline"] for r in rows if not r["final"]] == ["", ""]   # BinaryDuo's first
    # seed 3 left out: both ran seeds 1 and 2, paired on the per-seed differences, df = 1
    rows = json.loads(compare(uri, *SEEDS, "--sweep", "s1", "--filter", "tags.seed != '3'",
                              "--baseline", f"{BNN}-smoke", "--format", "json", cwd=root).stdout)
    duo = next(r for r in rows if r["final"] and r["recipe"] == f"{DUO}-smoke")
    d = [duo_by_hand[s][0] - bnn_by_hand[s][0] for s in ("1", "2")]
    assert (duo["test"], duo["n"], duo["n_baseline"], duo["df"]) == ("paired t", 2, 2, 1)
    assert duo["diff_top1"] == pytest.approx((d[0] + d[1]) / 2, rel=1e-12)
    half = math.tan(0.475 * math.pi) * abs(d[0] - d[1]) / 2   # t_{0.975,1} * s_d / sqrt 2
    assert duo["ci_low"] == pytest.approx(duo["diff_top1"] - half, rel=1e-9, abs=1e-12)
    assert duo["ci_high"] == pytest.approx(duo["diff_top1"] + half, rel=1e-9, abs=1e-12)
    if d[0] != d[1]:
        t = duo["diff_top1"] / (abs(d[0] - d[1]) / 2)
        assert duo["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-9)


@pytest.mark.slow
def test_formats_carry_the_same_numbers(store, compare):
    root, uri = store
    args = (*SEEDS[:2], "--sweep", "s1", "--baseline", f"{BNN}-smoke")
    rows = json.loads(compare(uri, *args, "--format", "json", cwd=root).stdout)
    table = list(csv.DictReader(io.StringIO(compare(uri, *args, "--format", "csv",
                                                    cwd=root).stdout)))
    assert [list(r) for r in table] == [list(r) for r in rows]   # the same fields, in order
    for row, line in zip(rows, table):
        for key, value in row.items():
            if isinstance(value, float):
                assert float(line[key]) == value, key
            elif isinstance(value, list):
                assert line[key].split() == value, key
            elif value is None:
                assert line[key] == "", key
    markdown = compare(uri, *args, cwd=root).stdout.splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    assert header[5:9] == ["n", "seeds", "top-1 mean ± std", "top-1 min–max"]
    assert "Δ top-1 vs baseline [95% CI]" in header and header[-1] == "recipe / source"
    duo = next(r for r in rows if r["final"] and r["recipe"] == f"{DUO}-smoke")
    line = next(x for x in markdown if "finetune (decoupled)" in x)
    cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
    assert cells["top-1 mean ± std"] == f"{duo['top1_mean']:.2f} ± {duo['top1_std']:.2f}"
    assert cells["top-1 min–max"] == f"{duo['top1_min']:.2f}–{duo['top1_max']:.2f}"
    assert cells["seeds"] == "1 2" and cells["n"] == "2"
    if duo["ci_low"] is not None:
        assert cells["Δ top-1 vs baseline [95% CI]"] == \
            f"{duo['diff_top1']:+.2f} [{duo['ci_low']:+.2f}, {duo['ci_high']:+.2f}]"
    assert cells["test"].startswith("Welch t (n=2 vs 3, df ")
    assert cells["p"] == ("" if duo["p_value"] is None else f"{duo['p_value']:.3g}")
    base_line = next(x for x in markdown if "| bnn (bnn) |" in x)
    assert "| baseline |" in base_line
    # without --baseline, the markdown has no comparison columns (csv / json: empty fields)
    plain = compare(uri, *SEEDS, "--sweep", "s1", cwd=root).stdout.splitlines()[0]
    assert "baseline" not in plain and "| n | seeds |" in plain


@pytest.mark.slow
def test_sweep_option_is_the_sweep_filter(store, compare):
    root, uri = store
    by_option = compare(uri, *SEEDS, "--sweep", "s1", "--format", "json", cwd=root).stdout
    by_filter = compare(uri, *SEEDS, "--filter", "tags.sweep_id = 's1'", "--format", "json",
                        cwd=root).stdout
    assert by_option == by_filter
    only = json.loads(compare(uri, *SEEDS, "--sweep", "s2", "--format", "json", cwd=root).stdout)
    assert [(r["recipe"], r["seeds"]) for r in only] == [(f"{BNN}-smoke", ["2"])]
    # the plain per-run table takes the same filter (tags are on the parent runs)
    plain = json.loads(compare(uri, "--include-smoke", "--no-paper", "--filter",
                               "tags.sweep_id = 's1'", "--format", "json", cwd=root).stdout)
    assert len(plain) == 3 + 2 * 3   # 3 BNN runs x 1 row, 2 BinaryDuo runs x 3 rows


@pytest.mark.slow
def test_plot(store, run_binaryduo, tmp_path):
    _, uri = store
    out = tmp_path / "seeds.png"
    result = run_binaryduo("compare", "--tracking-uri", uri, *SEEDS[:2], "--baseline",
                           f"{BNN}-smoke", "--plot", out, cwd=tmp_path)
    assert f"{DUO}-smoke" in result.stdout and f"plot: {out}" in result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image
    with Image.open(out) as image:
        assert image.size[0] > image.size[1] > 300


# ------------------------------------------------------------------------------- (c) bad input

@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--baseline", f"{BNN}-smoke"], "--baseline compares groups of seeds: it needs --by-seed"),
    ([*SEEDS, "--baseline", "nope"], "--baseline 'nope': no finished runs of that recipe among"),
    ([*SEEDS, "--latest"], "--latest keeps one run per recipe"),
    ([*SEEDS, "--sweep", "s1' or tags.x = '1"], "--sweep \"s1' or tags.x = '1\": expected"),
    ([*SEEDS, "--baseline", f"{BNN}-smoke", "--sweep", "s2", "--filter", "tags.seed = '1'"],
     "(recipes: none)"),
])
def test_bad_input(store, compare, tmp_path, args, message):
    _, uri = store
    result = compare(uri, *args, "--plot", tmp_path / "p.png", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("binaryduo: error: "), lines
    assert message in lines[0]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []   # no plot
