"""Loading raw rows from a source config (mapping them to the canonical forms: d2lora.data.formats).

A source config is one of
  {"source": "synthetic", "kind": ..., "rows": int, "split": "train"|"eval"}
  {"source": "hub", "path": "openai/gsm8k", "name": "main", "split": "test", "revision": ..., "format": ...}
  {"source": "local", "data_files": path or [paths], "file_format": ..., "format": ...}
each with an optional "skip" (drop the first k rows) and "limit" (then keep the first k rows),
both applied before mapping: `skip` + `limit` carve a held-out set and a disjoint training set out of
a source that has one split only (the economics titles). A fourth kind, "onpolicy", never reaches
this module: the workflow turns it into a local source over the file its `sample_negatives` rule
writes (see d2lora.data.onpolicy).

A format names the raw schema of a source (d2lora.data.formats maps its rows).
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any

from d2lora.data import synthetic
from d2lora.data.formats import FORMATS
from d2lora.io import DataFileError, read_jsonl

SOURCE_KINDS = ("synthetic", "hub", "local", "onpolicy")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# jsonl and json both go through datasets' "json" builder.
_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
# What each synthetic kind imitates, so a synthetic source needs no explicit "format".
SYNTHETIC_FORMATS = {
    "math": "synthetic_math",
    "arithmetic": "synthetic_math",
    "titles": "synthetic_titles",
    "general": "synthetic_general",
    "science_mc": "arc",
}


# ----------------------------------------------------------------------------- loading


def _require(cfg: dict, key: str) -> Any:
    if key not in cfg:
        raise ValueError(f"source config {cfg!r} needs the key '{key}'")
    return cfg[key]


def local_files(cfg: dict) -> list[Path]:
    """The files of a local source, each checked to exist and hold data."""
    given = _require(cfg, "data_files")
    files = [Path(given)] if isinstance(given, (str, os.PathLike)) else [Path(f) for f in given]
    if not files:
        raise ValueError(f"source config {cfg!r}: 'data_files' is empty")
    for path in files:
        if not path.is_file():
            raise DataFileError(f"{path}: file does not exist")
        if path.stat().st_size == 0:
            raise DataFileError(f"{path}: file is empty")
    return files


def _file_format(cfg: dict, files: list[Path]) -> str:
    if cfg.get("file_format"):
        fmt = cfg["file_format"]
        if fmt not in _BUILDERS:
            raise ValueError(f"unknown file_format {fmt!r}; known: {', '.join(sorted(_BUILDERS))}")
        return fmt
    formats = {FILE_FORMATS.get(path.suffix.lower()) for path in files}
    if None in formats or len(formats) != 1:
        raise ValueError(
            f"cannot tell the file format of {[str(f) for f in files]} from the extensions; "
            f"set 'file_format' to one of {', '.join(sorted(_BUILDERS))}"
        )
    return formats.pop()


def _load_local(cfg: dict) -> tuple[list[dict], list[str]]:
    files = local_files(cfg)
    fmt = _file_format(cfg, files)
    if fmt == "jsonl":
        # read_jsonl names file:line on a malformed line, and keeps a row's absent keys absent;
        # datasets' json builder would fill them with None and hide the gap.
        rows = [row for path in files for row in read_jsonl(path)]
    else:
        rows = _load_with_datasets(_BUILDERS[fmt], files, fmt)
    if not rows:
        raise DataFileError(f"{', '.join(map(str, files))}: no rows")
    return rows, [str(path) for path in files]


def _load_with_datasets(builder: str, files: list[Path], fmt: str) -> list[dict]:
    # datasets: kept out of workflow parsing (the rules import this module)
    import datasets

    try:
        dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as err:  # datasets raises many unrelated types; the file name is what helps
        raise DataFileError(f"{', '.join(map(str, files))}: cannot be read as {fmt}: {err}") from err
    return dataset.to_list()


def _load_hub(cfg: dict) -> tuple[list[dict], list[str]]:
    # datasets: kept out of workflow parsing (the rules import this module)
    import datasets

    kwargs = {"split": _require(cfg, "split")}
    if cfg.get("revision"):
        kwargs["revision"] = cfg["revision"]
    dataset = datasets.load_dataset(_require(cfg, "path"), cfg.get("name"), **kwargs)
    cached = [entry["filename"] for entry in getattr(dataset, "cache_files", None) or []]
    return dataset.to_list(), cached


def _load_synthetic(cfg: dict, seed: int) -> tuple[list[dict], list[str]]:
    rows = synthetic.generate(_require(cfg, "kind"), _require(cfg, "rows"), seed, _require(cfg, "split"))
    return rows, []


def load_raw(source_cfg: dict, seed: int) -> tuple[list[dict], list[str]]:
    """Raw rows of a source and the files actually read (empty for synthetic sources)."""
    kind = _require(source_cfg, "source")
    if kind == "synthetic":
        rows, files = _load_synthetic(source_cfg, seed)
    elif kind == "hub":
        rows, files = _load_hub(source_cfg)
    elif kind == "local":
        rows, files = _load_local(source_cfg)
    elif kind == "onpolicy":
        raise ValueError(
            "an 'onpolicy' source is sampled by the workflow's sample_negatives rule and then read as a local "
            "file (d2lora.data.onpolicy); it cannot be loaded directly"
        )
    else:
        raise ValueError(f"unknown source {kind!r}; known sources: {', '.join(SOURCE_KINDS)}")
    return apply_skip_limit(apply_shuffle(rows, source_cfg, seed), source_cfg), files


def apply_shuffle(rows: list[dict], source_cfg: dict, seed: int) -> list[dict]:
    """With `shuffle: true`, the source's rows in one order drawn from the seed, before skip and limit.

    A file sorted by date or id would otherwise hand its oldest rows to the held-out `limit` head.
    Rows without an id of their own first get one from their position in the file, so an id
    still points at the file's row, and the train and held-out parts of one source stay disjoint.
    """
    if not source_cfg.get("shuffle"):
        return rows
    rows = with_position_ids(rows, source_name(source_cfg))
    random.Random(f"source-order-{seed}").shuffle(rows)
    return rows


def with_position_ids(rows: list[dict], name: str, start: int = 0) -> list[dict]:
    """Rows without an id of their own get `<name>-<position in the source>`, counting from `start`."""
    return [
        row if not isinstance(row, dict) or row.get("id") is not None else {"id": f"{name}-{index:06d}", **row}
        for index, row in enumerate(rows, start=start)
    ]


def _count_arg(source_cfg: dict, key: str) -> int | None:
    value = source_cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"source '{key}' must be a non-negative int, got {value!r}")
    return value


def apply_skip_limit(rows: list[dict], source_cfg: dict) -> list[dict]:
    """Drop the first `skip` rows, then keep the first `limit`.

    Rows without an id of their own get one from their position in the WHOLE source, so the
    ids of a skipped-into training set and of the held-out head never collide or shift.
    """
    skip, limit = _count_arg(source_cfg, "skip"), _count_arg(source_cfg, "limit")
    if skip:
        # Shuffled rows already carry their file position (apply_shuffle) and keep it.
        rows = with_position_ids(rows[skip:], source_name(source_cfg), start=skip)
    if limit is not None:
        rows = rows[:limit]
    return rows


def _count_file_rows(path: Path, fmt: str) -> int | None:
    """Rows in one local file, read as cheaply as the format allows; None where that needs a full parse."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    if fmt == "parquet":
        # pyarrow: kept out of workflow parsing (the rules import this module)
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)  # minus the header
    if fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None  # maybe JSON lines under a .json name; preparation reads it properly
        return len(data) if isinstance(data, list) else None
    return None


