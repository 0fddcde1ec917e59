"""Statistics over seeds: pure functions on lists of floats (no MLflow), for ``compare --by-seed``.

A recipe run at one seed is one draw of the recipe's result; the seeds of a recipe are a sample.

- :func:`summarize`: n, mean, the *sample* standard deviation (divisor n - 1: the spread of the
  recipe's result, estimated from the sample; undefined for n = 1), min and max.
- :func:`compare_samples`: the difference of means ``other - baseline`` with a two-sided t
  confidence interval and the t test's two-sided p-value for "no difference":

  * **paired** (both groups ran the same seeds, n >= 2): the per-seed differences
    d_i = other_i - baseline_i are the sample; mean d, s_d their sample standard deviation,
    SE = s_d / sqrt(n), df = n - 1. Seed i fixes the data order and initialisation of both
    runs, so pairing removes the part of the spread the two recipes share.
  * **Welch** (different seed sets, both n >= 2): SE = sqrt(s1^2/n1 + s2^2/n2), degrees of
    freedom by Welch-Satterthwaite, df = SE^4 / ((s1^2/n1)^2/(n1-1) + (s2^2/n2)^2/(n2-1));
    no assumption that the two spreads are equal.
  * **n<2** (either group has one value; or a paired set of one): no interval, no p-value.

  CI = diff +- t_{(1+confidence)/2, df} * SE; t = diff / SE; p = 2 * P(T_df > |t|) (scipy's
  Student t distribution). A zero standard error (every difference, or every value, equal) has
  no spread to test against: the interval is the point itself, t is +-inf with p = 0 when the
  difference is not 0, and t = 0 with p = 1 when it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PAIRED, WELCH, TOO_FEW = "paired t", "Welch t", "n<2"


@dataclass(frozen=True)
class Summary:
    """What the seeds of one group scored on one metric."""
    n: int
    mean: float | None
    std: float | None     # sample standard deviation (n - 1); None for n < 2
    min: float | None
    max: float | None


def summarize(values: list[float]) -> Summary:
    """n, mean, sample standard deviation (n - 1), min and max of ``values`` (None: left out)."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
    return Summary(n, mean, std, min(values), max(values))


@dataclass(frozen=True)
class Difference:
    """``other - baseline`` of the group means, with its interval and test."""
    test: str                   # PAIRED, WELCH or TOO_FEW
    n_other: int
    n_baseline: int
    diff: float | None          # mean(other) - mean(baseline) (paired: the mean difference)
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float = 0.95
    se: float | None = None     # standard error of diff
    df: float | None = None     # degrees of freedom (Welch: not an integer in general)
    t: float | None = None
    p_value: float | None = None  # two-sided


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t as student_t
    return float(student_t.ppf(probability, df))


def two_sided_p(t: float, df: float) -> float:
    """P(|T_df| >= |t|)."""
    from scipy.stats import t as student_t
    return float(min(1.0, 2 * student_t.sf(abs(t), df)))


def _interval(kind: str, n_other: int, n_baseline: int, diff: float, se: float, df: float,
              confidence: float) -> Difference:
    if se == 0:
        t, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
        return Difference(kind, n_other, n_baseline, diff, diff, diff, confidence, se, df, t, p)
    half = t_quantile((1 + confidence) / 2, df) * se
    t = diff / se
    return Difference(kind, n_other, n_baseline, diff, diff - half, diff + half, confidence, se,
                      df, t, two_sided_p(t, df))


def paired_difference(other: list[float], baseline: list[float], *,
                      confidence: float = 0.95) -> Difference:
    """Paired t interval on ``other[i] - baseline[i]`` (same seed at index i), n >= 2."""
    if len(other) != len(baseline):
        raise ValueError(f"paired samples differ in length ({len(other)} vs {len(baseline)})")
    n = len(other)
    differences = summarize([a - b for a, b in zip(other, baseline)])
    if n < 2:
        return Difference(TOO_FEW, n, n, differences.mean, confidence=confidence)
    return _interval(PAIRED, n, n, differences.mean, differences.std / math.sqrt(n), n - 1,
                     confidence)


def welch_difference(other: list[float], baseline: list[float], *,
                     confidence: float = 0.95) -> Difference:
    """Welch's t interval on mean(other) - mean(baseline), both n >= 2."""
    a, b = summarize(other), summarize(baseline)
    diff = a.mean - b.mean if a.n and b.n else None
    if a.n < 2 or b.n < 2:
        return Difference(TOO_FEW, a.n, b.n, diff, confidence=confidence)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1)) if se > 0 \
        else a.n + b.n - 2.0   # no spread at all: df plays no part (see _interval)
    return _interval(WELCH, a.n, b.n, diff, se, df, confidence)


def compare_samples(other: dict[str, float], baseline: dict[str, float], *,
                    confidence: float = 0.95) -> Difference:
    """``other - baseline`` of two groups given as ``{seed: value}``: paired by seed when both
    hold the same seeds (n >= 2), else Welch; "n<2" (difference of means only) when either
    group has a single value."""
    if set(other) == set(baseline) and len(other) >= 2:
        seeds = sorted(other)
        return paired_difference([other[s] for s in seeds], [baseline[s] for s in seeds],
                                 confidence=confidence)
    return welch_difference(list(other.values()), list(baseline.values()),
                            confidence=confidence)
