"""Learning-curve figures drawn from an experiment spec (the config's `experiments` entries).

One function serves Figures 1-4: the spec says which task, metric, methods, inits and n grid
to draw and whether to split panels by method. The paper's numbers, when given, are drawn
where a reader cannot take them for ours:
- when this run's n grid holds every n the paper reported (the paper preset), on the same axes
  as ours, dashed, one y scale for both;
- otherwise (the embedded default trains on tens of samples, the paper on thousands) in a row
  of panels of their own under ours, on the paper's own n grid, with the same styling and the
  same y-range logic.
Y ranges fit the values drawn (bands included), never below 0: a curve at 74-83 % is not
squeezed against a forced 0.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless cluster nodes; also keeps output independent of $DISPLAY

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from d2lora.benchmarks import METRICS  # noqa: E402
from d2lora.io import atomic_path  # noqa: E402
from d2lora.results.labels import init_label  # noqa: E402
from d2lora.results.metrics import reference_rows, spec_cells  # noqa: E402
from d2lora.results.significance import spec_intervals  # noqa: E402

METRIC_LABELS = {name: metric.label for name, (_, metric) in METRICS.items()}
METHOD_LABELS = {"sft": "SFT", "dpo": "DPO", "orpo": "ORPO"}
PAPER_LABEL = "paper (Llama-3.1-8B)"
# A lone paper point has no shape to compare.
MIN_PAPER_POINTS = 2
# Room for one legend column ("paper (Llama-3.1-8B), ORPO, D2LoRA" at 8 pt).
LEGEND_COLUMN_INCHES = 2.6
PANEL_INCHES = 4.4
# Margin above and below the values, as a share of their span; a flat line gets Y_MIN_SPAN.
Y_MARGIN = 0.08
Y_MIN_SPAN = 2.0
COLORS = plt.get_cmap("tab10").colors
BAND_ALPHA = 0.15
BAND_LABEL = "{confidence:.0%} CI (bootstrap over examples)"


def pretty(name: str, labels: dict[str, str]) -> str:
    return labels.get(name, name)


def n_label(n: int) -> str:
    """Tick label in the paper's style: 1000 -> '1k', 100 -> '100'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def panel_layout(spec: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """(panel title, [(method, init) lines]) for the spec's panel mode."""
    mode = spec.get("panels", "method")
    if mode == "method":
        return [(pretty(m, METHOD_LABELS), [(m, i) for i in spec["inits"]]) for m in spec["methods"]]
    if mode == "none":
        return [("", [(m, i) for m in spec["methods"] for i in spec["inits"]])]
    raise ValueError(f"unknown panels mode {mode!r}: use 'method' or 'none'")


def line_label(method: str, init: str, spec: dict, labels: dict[str, str] | None = None) -> str:
    """Legend text of one line; inits by their label (config `variants`, else LoRA / D2LoRA / name)."""
    if spec.get("panels", "method") == "method":
        return init_label(init, labels)
    if len(spec["inits"]) == 1:
        return pretty(method, METHOD_LABELS)
    return f"{pretty(method, METHOD_LABELS)}, {init_label(init, labels)}"


def draw_ours(ax, cells: pd.DataFrame, x_of: dict[int, int], color, label: str) -> None:
    """Mean over seeds, with min-max whiskers where more than one seed was run, and a shaded
    band for the CI over examples where `cells` has ci_low / ci_high (intervals.tsv); a line of
    one point gets the CI as a faint bar, since a band needs two."""
    cells = cells.sort_values("n")
    x = [x_of[n] for n in cells["n"]]
    spread = [cells["mean"] - cells["low"], cells["high"] - cells["mean"]]
    yerr = spread if (cells["seeds"] > 1).any() else None
    ax.errorbar(x, cells["mean"], yerr=yerr, color=color, label=label, marker="o", linestyle="-", capsize=3)
    if "ci_low" not in cells or cells["ci_low"].isna().all():
        return
    if len(x) == 1:
        ax.vlines(x, cells["ci_low"], cells["ci_high"], color=color, alpha=2 * BAND_ALPHA, linewidth=8)
    else:
        ax.fill_between(x, cells["ci_low"], cells["ci_high"], color=color, alpha=BAND_ALPHA, linewidth=0)


def draw_paper(ax, ref: pd.DataFrame, x_of: dict[int, float], color, label: str, overlay: bool) -> None:
    """The paper's line: dashed and open-marked beside ours, or styled like ours in its own row."""
    ref = ref.sort_values("n")
    x = [x_of[n] for n in ref["n"]]
    if overlay:
        ax.plot(
            x, ref["value"], color=color, label=label, marker="s", markerfacecolor="none", linestyle="--", alpha=0.7
        )
    else:
        ax.plot(x, ref["value"], color=color, label=label, marker="o", linestyle="-")


