"""Learning-curve figures drawn from an experiment spec (the config's `experiments` entries).

One function serves Figures 1-4: the spec says which task, metric, methods, inits and n grid
to draw and whether to split panels by method. The paper's numbers, when given, are drawn on
a twin y axis: they come from Llama-3.1-8B, our default from a 135M model, so only the shapes of
the curves are comparable and a shared axis would flatten one of them. When this run's n grid
is not the paper's (the embedded default trains on tens of samples, the paper on thousands),
the paper's curve also gets its own x ticks on the top axis instead of being placed at sample
sizes it never ran.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless cluster nodes; also keeps output independent of $DISPLAY

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import pandas as pd  # noqa: E402

from d2lora.io import atomic_path  # noqa: E402
from d2lora.results.labels import init_label  # noqa: E402
from d2lora.results.metrics import reference_rows, spec_cells  # noqa: E402
from d2lora.results.statistics import spec_intervals  # noqa: E402

METRIC_LABELS = {
    "gsm8k_accuracy": "GSM8K accuracy (%)",
    "arc_easy_accuracy": "ARC-Easy accuracy (%)",
    "arc_easy_accuracy_norm": "ARC-Easy accuracy, length-normalised (%)",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}
METHOD_LABELS = {"sft": "SFT", "dpo": "DPO", "orpo": "ORPO"}
PAPER_LABEL = "paper (Llama-3.1-8B)"
# A lone paper point on its own twin axis has no scale to read a shape from, and the axis
# would autoscale around it as if it were a curve.
MIN_PAPER_POINTS = 2
# Room for one legend column ("paper (Llama-3.1-8B), ORPO, D2LoRA" at 8 pt).
LEGEND_COLUMN_INCHES = 2.6
COLORS = plt.get_cmap("tab10").colors
BAND_ALPHA = 0.15
BAND_LABEL = "{confidence:.0%} CI (bootstrap over examples)"


def pretty(name: str, labels: dict[str, str]) -> str:
    return labels.get(name, name)


def n_label(n: int) -> str:
    """Tick label in the paper's style: 1000 -> '1k', 100 -> '100'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def paper_axis_label(metric: str) -> str:
    return "paper ROUGE (variant not stated)" if metric.startswith("rouge") else "paper accuracy (%)"


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


def draw_paper(ax, ref: pd.DataFrame, x_of: dict[int, float], color, label: str) -> None:
    ref = ref.sort_values("n")
    x = [x_of[n] for n in ref["n"]]
    ax.plot(x, ref["value"], color=color, label=label, marker="s", markerfacecolor="none",
            linestyle="--", alpha=0.55)


def line_color(spec: dict, method: str, init: str):
    """Same colour for the same line in every panel, and for its paper counterpart."""
    if spec.get("panels", "method") == "method":
        index = spec["inits"].index(init)
    else:
        index = spec["methods"].index(method) * len(spec["inits"]) + spec["inits"].index(init)
    return COLORS[index % len(COLORS)]


def rows_of(df: pd.DataFrame, method: str, init: str) -> pd.DataFrame:
    return df[(df["method"] == method) & (df["init"] == init)]


def paper_grid(ref: pd.DataFrame, x_of: dict[int, int]) -> tuple[dict[int, float], list[int] | None]:
    """x position of each paper n, and the paper's own n ticks when they cannot share ours.

    Shared when every paper line has at least MIN_PAPER_POINTS sizes on our grid (sizes off
    the grid are then dropped); otherwise the paper's grid is spread evenly over our x range,
    and over a single-point grid the paper is not drawn at all.
    """
    on_grid = ref[ref["n"].isin(x_of)].groupby(["method", "init"]).size()
    if len(on_grid) == ref.groupby(["method", "init"]).ngroups and (on_grid >= MIN_PAPER_POINTS).all():
        return dict(x_of), None
    if len(x_of) < 2:  # one x position leaves no room to lay another grid out
        return {}, None
    paper_ns = sorted(int(n) for n in ref["n"].unique())
    step = (len(x_of) - 1) / max(len(paper_ns) - 1, 1)
    return {n: j * step for j, n in enumerate(paper_ns)}, paper_ns


def draw_paper_ticks(ax, x_of_paper: dict[int, float], paper_ns: list[int]) -> None:
    top = ax.secondary_xaxis("top")
    top.set_xticks([x_of_paper[n] for n in paper_ns], [n_label(n) for n in paper_ns])
    top.set_xlabel("paper's n (its own grid)", color="0.4")
    top.tick_params(axis="x", colors="0.4")