def available_rows(source_cfg: dict) -> int | None:
    """How many rows a source yields (after skip and limit), where that is knowable without loading it.

    synthetic: its `rows`. local: the files' rows, counted now (so an n larger than the data fails
    at config time). hub and onpolicy: unknown offline (None) unless `limit` bounds it; asking for more
    rows than they hold fails when the data are prepared. Rows that the mapping would reject still
    count here: preparation stops at them with the file and row.
    """
    kind = source_cfg.get("source")
    skip, limit = source_cfg.get("skip") or 0, source_cfg.get("limit")
    total: int | None = None
    if kind == "synthetic":
        total = source_cfg.get("rows")
    elif kind == "local":
        try:
            files = local_files(source_cfg)
            fmt = _file_format(source_cfg, files)
        except (DataFileError, ValueError):
            return limit  # missing or unreadable files are reported, with their names, by preparation
        counts = [_count_file_rows(path, fmt) for path in files]
        total = None if None in counts else sum(counts)
    if total is None:
        return limit
    total = max(total - skip, 0)
    return total if limit is None else min(total, limit)


def source_format(source_cfg: dict) -> str:
    """The raw format of a source: explicit, or implied by a synthetic kind."""
    if source_cfg.get("format"):
        return source_cfg["format"]
    if source_cfg.get("source") == "synthetic" and source_cfg.get("kind") in SYNTHETIC_FORMATS:
        return SYNTHETIC_FORMATS[source_cfg["kind"]]
    raise ValueError(f"source config {source_cfg!r} needs a 'format' (known: {', '.join(sorted(FORMATS))})")


def source_name(source_cfg: dict) -> str:
    """A short, path-free name for a source; ids of rows that have none are built from it."""
    kind = source_cfg.get("source")
    if kind == "synthetic":
        return f"synthetic-{source_cfg.get('kind')}-{source_cfg.get('split')}"
    if kind == "hub":
        parts = [source_cfg.get("path", "hub").replace("/", "__"), source_cfg.get("name"), source_cfg.get("split")]
        return "-".join(str(p) for p in parts if p)
    files = source_cfg.get("data_files")
    first = Path(files if isinstance(files, (str, os.PathLike)) else list(files)[0])
    return f"{first.parent.name}-{first.stem}" if first.parent.name else first.stem


def source_origin(source_cfg: dict) -> str:
    """Where a source's rows come from, for error messages: file paths or the hub id."""
    kind = source_cfg.get("source")
    if kind == "synthetic":
        return f"synthetic:{source_cfg.get('kind')}/{source_cfg.get('split')}"
    if kind == "hub":
        name = f"[{source_cfg['name']}]" if source_cfg.get("name") else ""
        return f"hub:{source_cfg.get('path')}{name}/{source_cfg.get('split')}" + _row_numbering(source_cfg)
    files = source_cfg.get("data_files")
    origin = str(files) if isinstance(files, (str, os.PathLike)) else ", ".join(map(str, files))
    return origin + _row_numbering(source_cfg)


def _row_numbering(source_cfg: dict) -> str:
    # Rows are numbered after shuffle and skip; say so, or "row 3" would point at the wrong line.
    if source_cfg.get("shuffle"):
        return " (rows counted in the seeded shuffle order; a row's id ends in its position in the file)"
    return f" (rows counted after skipping {source_cfg['skip']})" if source_cfg.get("skip") else ""
