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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from d2lora.benchmarks import METRICS
from d2lora.grid import DEFAULT_BOOTSTRAP_SAMPLES, DEFAULT_CONFIDENCE, DEFAULT_SEED
from d2lora.io import DataFileError, atomic_path, read_jsonl
from d2lora.results.labels import init_label
from d2lora.results.tables import write_table

if TYPE_CHECKING:
    import pandas as pd

# Resampled indices are drawn in blocks of at most this many (rows x examples), so 10,000
# resamples of thousands of examples never hold one huge index matrix. The block size depends
# only on the number of examples, so the random stream and the results do not depend on it.
BLOCK_ELEMENTS = 2_000_000
# Absolute slack (in raw units, 0..1) when comparing a resampled difference with the observed
# one: a tie that differs only by rounding counts as "at least as extreme" (conservative).
TIE_TOLERANCE = 1e-12
FLOAT_DECIMALS = 6
METHOD_ORDER = ("none", "sft", "dpo", "orpo")


@dataclass(frozen=True)
class ExampleMetric:
    """Where one metric of the metrics table comes from in predictions.jsonl."""

    benchmark: str
    field: str  # per-example field of predictions.jsonl
    scale: float  # raw per-example value -> the metrics table's unit
    binary: bool  # 0/1 per example (McNemar applies)


# metric (the metrics table's name, d2lora.results.metrics.BENCHMARK_METRICS) -> per-example source
EXAMPLE_METRICS: dict[str, ExampleMetric] = {
    name: ExampleMetric(bench.name, m.example_field, m.example_scale, m.binary) for name, (bench, m) in METRICS.items()
}

INTERVAL_COLUMNS = [
    "task",
    "benchmark",
    "metric",
    "method",
    "init",
    "n",
    "seeds",
    "examples",
    "mean",
    "ci_low",
    "ci_high",
]
SIGNIFICANCE_COLUMNS = [
    "task",
    "metric",
    "method",
    "n",
    "a",
    "b",
    "comparison",
    "examples",
    "seeds_a",
    "seeds_b",
    "mean_a",
    "mean_b",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "only_a",
    "only_b",
    "p_mcnemar",
    "p_bootstrap",
    "test",
    "p_holm",
    "significant",
]


# --------------------------------------------------------------------------------------------
# Core statistics on arrays
# --------------------------------------------------------------------------------------------


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


def _check_settings(samples: int, confidence: float) -> None:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"bootstrap samples must be a positive integer, got {samples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def bootstrap_means(values, samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Means of `samples` resamples (with replacement, same size) of `values`; seeded."""
    values = _vector(values)
    _check_settings(samples, 0.5)
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
    _check_settings(samples, confidence)
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
    _check_settings(samples, confidence)
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


# --------------------------------------------------------------------------------------------
# Per-example values of grid cells
# --------------------------------------------------------------------------------------------


class CellKey(NamedTuple):
    task: str
    benchmark: str
    metric: str
    method: str
    init: str
    n: int

    def describe(self) -> str:
        return f"{self.benchmark}/{self.task}/{self.method}/{self.init}/n{self.n} ({self.metric})"


@dataclass(frozen=True)
class CellExamples:
    """Raw per-example values of one cell: one row per seed, one column per example id."""

    ids: tuple[str, ...]
    seeds: tuple[int, ...]
    values: np.ndarray  # shape (len(seeds), len(ids))

    @property
    def per_example(self) -> np.ndarray:
        """The cell's value per example: the mean over its seeds."""
        return self.values.mean(axis=0)


def _difference(left: Iterable[str], right: Iterable[str], left_name: str, right_name: str) -> str:
    left, right = set(left), set(right)
    only_left, only_right = sorted(left - right), sorted(right - left)
    return (
        f"{len(only_left)} example id(s) only in {left_name} (e.g. {only_left[:3]}), "
        f"{len(only_right)} only in {right_name} (e.g. {only_right[:3]})"
    )


