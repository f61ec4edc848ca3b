"""Confidence intervals and paired significance tests over evaluation examples.

Every number in the figures and tables is a mean over evaluation examples. Whether a 1-point
gain is more than noise depends on how many examples there are and how they vary. So this module
resamples the examples. Every function is pure and seeded: the same inputs and seed give the same
numbers, bit for bit.

Interval of one cell (`bootstrap_ci`, `interval_table`)
    Percentile bootstrap: B resamples of the examples with replacement (B = 10,000 by default),
    the mean of each, and the (1 - c)/2 and (1 + c)/2 quantiles of those means for confidence c.
    With several seeds, a cell's value for an example is the **mean over its seeds** (every seed
    is scored on the same examples). The point estimate, the mean over examples of those values,
    is then the mean over seeds of the per-seed means: the number in the metrics table. The
    interval covers example sampling with the seeds averaged first; it does not treat
    seed-to-seed training variance as a separate source of variance.

Paired comparison of variant B against variant A on the same examples
    * `mcnemar_test`: exact McNemar test, a two-sided binomial test (p = 1/2) on the discordant
      pairs (examples only A gets right, and examples only B gets right). It applies to 0/1
      accuracies. With several seeds the per-example values are means over seeds, no longer 0/1,
      so the significance table then reports only the bootstrap test.
    * `paired_bootstrap`: the per-example differences B - A are resampled (the same example
      indices for both arms). It returns the percentile CI of the mean difference and a two-sided
      p-value: the share of resampled mean differences, centred on the observed difference d,
      that lie at least |d| from it. It is computed as (1 + count) / (B + 1), so its smallest
      value is 1 / (B + 1). It works for accuracies and for ROUGE.
    * `holm`: Holm's step-down adjustment over one family of comparisons. The significance table
      uses one family per (task, metric), which is one of the paper's tables or figures.

Per-example values are read raw from predictions.jsonl (0/1 `correct` flags, ROUGE F-measures in
0..1). They are scaled to the report's units (percent, ROUGE x 100) only when written out.

The grid cells' per-example values are read by d2lora.results.per_example; the interval and
significance tables are built by d2lora.results.significance.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from d2lora.grid import DEFAULT_BOOTSTRAP_SAMPLES, DEFAULT_CONFIDENCE, DEFAULT_SEED

# Resampled indices are drawn in blocks of at most this many (rows x examples), so 10,000
# resamples of thousands of examples never hold one huge index matrix. The block size depends
# only on the number of examples, so the random stream and the results do not depend on it.
BLOCK_ELEMENTS = 2_000_000
# Absolute slack (in raw units, 0..1) when comparing a resampled difference with the observed
# one: a tie that differs only by rounding counts as "at least as extreme" (conservative).
TIE_TOLERANCE = 1e-12


class Interval(NamedTuple):
    mean: float
    low: float
    high: float


class McNemar(NamedTuple):
    only_a: int  # examples A gets right and B wrong
    only_b: int  # examples B gets right and A wrong
    p: float


class PairedBootstrap(NamedTuple):
    diff: float  # mean of B - A
    low: float
    high: float
    p: float


def _vector(values, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-example values, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: no examples")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def check_settings(samples: int, confidence: float) -> None:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"bootstrap samples must be a positive integer, got {samples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def bootstrap_means(values, samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Means of `samples` resamples (with replacement, same size) of `values`; seeded."""
    values = _vector(values)
    check_settings(samples, 0.5)
    size = values.size
    rng = np.random.default_rng(seed)
    means = np.empty(int(samples), dtype=float)
    rows = max(1, BLOCK_ELEMENTS // size)
    for start in range(0, int(samples), rows):
        stop = min(int(samples), start + rows)
        index = rng.integers(0, size, size=(stop - start, size))
        means[start:stop] = values[index].mean(axis=1)
    return means


def _quantiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - float(confidence)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(
    values, samples: int = DEFAULT_BOOTSTRAP_SAMPLES, confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED
) -> Interval:
    """Mean of `values` and its percentile-bootstrap confidence interval.

    `values` are per-example values. For a cell with several seeds, pass the per-example means
    over seeds (see `CellExamples.per_example`): the returned mean is then the mean over seeds of
    the seed means.
    """
    values = _vector(values)
    check_settings(samples, confidence)
    low, high = _quantiles(bootstrap_means(values, samples, seed), confidence)
    return Interval(float(values.mean()), low, high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    p = min(1, 2 P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2), computed exactly with integers.
    No discordant pairs give p = 1.
    """
    for count in (only_a, only_b):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"discordant counts must be non-negative integers, got {only_a!r}, {only_b!r}")
    total = int(only_a) + int(only_b)
    if total == 0:
        return 1.0
    smaller = min(int(only_a), int(only_b))
    tail = sum(math.comb(total, k) for k in range(smaller + 1))
    return min(1.0, 2 * tail / 2**total)


def mcnemar_test(a, b) -> McNemar:
    """Exact McNemar test of two aligned 0/1 vectors (arm A, arm B) on the same examples."""
    a, b = _pair(a, b)
    for name, values in (("A", a), ("B", b)):
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(
                f"McNemar needs 0/1 values per example; arm {name} has others (means over seeds? use paired_bootstrap)"
            )
    only_a = int(np.sum((a == 1.0) & (b == 0.0)))
    only_b = int(np.sum((a == 0.0) & (b == 1.0)))
    return McNemar(only_a, only_b, mcnemar_exact(only_a, only_b))


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _vector(a, "arm A"), _vector(b, "arm B")
    if a.size != b.size:
        raise ValueError(
            f"paired arms differ in length ({a.size} vs {b.size} examples): "
            "a paired test needs the same examples in both"
        )
    return a, b


def paired_bootstrap(
    a, b, samples: int = DEFAULT_BOOTSTRAP_SAMPLES, confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED
) -> PairedBootstrap:
    """Paired bootstrap of mean(B) - mean(A) over aligned examples: CI and two-sided p-value.

    The p-value is null-centred: p = (1 + #{|d*_i - d| >= |d|}) / (B + 1), where d is the observed
    mean difference and d*_i is the mean difference of resample i. Identical arms give d = 0 and
    p = 1. The smallest possible p is 1 / (samples + 1).
    """
    a, b = _pair(a, b)
    check_settings(samples, confidence)
    differences = b - a
    observed = float(differences.mean())
    means = bootstrap_means(differences, samples, seed)
    low, high = _quantiles(means, confidence)
    extreme = int(np.sum(np.abs(means - observed) >= abs(observed) - TIE_TOLERANCE))
    return PairedBootstrap(observed, low, high, (1 + extreme) / (int(samples) + 1))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError("holm: expected a 1-D sequence of p-values")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p.tolist()}")
    count = p.size
    adjusted = np.empty(count, dtype=float)
    running = 0.0
    for rank, index in enumerate(np.argsort(p, kind="mergesort")):
        running = max(running, min(1.0, (count - rank) * p[index]))
        adjusted[index] = running
    return adjusted
