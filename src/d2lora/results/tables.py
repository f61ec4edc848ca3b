"""Tables 1-3: LoRA vs D2LoRA comparisons and the hyperparameters actually used.

Table 2 is generated from the run's own config rather than copied from the paper, so a config
change shows up in the report; the paper's values stay in workflow/resources/reference.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping

import pandas as pd

from d2lora.grid import variant
from d2lora.io import atomic_path
from d2lora.results.labels import init_label
from d2lora.results.metrics import reference_rows, spec_cells
from d2lora.settings import LoraShape, TrainingHparams

DELTA = "Δ"
MISSING_MD = "–"
# The paper's comparison: Δ = D2LoRA - LoRA, whatever these two are labelled.
DELTA_PAIR = ("lora", "d2lora")


def init_column(init: str, labels: Mapping[str, str] | None = None) -> str:
    """The column of an init: its label (config `variants`), else LoRA / D2LoRA / the name."""
    return init_label(init, labels)


def wide(cells: pd.DataFrame, value: str, prefix: str = "", labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """(method, init, n) rows -> one row per (method, n), one column per init (its label)."""
    if cells.empty:
        return pd.DataFrame(columns=["method", "n"])
    table = cells.pivot_table(index=["method", "n"], columns="init", values=value, aggfunc="first")
    table.columns = [prefix + init_column(init, labels) for init in table.columns]
    return table.reset_index()


def add_delta(table: pd.DataFrame, prefix: str = "", labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    lora, d2lora = (prefix + init_column(init, labels) for init in DELTA_PAIR)
    if lora in table and d2lora in table:
        table[prefix + DELTA] = table[d2lora] - table[lora]
    return table


def grid_frame(spec: dict) -> pd.DataFrame:
    """Every (method, n) of the spec, so rows the run has not produced still show as gaps."""
    rows = [(method, n) for method in spec["methods"] for n in sorted(spec["n"])]
    return pd.DataFrame(rows, columns=["method", "n"]).astype({"n": "int64"})


def ours_columns(metrics_df: pd.DataFrame, spec: dict, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    cells = spec_cells(metrics_df, spec)
    table = add_delta(wide(cells, "mean", labels=labels), labels=labels)
    seeds = cells.groupby(["method", "n"])["seeds"].min().rename("seeds").reset_index()
    return table.merge(seeds, on=["method", "n"], how="left") if not cells.empty else table


PAPER_N = "paper n"


def last_point_alignment(grid_n, paper_n) -> dict[int, int]:
    """{paper n: grid n} pairing the paper's largest subset with the grid's largest, where they differ.

    Both are "every training row" of their data: the paper's 7k titles column and our 6,970 rows
    (its ~7,070 less the 100 held out). The pairing holds only where the grid's largest n has no
    paper value, lies above every other paper n and within 5 % of the paper's largest, so no other
    column could be meant and the two are the same amount of data to within the held-out rows.
    """
    grid_last, paper_sorted = max(grid_n), sorted(set(paper_n))
    if not paper_sorted or grid_last in paper_sorted:
        return {}
    paper_last = paper_sorted[-1]
    below = paper_sorted[:-1]
    if grid_last > paper_last or grid_last < 0.95 * paper_last or (below and grid_last <= below[-1]):
        return {}
    return {paper_last: grid_last}


def paper_columns(
    reference_df: pd.DataFrame | None, spec: dict, labels: Mapping[str, str] | None = None
) -> pd.DataFrame | None:
    """The paper's values per (method, n), and `paper n`: the n the paper reported them at."""
    ref = reference_rows(reference_df, spec["task"], spec["metric"])
    ref = ref[ref["method"].isin(spec["methods"]) & ref["init"].isin(spec["inits"])]
    if ref.empty:
        return None
    ref = ref.assign(**{PAPER_N: ref["n"].astype("int64")})
    ref["n"] = ref["n"].replace(last_point_alignment(spec["n"], ref["n"].tolist())).astype("int64")
    table = add_delta(wide(ref, "value", prefix="paper ", labels=labels), prefix="paper ", labels=labels)
    return table.merge(ref[["method", "n", PAPER_N]].drop_duplicates(), on=["method", "n"], how="left")


