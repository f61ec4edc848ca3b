"""What each cell cost to train (results/metrics/cost.tsv), and score against that cost.

Per cell of the grid (from the adapter's and the warm-up's training.json):
  train_device_seconds   wall seconds of the Trainer on the job's device (GPU-seconds on a GPU)
  train_tokens           tokens the policy read: tokenized rows x epochs (d2lora.cost.sequence_tokens)
  warmup_device_seconds  the warm-up's own seconds, amortized: divided by the number of tasks in the
                         grid that start from that warm-up (it is trained once and serves them all)
  total_device_hours     (train + amortized warm-up) / 3600: the x axis of score_vs_cost
n = 0 cells train nothing: a warm-started one still carries its amortized warm-up.
The device each number was measured on is in cost.tsv (`device`); a cell whose adaptation and
warm-up ran on different devices is refused (their seconds do not add up). Seconds vary between
runs, so they are kept out of metrics.tsv, which is byte-identical across runs of one config.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from d2lora.io import DataFileError, atomic_path, read_json

COST_COLUMNS = [
    "task",
    "method",
    "init",
    "n",
    "seed",
    "device",
    "train_device_seconds",
    "train_tokens",
    "warmup",
    "warmup_device_seconds",
    "warmup_tasks",
    "total_device_hours",
]


def _training_record(path: Path) -> dict:
    try:
        record = read_json(path)
    except (OSError, ValueError) as err:
        raise DataFileError(f"{path}: cannot read the training record: {err}") from err
    for key in ("train_seconds", "device"):
        if key not in record:
            raise DataFileError(f"{path}: training record has no '{key}'")
    return record


def cost_table(cells: list[dict], warmups: dict[str, os.PathLike]) -> pd.DataFrame:
    """One row per cell. `cells`: dicts with task, method, init, n, seed, `training` (path of the
    adapter's training.json, None for n = 0) and `warmup` (the warm-up's key in `warmups`, or None)."""
    warm_records = {key: _training_record(Path(path)) for key, path in warmups.items()}
    tasks_per_warmup: dict[str, set] = {}
    for cell in cells:
        if cell.get("warmup"):
            tasks_per_warmup.setdefault(cell["warmup"], set()).add(cell["task"])
    rows = []
    for cell in cells:
        record = _training_record(Path(cell["training"])) if cell.get("training") else None
        warm = cell.get("warmup")
        if warm and warm not in warm_records:
            raise DataFileError(
                f"cell {cell['task']}/{cell['method']}/{cell['init']}/n{cell['n']}: warm-up '{warm}' has no training record"
            )
        tasks = len(tasks_per_warmup.get(warm, ())) if warm else 0
        warm_seconds = warm_records[warm]["train_seconds"] / tasks if warm else 0.0
        devices = {r["device"] for r in ([record] if record else []) + ([warm_records[warm]] if warm else [])}
        if len(devices) > 1:
            raise DataFileError(
                f"cell {cell['task']}/{cell['method']}/{cell['init']}/n{cell['n']}: adaptation and "
                f"warm-up ran on different devices {sorted(devices)}; their seconds do not add up"
            )
        train_seconds = float(record["train_seconds"]) if record else 0.0
        rows.append(
            {
                **{k: cell[k] for k in ("task", "method", "init", "n", "seed")},
                "device": devices.pop() if devices else "",
                "train_device_seconds": round(train_seconds, 3),
                "train_tokens": int(record.get("train_tokens", 0)) if record else 0,
                "warmup": warm or "",
                "warmup_device_seconds": round(warm_seconds, 3),
                "warmup_tasks": tasks,
                "total_device_hours": (train_seconds + warm_seconds) / 3600.0,
            }
        )
    return pd.DataFrame(rows, columns=COST_COLUMNS).sort_values(
        ["task", "method", "init", "n", "seed"], ignore_index=True
    )


def write_cost_table(table: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def pareto_front(points: pd.DataFrame, cost: str = "hours", score: str = "value") -> pd.DataFrame:
    """The points no other point beats: none costs at most as much and scores at least as high,
    with one of the two strictly. Sorted by cost (then score, highest first)."""
    ordered = points.sort_values([cost, score], ascending=[True, False], kind="mergesort")
    keep, best = [], float("-inf")
    for index, row in ordered.iterrows():
        if row[score] > best:
            keep.append(index)
            best = row[score]
    return ordered.loc[keep]


def cell_label(method: str, init: str, n: int, labels: dict | None = None) -> str:
    """'SFT LoRA n=16'; an n = 0 cell trained nothing, so it is named by its init alone ('LoRA n=0')."""
    init_text = (labels or {}).get(init, init)
    if int(n) == 0:
        return f"{init_text} n=0"
    return f"{method.upper()} {init_text} n={int(n)}"


def plot_score_vs_cost(
    metrics: pd.DataFrame, cost: pd.DataFrame, experiments: dict, out_png, out_pdf=None, labels: dict | None = None
) -> None:
    """Pareto view: score (y) against training device-hours including the amortized warm-up (x), one
    point per cell (seeds averaged), labelled by variant and n, the frontier drawn through the cells
    no other cell beats. One panel per (task, metric) of the grid.

    The x axis is symmetric-log: linear through 0, where a cell that trained nothing (plain LoRA at
    n = 0) really sits, logarithmic above the cheapest trained cell.
    """
    matplotlib.use("Agg")

    labels = labels or {}
    key = ["task", "method", "init", "n", "seed"]
    panels = sorted({(spec["task"], spec["metric"]) for spec in experiments.values()})
    hours = cost.set_index(key)["total_device_hours"].rename("hours")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    for ax, (task, metric) in zip(axes[0], panels):
        scores = metrics[(metrics["task"] == task) & (metrics["metric"] == metric)]
        joined = scores.join(hours, on=key, how="inner")
        if joined.empty:
            raise DataFileError(f"score_vs_cost: no cell of task '{task}' has both a '{metric}' score and a cost")
        points = joined.groupby(["method", "init", "n"], as_index=False)[["value", "hours"]].mean()
        variants = sorted({(m, i) for m, i in zip(points["method"], points["init"])})
        for (method, init), color in zip(variants, colors * (len(variants) // len(colors) + 1)):
            group = points[(points["method"] == method) & (points["init"] == init)]
            name = f"{labels.get(init, init)} n=0" if method == "none" else f"{method.upper()} {labels.get(init, init)}"
            ax.scatter(group["hours"], group["value"], color=color, label=name, zorder=3, s=22)
        for row in points.itertuples():
            ax.annotate(
                cell_label(row.method, row.init, row.n, labels),
                (row.hours, row.value),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=6,
                color="0.25",
            )
        front = pareto_front(points)
        ax.step(
            front["hours"],
            front["value"],
            where="post",
            color="0.2",
            linewidth=1.0,
            linestyle="--",
            label="Pareto frontier",
            zorder=2,
        )
        trained = points.loc[points["hours"] > 0, "hours"]
        ax.set_xscale("symlog", linthresh=float(trained.min()) if not trained.empty else 1e-3)
        ax.set_xlim(left=0)
        ax.set_xlabel("training device-hours (incl. amortized warm-up)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, metadata={"Software": None})
    if out_pdf:
        with atomic_path(out_pdf) as tmp:
            fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    plt.close(fig)
