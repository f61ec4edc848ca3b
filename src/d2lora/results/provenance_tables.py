"""The report's runtime and dataset-checksum tables, read from files the workflow already wrote
(Snakemake benchmark TSVs, the data stage's manifests), so these rules never rerun or re-hash
anything expensive."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from d2lora.io import canonical_json, read_json

BENCHMARK_DIR = "benchmarks"


def benchmark_cell(path: str | os.PathLike) -> tuple[str, str]:
    """(rule, wildcards) from results/benchmarks/<rule>/<wildcards...>.tsv.

    A rule without wildcards may write results/benchmarks/<rule>.tsv; its cell is ''.
    """
    parts = Path(path).with_suffix("").parts
    if BENCHMARK_DIR not in parts[:-1]:
        raise ValueError(f"{path}: expected a path like .../{BENCHMARK_DIR}/<rule>/<cell>.tsv")
    start = len(parts) - 1 - parts[::-1].index(BENCHMARK_DIR)
    return parts[start + 1], "/".join(parts[start + 2 :])


def read_benchmark(path: str | os.PathLike) -> pd.DataFrame:
    """One Snakemake benchmark file (one row per repeat); 'NA' and '-' mean not measured."""
    rule, cell = benchmark_cell(path)
    table = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    table.insert(0, "cell", cell)
    table.insert(0, "rule", rule)
    return table


def runtime_table(benchmark_tsv_paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All benchmark files as one table with rule and cell columns, sorted by rule then cell."""
    frames = [read_benchmark(path) for path in benchmark_tsv_paths]
    if not frames:
        return pd.DataFrame(columns=["rule", "cell", "s", "h:m:s", "max_rss"])
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["rule", "cell"], kind="mergesort").reset_index(drop=True)


def row_count(rows: dict, filename: str):
    """Rows of a prepared file; manifests key counts by split ('train') or by file name."""
    for key in (filename, Path(filename).stem):
        if key in rows:
            return rows[key]
    return None


def source_records(manifest: dict) -> list[tuple[str, dict]]:
    """(split, record) per source; manifests keep sources per split or as a plain list."""
    sources = manifest.get("sources", [])
    if isinstance(sources, dict):
        return sorted(sources.items())
    return [(source.get("split", ""), source) for source in sources]


def source_rows(role: str, split: str, record: dict) -> list[dict]:
    """One row per raw file; a generated source is identified by its generator code's hash."""
    base = {
        "role": role,
        "stage": "source",
        "split": split,
        "config": canonical_json(record.get("config")),
        "rows": record.get("rows"),
    }
    rows = [{**base, "file": entry["path"], "sha256": entry["sha256"]} for entry in record.get("files", [])]
    generator = record.get("generator")
    if generator:
        rows.append({**base, "file": f"generator:{generator.get('function')}", "sha256": generator.get("code_sha256")})
    return rows


def manifest_rows(path: str | os.PathLike) -> list[dict]:
    manifest = read_json(path)
    role = manifest.get("role", Path(path).parent.name)
    rows = [row for split, record in source_records(manifest) for row in source_rows(role, split, record)]
    prepared = manifest.get("files") or manifest.get("prepared") or {}
    counts = manifest.get("counts") or manifest.get("rows") or {}
    rows += [
        {
            "role": role,
            "stage": "prepared",
            "split": Path(name).stem,
            "config": "",
            "file": name,
            "sha256": sha,
            "rows": row_count(counts, name),
        }
        for name, sha in sorted(prepared.items())
    ]
    return rows


def dataset_checksum_table(manifest_paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """sha256 of every raw source file (or generator) and every prepared file, per data role."""
    rows = [row for path in manifest_paths for row in manifest_rows(path)]
    columns = ["role", "stage", "split", "file", "sha256", "rows", "config"]
    table = pd.DataFrame(rows, columns=columns).astype({"rows": "Int64"})
    return table.sort_values(["role", "stage", "split", "file"], kind="mergesort").reset_index(drop=True)
