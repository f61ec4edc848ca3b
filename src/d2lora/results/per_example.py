"""Per-example values of grid cells, read from their predictions.jsonl (the inputs of
d2lora.results.statistics' resampling)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from d2lora.benchmarks import METRICS
from d2lora.io import DataFileError, read_jsonl


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