def comparison_table(
    metrics_df: pd.DataFrame, spec: dict, reference_df: pd.DataFrame | None, labels: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Rows per (method, n): our per-init means over seeds, Δ = D2LoRA - LoRA, and the paper's.

    One column per init of the spec, headed by its label (`labels`, see
    d2lora.results.labels.init_labels); Δ only where the spec has both lora and d2lora.
    """
    columns = [init_column(i, labels) for i in spec["inits"]]
    if len(set(columns)) != len(columns):
        raise ValueError(f"inits {spec['inits']} have clashing labels {columns}")
    table = grid_frame(spec).merge(ours_columns(metrics_df, spec, labels), on=["method", "n"], how="left")
    paper = paper_columns(reference_df, spec, labels)
    if paper is not None:
        table = table.merge(paper, on=["method", "n"], how="left")
    # The paper reports lora and d2lora only: no all-blank "paper" column for every other variant.
    paper_init_columns = [f"paper {c}" for c in columns if paper is not None and f"paper {c}" in paper]
    ordered = ["method", "n", *columns, DELTA, "seeds", PAPER_N, *paper_init_columns, f"paper {DELTA}"]
    for column in ordered:
        if column not in table:
            table[column] = float("nan")
    if paper is None:
        ordered = [c for c in ordered if not c.startswith("paper ")]
    elif (table[PAPER_N].dropna() == table.loc[table[PAPER_N].notna(), "n"]).all():
        ordered.remove(PAPER_N)  # every paper value sits at its own n: the column would repeat n
    if not set(DELTA_PAIR) <= set(spec["inits"]):
        ordered = [c for c in ordered if not c.endswith(DELTA)]
    table = (
        table.astype({"seeds": "Int64", PAPER_N: "Int64"}) if PAPER_N in ordered else table.astype({"seeds": "Int64"})
    )
    return table[ordered]


def describe_source(cfg) -> str:
    """Short description of a dataset source config, e.g. 'hub:openai/gsm8k'."""
    if isinstance(cfg, (list, tuple)):
        return " + ".join(describe_source(part) for part in cfg)
    if not isinstance(cfg, dict):
        return str(cfg)
    what = next((cfg[key] for key in ("kind", "path", "data_files", "name") if key in cfg), "")
    if isinstance(what, dict):
        what = ", ".join(f"{k}={v}" for k, v in sorted(what.items()))
    return f"{cfg.get('source', '?')}:{what}" if what != "" else str(cfg.get("source", "?"))


def task_methods(config: dict) -> dict[str, dict]:
    """Per task (in order of first use), the adapt methods and inits its experiments use."""
    tasks: dict[str, dict] = {}
    for spec in config["experiments"].values():
        used = tasks.setdefault(spec["task"], {"methods": set(), "inits": set()})
        used["methods"].update(spec["methods"])
        used["inits"].update(spec["inits"])
    return tasks


def format_number(value) -> str:
    return "" if value is None else f"{value:g}"


def hparam_row(task: str, phase: str, method: str, dataset: str, hp: dict, lora: dict) -> dict:
    hp, lora = TrainingHparams.of(hp), LoraShape.of(lora)
    return {
        "task": task,
        "phase": phase,
        "dataset": dataset,
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "method": method,
        "lr": format_number(hp.learning_rate),
        "epochs": hp.epochs,
        "beta": format_number(hp.beta),
        "scheduler": hp.scheduler,
        "batch_size": hp.batch_size,
        "grad_accum": hp.grad_accum,
    }


def hyperparameter_table(config: dict) -> pd.DataFrame:
    """Table 2 from the config used: the warm-up (where a D2LoRA run needs it) and each adapt method."""
    training, datasets = config["training"], config["datasets"]
    rows = []
    for task, used in task_methods(config).items():
        if any(variant(config, init)["warmup"] for init in used["inits"]):
            warmup_source = describe_source(datasets["warmup"]["train"])
            rows.append(hparam_row(task, "warmup", "sft", warmup_source, training["warmup"], training["lora"]))
        task_source = describe_source(datasets[task]["train"])
        for method, hp in training["adapt"].items():
            if method in used["methods"]:
                rows.append(hparam_row(task, "adapt", method, task_source, hp, training["lora"]))
    return pd.DataFrame(rows)


def format_cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


Formats = Mapping[str, Callable[[object], str]]


def formatted(df: pd.DataFrame, formats: Formats | None = None) -> pd.DataFrame:
    """Every cell as text: `formats[column]` for a measured value of that column, else format_cell."""
    formats = formats or {}

    def column_text(column: pd.Series) -> pd.Series:
        special = formats.get(column.name)
        if special is None:
            return column.map(format_cell)
        return column.map(lambda v: format_cell(v) if format_cell(v) == "" else special(v))

    return df.astype(object).apply(column_text)


def markdown(df: pd.DataFrame, formats: Formats | None = None) -> str:
    """A GitHub-style Markdown table; written by hand because `tabulate` may be absent."""
    text = formatted(df, formats)

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") or MISSING_MD for c in cells) + " |"

    header = line(text.columns)
    rule = "| " + " | ".join("---" for _ in text.columns) + " |"
    return "\n".join([header, rule, *(line(row) for row in text.itertuples(index=False))]) + "\n"


def write_csv(df: pd.DataFrame, csv_path: str | os.PathLike, formats: Formats | None = None) -> None:
    """The table as CSV, every cell as `formatted` writes it."""
    with atomic_path(csv_path) as tmp:
        formatted(df, formats).to_csv(tmp, index=False, lineterminator="\n")


def write_table(
    df: pd.DataFrame, csv_path: str | os.PathLike, md_path: str | os.PathLike, formats: Formats | None = None
) -> None:
    """CSV and Markdown with floats at 2 decimals (or `formats[column]`); empty cells where
    nothing was measured."""
    write_csv(df, csv_path, formats)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(df, formats), encoding="utf-8")
