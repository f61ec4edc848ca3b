"""The interval table (one bootstrap CI per cell and metric) and the significance table (paired
tests with Holm's adjustment), as the workflow writes and the figures read them
(d2lora.results.statistics: the methods)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import pandas as pd

from d2lora.grid import DEFAULT_BOOTSTRAP_SAMPLES, DEFAULT_CONFIDENCE, DEFAULT_SEED
from d2lora.io import DataFileError, atomic_path
from d2lora.results.labels import init_label
from d2lora.results.per_example import EXAMPLE_METRICS, CellExamples, CellKey, paired_values
from d2lora.results.statistics import bootstrap_ci, check_settings, holm, mcnemar_test, paired_bootstrap
from d2lora.results.tables import write_table

FLOAT_DECIMALS = 6
METHOD_ORDER = ("none", "sft", "dpo", "orpo")
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
    check_settings(samples, confidence)
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


# Means and differences at the tables' 2 decimals, p-values at 3 significant digits.
SIGNIFICANCE_FORMATS = {c: _p_format for c in ("p_mcnemar", "p_bootstrap", "p_holm")}


def write_significance(table: "pd.DataFrame", csv_path: str | os.PathLike, md_path: str | os.PathLike) -> None:
    """CSV and Markdown of the significance table (SIGNIFICANCE_FORMATS)."""
    write_table(table, csv_path, md_path, formats=SIGNIFICANCE_FORMATS)


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