def cell_examples(per_seed: Mapping[int, Mapping[str, float]], name: str = "cell") -> CellExamples:
    """Stack one cell's seeds ({seed: {example id: value}}); every seed must hold the same ids."""
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError(f"{name}: no seeds")
    ids = sorted(per_seed[seeds[0]])
    if not ids:
        raise ValueError(f"{name}: seed {seeds[0]} has no examples")
    for seed in seeds[1:]:
        if set(per_seed[seed]) != set(ids):
            raise ValueError(
                f"{name}: misaligned example ids between seeds {seeds[0]} and {seed}: "
                + _difference(ids, per_seed[seed], f"seed {seeds[0]}", f"seed {seed}")
            )
    values = np.array([[float(per_seed[seed][i]) for i in ids] for seed in seeds], dtype=float)
    return CellExamples(tuple(ids), tuple(seeds), values)


def paired_values(
    ids_a: Sequence[str], values_a, ids_b: Sequence[str], values_b, name_a: str = "A", name_b: str = "B"
) -> tuple[np.ndarray, np.ndarray]:
    """Align arm B to arm A's example order by id; both must hold the same ids, each once."""
    values_a, values_b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    for name, ids, values in ((name_a, ids_a, values_a), (name_b, ids_b, values_b)):
        if len(ids) != len(values):
            raise ValueError(f"{name}: {len(ids)} example ids but {len(values)} values")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: duplicate example ids")
    if set(ids_a) != set(ids_b):
        raise ValueError(
            "misaligned example ids: a paired test needs the same examples in both arms; "
            + _difference(ids_a, ids_b, name_a, name_b)
        )
    position = {example: index for index, example in enumerate(ids_b)}
    return values_a, values_b[[position[example] for example in ids_a]]


def read_predictions(path: str | os.PathLike, fields: Sequence[str]) -> dict[str, dict[str, float]]:
    """{field: {example id: value}} from one predictions.jsonl; booleans become 0/1."""
    rows = read_jsonl(path)
    if not rows:
        raise DataFileError(f"{path}: no per-example rows")
    out: dict[str, dict[str, float]] = {field: {} for field in fields}
    for line, row in enumerate(rows, start=1):
        if "id" not in row:
            raise DataFileError(f"{path}: row {line} has no 'id'")
        example = str(row["id"])
        for field in fields:
            value = row.get(field)
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataFileError(f"{path}: row {line} (id {example}) has no numeric '{field}' (got {value!r})")
            if example in out[field]:
                raise DataFileError(f"{path}: example id {example!r} appears twice")
            out[field][example] = float(value)
    return out


def metrics_of_benchmark(benchmark: str) -> dict[str, ExampleMetric]:
    found = {metric: info for metric, info in EXAMPLE_METRICS.items() if info.benchmark == benchmark}
    if not found:
        raise DataFileError(
            f"unknown benchmark {benchmark!r} (known: {sorted({m.benchmark for m in EXAMPLE_METRICS.values()})})"
        )
    return found


def load_examples(cells: Sequence[Mapping], paths: Sequence[str | os.PathLike]) -> dict[CellKey, CellExamples]:
    """Per-example values of every evaluated cell and metric, seeds stacked.

    `cells[i]` (benchmark, task, method, init, n, seed) describes the evaluation whose
    predictions.jsonl is `paths[i]`.
    """
    if len(cells) != len(paths):
        raise ValueError(f"{len(cells)} cells but {len(paths)} predictions files")
    per_key: dict[CellKey, dict[int, dict[str, float]]] = {}
    for cell, path in zip(cells, paths):
        metrics = metrics_of_benchmark(cell["benchmark"])
        values = read_predictions(path, sorted({info.field for info in metrics.values()}))
        for metric, info in metrics.items():
            key = CellKey(cell["task"], cell["benchmark"], metric, cell["method"], cell["init"], int(cell["n"]))
            seeds = per_key.setdefault(key, {})
            if int(cell["seed"]) in seeds:
                raise DataFileError(f"{path}: cell {key.describe()} seed {cell['seed']} is given twice")
            seeds[int(cell["seed"])] = values[info.field]
    return {key: cell_examples(per_seed, key.describe()) for key, per_seed in sorted(per_key.items())}


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def interval_table(
    examples: Mapping[CellKey, CellExamples],
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> "pd.DataFrame":
    """One row per (task, benchmark, metric, method, init, n): seeds, examples, mean and CI, in
    the metrics table's units. The mean is the mean over seeds of the seed means."""

    rows = []
    for key in sorted(examples):
        cell = examples[key]
        scale = EXAMPLE_METRICS[key.metric].scale
        interval = bootstrap_ci(cell.per_example, samples, confidence, seed)
        rows.append(
            {
                **key._asdict(),
                "seeds": len(cell.seeds),
                "examples": len(cell.ids),
                "mean": interval.mean * scale,
                "ci_low": interval.low * scale,
                "ci_high": interval.high * scale,
            }
        )
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)


