"""One tidy metrics table from the evaluation jobs' `scores.json` files.

Every figure and table is drawn from this table, so it is the single place where benchmark
metric names are mapped to report names and where accuracies become percentages (the paper
reports accuracy in percent; ROUGE is already 0-100).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from d2lora.benchmarks import BENCHMARKS
from d2lora.io import DataFileError, atomic_path, read_json

COLUMNS = ["task", "method", "init", "n", "seed", "metric", "value"]
KEY = ["task", "method", "init", "n", "seed", "metric"]
BASE_METHOD = "none"

# benchmark -> {metric in scores.json: (name in the table, scale to the report's unit)}, from the catalog
BENCHMARK_METRICS: dict[str, dict[str, tuple[str, float]]] = {
    name: {m.score_key: (m.name, m.score_scale) for m in bench.metrics} for name, bench in BENCHMARKS.items()
}

# Raw ranges the evaluation promises; a value outside means a unit mix-up upstream, which
# would otherwise silently shift a whole curve by a factor of 100.
RAW_RANGE = {100.0: (0.0, 1.0), 1.0: (0.0, 100.0)}

# The paper's Table 1 says only "ROUGE", not which variant, so any ROUGE metric of ours is
# compared against it (the report says so).
REFERENCE_ALIASES = {"rouge1": ("rouge",), "rouge2": ("rouge",), "rougeL": ("rouge",)}

FLOAT_DECIMALS = 6


def _require(score: dict, keys: Sequence[str], path: Path) -> None:
    missing = [key for key in keys if key not in score]
    if missing:
        raise DataFileError(f"{path}: scores file lacks {', '.join(missing)}")


def _check_range(value: float, scale: float, name: str, path: Path) -> float:
    low, high = RAW_RANGE[scale]
    if not isinstance(value, (int, float)) or math.isnan(value) or not low <= value <= high:
        raise DataFileError(f"{path}: {name}={value!r} is outside [{low:g}, {high:g}]")
    return float(value) * scale


def score_rows(path: str | os.PathLike) -> list[dict]:
    """The tidy rows of one scores.json; extra metrics (e.g. stderr) are ignored."""
    path = Path(path)
    score = read_json(path)
    _require(score, ["task", "benchmark", "method", "init", "n", "seed", "metrics"], path)
    benchmark = score["benchmark"]
    if benchmark not in BENCHMARK_METRICS:
        raise DataFileError(f"{path}: unknown benchmark {benchmark!r} (known: {sorted(BENCHMARK_METRICS)})")
    rows = []
    for raw_name, (name, scale) in BENCHMARK_METRICS[benchmark].items():
        if raw_name not in score["metrics"]:
            raise DataFileError(f"{path}: benchmark {benchmark} lacks metric {raw_name!r}")
        value = _check_range(score["metrics"][raw_name], scale, raw_name, path)
        rows.append(
            {
                "task": score["task"],
                "method": score["method"],
                "init": score["init"],
                "n": int(score["n"]),
                "seed": int(score["seed"]),
                "metric": name,
                "value": value,
                "_source": str(path),
            }
        )
    return rows


def _raise_on_duplicates(df: pd.DataFrame) -> None:
    dup = df[df.duplicated(KEY, keep=False)]
    if dup.empty:
        return
    first = dup.iloc[0]
    clash = dup[(dup[KEY] == first[KEY]).all(axis=1)]
    cell = ", ".join(f"{k}={first[k]}" for k in KEY)
    raise ValueError(f"two score files describe the same cell ({cell}): {sorted(clash['_source'])}")


def sort_metrics(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEY, kind="mergesort").reset_index(drop=True)


def collect_metrics(score_paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Tidy table (task, method, init, n, seed, metric, value) over all score files."""
    rows = [row for path in score_paths for row in score_rows(path)]
    if not rows:
        return pd.DataFrame({col: pd.Series(dtype="float64" if col == "value" else "object") for col in COLUMNS})
    df = pd.DataFrame(rows)
    _raise_on_duplicates(df)
    df = df[COLUMNS].astype({"n": "int64", "seed": "int64", "value": "float64"})
    return sort_metrics(df)


def write_metrics(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """TSV whose bytes depend only on the values: rounded floats, fixed order, '\\n' endings."""
    out = sort_metrics(df[COLUMNS].copy())
    out["value"] = out["value"].map(lambda v: f"{round(float(v), FLOAT_DECIMALS):.{FLOAT_DECIMALS}f}")
    with atomic_path(path) as tmp:
        out.to_csv(tmp, sep="\t", index=False, lineterminator="\n")


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype={"task": str, "method": str, "init": str, "metric": str})
    missing = [col for col in COLUMNS if col not in df.columns]
    if missing:
        raise DataFileError(f"{path}: metrics table lacks columns {missing}")
    return df[COLUMNS].astype({"n": "int64", "seed": "int64", "value": "float64"})


def expand_base_rows(df: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Copy where every n=0 row (method 'none') appears once per method, as each curve's start.

    The base model is evaluated once and shared, so figures and tables need it under every
    method; the metrics table itself keeps it once, as measured.
    """
    base = df[df["method"] == BASE_METHOD]
    rest = df[df["method"] != BASE_METHOD]
    copies = [base.assign(method=method) for method in methods]
    return sort_metrics(pd.concat([rest, *copies], ignore_index=True))


def read_reference(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The paper's numbers (task, method, init, n, metric, value) from the reference CSVs."""
    frames = [pd.read_csv(path) for path in paths]
    if not frames:
        return pd.DataFrame(columns=["task", "method", "init", "n", "metric", "value"])
    return pd.concat(frames, ignore_index=True).astype({"n": "int64", "value": "float64"})


def reference_rows(reference_df: pd.DataFrame | None, task: str, metric: str) -> pd.DataFrame:
    """The paper's rows comparable to our (task, metric); empty when there are none."""
    if reference_df is None or reference_df.empty:
        return pd.DataFrame(columns=["task", "method", "init", "n", "metric", "value"])
    names = (metric, *REFERENCE_ALIASES.get(metric, ()))
    keep = (reference_df["task"] == task) & reference_df["metric"].isin(names)
    return reference_df[keep].reset_index(drop=True)


def spec_cells(metrics_df: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """Mean, min, max and seed count per (method, init, n) of one experiment's grid.

    Cells outside the spec's grid are dropped and cells never measured stay absent.
    """
    rows = metrics_df[(metrics_df["task"] == spec["task"]) & (metrics_df["metric"] == spec["metric"])]
    rows = expand_base_rows(rows, spec["methods"])
    rows = rows[rows["method"].isin(spec["methods"]) & rows["init"].isin(spec["inits"]) & rows["n"].isin(spec["n"])]
    grouped = rows.groupby(["method", "init", "n"], sort=True)["value"]
    return grouped.agg(mean="mean", low="min", high="max", seeds="count").reset_index()