def draw_panel(ax, lines, cells, ref, spec, x_of, labels: dict[str, str] | None = None) -> object | None:
    """Draw one panel; return its twin (paper) axis, or None when the paper has nothing here."""
    for method, init in lines:
        ours = rows_of(cells, method, init)
        if not ours.empty:
            draw_ours(ax, ours, x_of, line_color(spec, method, init), line_label(method, init, spec, labels))
    panel_ref = pd.concat([rows_of(ref, method, init) for method, init in lines])
    if 0 not in x_of:  # the base model is a point of the paper's curve only where it is one of ours
        panel_ref = panel_ref[panel_ref["n"] != 0]
    if panel_ref.empty:
        return None
    x_of_paper, paper_ns = paper_grid(panel_ref, x_of)
    twin = None
    for method, init in lines:
        paper = rows_of(panel_ref, method, init)
        paper = paper[paper["n"].isin(x_of_paper)]
        if len(paper) < MIN_PAPER_POINTS:
            continue
        twin = twin if twin is not None else ax.twinx()
        draw_paper(twin, paper, x_of_paper, line_color(spec, method, init),
                   f"{PAPER_LABEL}, {line_label(method, init, spec, labels)}")
    if twin is not None and paper_ns is not None:
        draw_paper_ticks(ax, x_of_paper, paper_ns)
    return twin


def finish_axes(ax, twin, spec: dict, ns: Sequence[int], first: bool, last: bool) -> None:
    """Ticks and grid; axis titles only on the outer panels, where they are read."""
    ax.set_xticks(range(len(ns)), [n_label(n) for n in ns])
    ax.set_xlim(-0.5, len(ns) - 0.5)
    ax.set_xlabel("task samples n")
    ax.grid(True, alpha=0.3)
    # Every metric here is a percentage-like score >= 0; a flat line at 0 must not be centred on
    # an axis that shows negative accuracies.
    low, high = ax.get_ylim()
    ax.set_ylim(bottom=0, top=max(high, 1.0))
    if first:
        ours = pretty(spec["metric"], METRIC_LABELS)
        ax.set_ylabel(f"ours: {ours}" if twin is not None else ours)
    if twin is not None:
        if last:
            twin.set_ylabel(paper_axis_label(spec["metric"]), color="0.4")
        twin.tick_params(axis="y", colors="0.4")


def legend_entries(axes: list) -> dict[str, object]:
    """label -> handle, each panel's labels once (panels repeat the same lines)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return entries


def add_legend(fig, axes: list, twins: list, extra: dict[str, object] | None = None) -> None:
    """One legend below the panels, so it never hides a point.

    Each of our lines sits in one column above its paper line (legends fill column-wise);
    `extra` entries (the CI band's key) come last.
    """
    ours = legend_entries(axes)
    paper = legend_entries([twin for twin in twins if twin is not None])
    paired = bool(paper) and all(f"{PAPER_LABEL}, {label}" in paper for label in ours)
    if paired:
        labels = [lab for label in ours for lab in (label, f"{PAPER_LABEL}, {label}")]
        entries = {label: {**ours, **paper}[label] for label in labels}
        ncol = len(ours)
    else:
        entries = {**ours, **paper}
        ncol = min(len(entries), 3)
    if entries and extra:  # one more column when paired, so the pairs stay stacked
        entries = {**entries, **extra}
        ncol = ncol + 1 if paired else min(len(entries), 3)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def share_twin_limits(twins: list) -> None:
    """One paper scale across panels, like the shared scale of our own axes."""
    twins = [twin for twin in twins if twin is not None]
    if len(twins) < 2:
        return
    low = min(twin.get_ylim()[0] for twin in twins)
    high = max(twin.get_ylim()[1] for twin in twins)
    for twin in twins:
        twin.set_ylim(low, high)


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


def plot_curves(metrics_df: pd.DataFrame, spec: dict, reference_df: pd.DataFrame | None,
                out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                intervals: pd.DataFrame | None = None, labels: dict[str, str] | None = None,
                confidence: float = 0.95) -> None:
    """Metric vs n for the spec's grid: ours solid with markers, the paper's dashed on a twin axis.

    With `intervals` (d2lora.results.statistics.read_intervals) each of our lines carries a
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
    width = max(4.4 * len(layout) + 1.6, LEGEND_COLUMN_INCHES * len(layout[0][1]))
    fig, axes = plt.subplots(1, len(layout), figsize=(width, 4.6), sharey=True, squeeze=False, layout="constrained")
    twins = []
    for index, (ax, (title, lines)) in enumerate(zip(axes[0], layout)):
        twin = draw_panel(ax, lines, cells, ref, spec, x_of, labels)
        finish_axes(ax, twin, spec, ns, first=index == 0, last=index == len(layout) - 1)
        ax.set_title(title)
        twins.append(twin)
    share_twin_limits(twins)
    band = {BAND_LABEL.format(confidence=confidence): Patch(facecolor="0.5", alpha=2 * BAND_ALPHA, linewidth=0)} if intervals is not None else None
    add_legend(fig, list(axes[0]), twins, band)
    if spec.get("title"):
        fig.suptitle(spec["title"])
    try:
        save_figure(fig, out_png, out_pdf)
    finally:
        plt.close(fig)