def write_intervals(table: "pd.DataFrame", path: str | os.PathLike) -> None:
    """TSV whose bytes depend only on the values (rounded floats, sorted rows, '\\n' endings)."""
    out = table[INTERVAL_COLUMNS].sort_values(INTERVAL_COLUMNS[:6], kind="mergesort")
    out = out.astype({"mean": object, "ci_low": object, "ci_high": object})
    for column in ("mean", "ci_low", "ci_high"):
        out[column] = out[column].map(lambda v: f"{round(float(v), FLOAT_DECIMALS):.{FLOAT_DECIMALS}f}")
    with atomic_path(path) as tmp:
        out.to_csv(tmp, sep="\t", index=False, lineterminator="\n")


def read_intervals(path: str | os.PathLike) -> "pd.DataFrame":
    table = pd.read_csv(path, sep="\t", dtype={c: str for c in ("task", "benchmark", "metric", "method", "init")})
    missing = [column for column in INTERVAL_COLUMNS if column not in table.columns]
    if missing:
        raise DataFileError(f"{path}: intervals table lacks columns {missing}")
    return table[INTERVAL_COLUMNS].astype(
        {
            "n": "int64",
            "seeds": "int64",
            "examples": "int64",
            "mean": "float64",
            "ci_low": "float64",
            "ci_high": "float64",
        }
    )


