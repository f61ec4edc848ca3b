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

import pandas as pd

from d2lora.io import DataFileError, atomic_path, read_json

COST_COLUMNS = ["task", "method", "init", "n", "seed", "device", "train_device_seconds", "train_tokens",
                "warmup", "warmup_device_seconds", "warmup_tasks", "total_device_hours"]


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
            raise DataFileError(f"cell {cell['task']}/{cell['method']}/{cell['init']}/n{cell['n']}: warm-up '{warm}' has no training record")
        tasks = len(tasks_per_warmup.get(warm, ())) if warm else 0
        warm_seconds = warm_records[warm]["train_seconds"] / tasks if warm else 0.0
        devices = {r["device"] for r in ([record] if record else []) + ([warm_records[warm]] if warm else [])}
        if len(devices) > 1:
            raise DataFileError(f"cell {cell['task']}/{cell['method']}/{cell['init']}/n{cell['n']}: adaptation and "
                                f"warm-up ran on different devices {sorted(devices)}; their seconds do not add up")
        train_seconds = float(record["train_seconds"]) if record else 0.0
        rows.append({
            **{k: cell[k] for k in ("task", "method", "init", "n", "seed")},
            "device": devices.pop() if devices else "",
            "train_device_seconds": round(train_seconds, 3),
            "train_tokens": int(record.get("train_tokens", 0)) if record else 0,
            "warmup": warm or "",
            "warmup_device_seconds": round(warm_seconds, 3),
            "warmup_tasks": tasks,
            "total_device_hours": (train_seconds + warm_seconds) / 3600.0,
        })
    return pd.DataFrame(rows, columns=COST_COLUMNS).sort_values(["task", "method", "init", "n", "seed"], ignore_index=True)


def write_cost_table(table: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def plot_score_vs_cost(metrics: pd.DataFrame, cost: pd.DataFrame, experiments: dict, out_png, out_pdf=None,
                       labels: dict | None = None) -> None:
    """Score (y) against training device-hours including the amortized warm-up (x, log), one panel
    per (task, metric) of the grid, one line per (method, init) through its n values, seeds averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    key = ["task", "method", "init", "n", "seed"]
    panels = sorted({(spec["task"], spec["metric"]) for spec in experiments.values()})
    hours = cost.set_index(key)["total_device_hours"].rename("hours")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        scores = metrics[(metrics["task"] == task) & (metrics["metric"] == metric)]
        joined = scores.join(hours, on=key, how="inner")
        if joined.empty:
            raise DataFileError(f"score_vs_cost: no cell of task '{task}' has both a '{metric}' score and a cost")
        joined = joined.groupby(["method", "init", "n"], as_index=False)[["value", "hours"]].mean()
        base = joined[joined["method"] == "none"]
        for (method, init), line in joined[joined["method"] != "none"].groupby(["method", "init"]):
            line = pd.concat([base[base["init"] == init], line]).sort_values("n")
            # A cell that cost nothing (a plain init at n = 0) sits at the left edge of the log axis.
            ax.plot(line["hours"].clip(lower=1e-6), line["value"], marker="o",
                    label=f"{method.upper()} {labels.get(init, init)}")
        ax.set_xscale("log")
        ax.set_xlabel("training device-hours (incl. amortized warm-up)")
        ax.set_ylabel("score")
        ax.set_title(f"{task}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    if out_pdf:
        with atomic_path(out_pdf) as tmp:
            fig.savefig(tmp, format="pdf")
    plt.close(fig)