def line_color(spec: dict, method: str, init: str):
    """Same colour for the same line in every panel, and for its paper counterpart."""
    if spec.get("panels", "method") == "method":
        index = spec["inits"].index(init)
    else:
        index = spec["methods"].index(method) * len(spec["inits"]) + spec["inits"].index(init)
    return COLORS[index % len(COLORS)]


def rows_of(df: pd.DataFrame, method: str, init: str) -> pd.DataFrame:
    return df[(df["method"] == method) & (df["init"] == init)]


def panel_reference(ref: pd.DataFrame, lines, ns: Sequence[int]) -> pd.DataFrame:
    """The paper's rows for one panel's lines; its n = 0 only where n = 0 is one of ours."""
    rows = pd.concat([rows_of(ref, method, init) for method, init in lines]) if lines else ref.iloc[0:0]
    return rows if 0 in ns else rows[rows["n"] != 0]


def paper_mode(ref: pd.DataFrame, layout, ns: Sequence[int]) -> str | None:
    """'overlay' when our n grid holds every n the paper reported for the drawn lines, 'own_row'
    when the paper has lines of MIN_PAPER_POINTS or more on another grid, None when nothing of
    the paper can be drawn."""
    panels = [panel_reference(ref, lines, ns) for _, lines in layout]
    drawable = [p for p in panels if not p.empty and (p.groupby(["method", "init"]).size() >= MIN_PAPER_POINTS).any()]
    if not drawable:
        return None
    return "overlay" if all(set(p["n"]) <= set(ns) for p in drawable) else "own_row"


def fit_limits(values: Sequence[float]) -> tuple[float, float]:
    """A y range around the values with Y_MARGIN on each side, never below 0 (scores are >= 0)."""
    values = [v for v in values if pd.notna(v)]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    margin = max((high - low) * Y_MARGIN, (Y_MIN_SPAN - (high - low)) / 2, 0.0)
    return max(low - margin, 0.0), high + margin


def drawn_values(ax) -> list[float]:
    """Every y the axes show: line points and band edges."""
    values = [float(y) for line in ax.get_lines() for y in line.get_ydata()]
    for collection in ax.collections:
        for path in collection.get_paths():
            values.extend(float(y) for y in path.vertices[:, 1])
    return values


def finish_axes(ax, ns: Sequence[int], ylabel: str | None) -> None:
    ax.set_xticks(range(len(ns)), [n_label(n) for n in ns])
    ax.set_xlim(-0.5, len(ns) - 0.5)
    ax.set_xlabel("task samples n")
    ax.grid(True, alpha=0.3)
    if ylabel:
        ax.set_ylabel(ylabel)


def share_fitted_limits(axes: list) -> None:
    """One y scale for a row of panels, fitted to everything the row draws."""
    low, high = fit_limits([v for ax in axes for v in drawn_values(ax)])
    for ax in axes:
        ax.set_ylim(low, high)