def check_against_metrics(intervals: "pd.DataFrame", metrics: "pd.DataFrame", tolerance: float = 1e-4) -> None:
    """Every interval's mean must equal the metrics table's mean over seeds of the same cell.

    The two come from different files of one evaluation (predictions.jsonl, scores.json); a
    mismatch means stale or mixed-up per-example outputs. Raises DataFileError listing them.
    """
    key = ["task", "metric", "method", "init", "n"]
    scores = metrics[metrics["metric"].isin(EXAMPLE_METRICS)].groupby(key, as_index=False)["value"].mean()
    joined = intervals.merge(scores, on=key, how="left")
    missing = joined[joined["value"].isna()]
    wrong = joined[(joined["value"] - joined["mean"]).abs() > tolerance]
    problems = [
        f"{r.task}/{r.method}/{r.init}/n{r.n} {r.metric}: not in the metrics table" for r in missing.itertuples()
    ]
    problems += [
        f"{r.task}/{r.method}/{r.init}/n{r.n} {r.metric}: per-example mean {r.mean:.6f} != scores {r.value:.6f}"
        for r in wrong.itertuples()
    ]
    if problems:
        raise DataFileError(
            "predictions.jsonl and scores.json disagree: "
            + "; ".join(problems[:10])
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        )


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def significance_table(
    examples: Mapping[CellKey, CellExamples],
    targets: Sequence[tuple[str, str]],
    comparisons: Sequence[Sequence[str]],
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    labels: Mapping[str, str] | None = None,
) -> "pd.DataFrame":
    """B against A for every comparison (A, B), target (task, metric) and (method, n) where both
    were evaluated: means, difference B - A with its CI, McNemar and paired-bootstrap p-values,
    Holm-adjusted p within each (task, metric) family and `significant` at alpha = 1 - confidence.

    The Holm adjustment uses McNemar's p where it applies (0/1 accuracies, one seed per arm) and
    the paired bootstrap's otherwise; the `test` column says which. The difference CI is not
    adjusted.
    """

    _check_settings(samples, confidence)
    rows = []
    for task, metric in dict.fromkeys((t, m) for t, m in targets):
        info = EXAMPLE_METRICS[metric]
        family = []
        for a, b in comparisons:
            arms = {}
            for key, cell in examples.items():
                if (key.task, key.metric) == (task, metric) and key.init in (a, b):
                    arms.setdefault((key.method, key.n), {})[key.init] = (key, cell)
            for method, n in sorted(arms, key=lambda mn: (_method_rank(mn[0]), mn[1])):
                pair = arms[(method, n)]
                if a not in pair or b not in pair:
                    continue
                (key_a, cell_a), (key_b, cell_b) = pair[a], pair[b]
                values_a, values_b = paired_values(
                    cell_a.ids, cell_a.per_example, cell_b.ids, cell_b.per_example, key_a.describe(), key_b.describe()
                )
                boot = paired_bootstrap(values_a, values_b, samples, confidence, seed)
                exact = None
                if info.binary and len(cell_a.seeds) == 1 and len(cell_b.seeds) == 1:
                    exact = mcnemar_test(values_a, values_b)
                family.append(
                    {
                        "task": task,
                        "metric": metric,
                        "method": method,
                        "n": n,
                        "a": a,
                        "b": b,
                        "comparison": f"{init_label(b, labels)} vs {init_label(a, labels)}",
                        "examples": len(values_a),
                        "seeds_a": len(cell_a.seeds),
                        "seeds_b": len(cell_b.seeds),
                        "mean_a": float(values_a.mean()) * info.scale,
                        "mean_b": float(values_b.mean()) * info.scale,
                        "diff": boot.diff * info.scale,
                        "diff_ci_low": boot.low * info.scale,
                        "diff_ci_high": boot.high * info.scale,
                        "only_a": exact.only_a if exact else None,
                        "only_b": exact.only_b if exact else None,
                        "p_mcnemar": exact.p if exact else None,
                        "p_bootstrap": boot.p,
                        "test": "mcnemar" if exact else "bootstrap",
                    }
                )
        if family:
            primary = [row["p_mcnemar"] if row["test"] == "mcnemar" else row["p_bootstrap"] for row in family]
            for row, adjusted in zip(family, holm(primary)):
                row["p_holm"] = float(adjusted)
                row["significant"] = "yes" if adjusted < 1.0 - float(confidence) else "no"
        rows.extend(family)
    table = pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)
    return table.astype(
        {
            "n": "int64",
            "examples": "int64",
            "seeds_a": "int64",
            "seeds_b": "int64",
            "only_a": "Int64",
            "only_b": "Int64",
            "p_mcnemar": "float64",
        }
    )


def _p_format(value) -> str:
    return f"{float(value):.3g}"


def write_significance(table: "pd.DataFrame", csv_path: str | os.PathLike, md_path: str | os.PathLike) -> None:
    """CSV and Markdown: means and differences at 2 decimals, p-values at 3 significant digits."""

    write_table(table, csv_path, md_path, formats={c: _p_format for c in ("p_mcnemar", "p_bootstrap", "p_holm")})


def spec_intervals(intervals: "pd.DataFrame", spec: Mapping) -> "pd.DataFrame":
    """The intervals of one experiment's grid, as (method, init, n, ci_low, ci_high).

    The n = 0 row (method 'none') is copied under each of the spec's methods, like the metrics
    (d2lora.results.metrics.expand_base_rows).
    """

    rows = intervals[(intervals["task"] == spec["task"]) & (intervals["metric"] == spec["metric"])]
    base = rows[rows["method"] == "none"]
    rows = pd.concat([rows[rows["method"] != "none"], *[base.assign(method=m) for m in spec["methods"]]])
    rows = rows[rows["method"].isin(spec["methods"]) & rows["init"].isin(spec["inits"]) & rows["n"].isin(spec["n"])]
    return rows[["method", "init", "n", "ci_low", "ci_high"]].reset_index(drop=True)