def legend_entries(axes: list) -> dict[str, object]:
    """label -> handle, each panel's labels once (panels repeat the same lines)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return entries


def legend_layout(axes: list, extra: dict[str, object] | None = None) -> tuple[dict[str, object], int]:
    """Entries and column count of the one legend below the panels.

    Overlaid paper lines sit in the column of their own line (legends fill column-wise); `extra`
    entries (the CI band's key) take one more column.
    """
    entries = legend_entries(axes)
    ours = [label for label in entries if not label.startswith(PAPER_LABEL)]
    paired = len(ours) < len(entries) and all(f"{PAPER_LABEL}, {label}" in entries for label in ours)
    if paired:
        entries = {lab: entries[lab] for label in ours for lab in (label, f"{PAPER_LABEL}, {label}")}
        ncol = len(ours)
    else:
        ncol = min(len(entries), 3)
    if entries and extra:
        entries = {**entries, **extra}
        ncol = ncol + 1 if paired else min(len(entries), 3)
    return entries, max(ncol, 1)


def save_figure(fig, out_png: str | os.PathLike, out_pdf: str | os.PathLike) -> None:
    """PNG and PDF without timestamps or version stamps, so identical inputs give identical bytes."""
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, metadata={"Software": None})
    with atomic_path(out_pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})


def with_intervals(cells: pd.DataFrame, intervals: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """`cells` (spec_cells) plus ci_low / ci_high from intervals.tsv; every cell must have one."""
    joined = cells.merge(spec_intervals(intervals, spec), on=["method", "init", "n"], how="left")
    missing = joined[joined["ci_low"].isna()]
    if not missing.empty:
        where = ", ".join(f"{r.method}/{r.init}/n{r.n}" for r in missing.itertuples())
        raise ValueError(f"intervals table has no interval for {spec['task']} {spec['metric']} cells {where}")
    return joined


def plot_curves(
    metrics_df: pd.DataFrame,
    spec: dict,
    reference_df: pd.DataFrame | None,
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    intervals: pd.DataFrame | None = None,
    labels: dict[str, str] | None = None,
    confidence: float = 0.95,
) -> None:
    """Metric vs n for the spec's grid: ours solid with markers, the paper's as paper_mode says.

    With `intervals` (d2lora.results.significance.read_intervals) each of our lines carries a
    shaded confidence band over evaluation examples (`confidence`: the level it was computed at,
    for the legend). `labels` names the inits (see
    d2lora.results.labels.init_labels); without it lora / d2lora read LoRA / D2LoRA.
    """
    cells = spec_cells(metrics_df, spec)
    if cells.empty:
        raise ValueError(f"no results for task={spec['task']!r} metric={spec['metric']!r} in this spec's grid")
    if intervals is not None:
        cells = with_intervals(cells, intervals, spec)
    ref = reference_rows(reference_df, spec["task"], spec["metric"])
    ns = sorted(spec["n"])
    x_of = {n: i for i, n in enumerate(ns)}
    layout = panel_layout(spec)
    mode = paper_mode(ref, layout, ns)
    band = (
        {BAND_LABEL.format(confidence=confidence): Patch(facecolor="0.5", alpha=2 * BAND_ALPHA, linewidth=0)}
        if intervals is not None
        else None
    )
    metric_label = pretty(spec["metric"], METRIC_LABELS)

    rows = 2 if mode == "own_row" else 1
    fig, axes = plt.subplots(
        rows,
        len(layout),
        figsize=(PANEL_INCHES * len(layout) + 1.6, 4.0 * rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for index, (ax, (title, lines)) in enumerate(zip(axes[0], layout)):
        for method, init in lines:
            ours = rows_of(cells, method, init)
            if not ours.empty:
                draw_ours(ax, ours, x_of, line_color(spec, method, init), line_label(method, init, spec, labels))
        if mode == "overlay":
            for method, init in lines:
                paper = rows_of(panel_reference(ref, lines, ns), method, init)
                if len(paper) >= MIN_PAPER_POINTS:
                    draw_paper(
                        ax,
                        paper,
                        x_of,
                        line_color(spec, method, init),
                        f"{PAPER_LABEL}, {line_label(method, init, spec, labels)}",
                        overlay=True,
                    )
        finish_axes(ax, ns, metric_label if index == 0 else None)
        if mode == "own_row":
            title = f"this run: {title}" if title else "this run"
        ax.set_title(title)
    share_fitted_limits(list(axes[0]))
    if mode == "own_row":
        paper_ns = sorted(
            int(n) for n in pd.concat([panel_reference(ref, lines, ns) for _, lines in layout])["n"].unique()
        )
        paper_x = {n: i for i, n in enumerate(paper_ns)}
        for index, (ax, (title, lines)) in enumerate(zip(axes[1], layout)):
            panel_ref = panel_reference(ref, lines, ns)
            for method, init in lines:
                paper = rows_of(panel_ref, method, init)
                if len(paper) >= MIN_PAPER_POINTS:
                    draw_paper(
                        ax,
                        paper,
                        paper_x,
                        line_color(spec, method, init),
                        line_label(method, init, spec, labels),
                        overlay=False,
                    )
            finish_axes(ax, paper_ns, f"{metric_label}, paper" if index == 0 else None)
            ax.set_title(f"{PAPER_LABEL}, its own n grid" + (f": {title}" if title else ""), color="0.3")
        share_fitted_limits(list(axes[1]))
    entries, ncol = legend_layout(list(axes[0]), band)
    if entries:
        # Wide enough for the legend's columns, or a long legend runs off both edges.
        fig.set_size_inches(max(fig.get_figwidth(), LEGEND_COLUMN_INCHES * ncol), fig.get_figheight())
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    if spec.get("title"):
        fig.suptitle(spec["title"])
    try:
        save_figure(fig, out_png, out_pdf)
    finally:
        plt.close(fig)
