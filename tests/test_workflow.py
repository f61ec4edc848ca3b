"""End to end: the whole DAG on config/tiny.yaml, in a copy of the repository.

Runs Snakemake for real (a random 2-layer model, a handful of synthetic rows): every figure,
table and the report must exist, the metrics table must hold exactly the grid's rows, a second
run must find nothing to do, and editing the plotting code must rerun only figure jobs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from d2lora import grid

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
METRICS_OF_BENCHMARK = {
    "gsm8k": ["gsm8k_accuracy"],
    "arc_easy": ["arc_easy_accuracy", "arc_easy_accuracy_norm"],
    "titles": ["rouge1", "rouge2", "rougeL"],
}

pytestmark = pytest.mark.slow


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # --configfile takes several values, so it goes last, after any targets.
    cmd = [*SNAKEMAKE, "--cores", "2", *args, "--configfile", "config/tiny.yaml"]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log"))[-3:])
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stderr[-6000:]}\n{logs}")
    return result


def _job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    counts = {}
    block = dry_run_output.split("Job stats:", 1)[-1]
    for line in block.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "workflow", "config", "report", "src", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    _snakemake(work, "all")
    return work


def test_every_figure_table_and_provenance_file_exists(finished_run):
    for figure in ("figure1", "figure2", "figure3", "figure4"):
        for ext in ("png", "pdf"):
            path = finished_run / "results" / "figures" / f"{figure}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    for table in ("table1", "table2", "table3", "significance"):
        for ext in ("csv", "md"):
            assert (finished_run / "results" / "tables" / f"{table}.{ext}").stat().st_size > 0
    for name in ("config_used.yaml", "versions.tsv", "dataset_checksums.tsv", "runtimes.tsv"):
        assert (finished_run / "results" / "provenance" / name).stat().st_size > 0


def test_metrics_table_has_exactly_the_grid_rows(finished_run):
    config = yaml.safe_load((finished_run / "config" / "tiny.yaml").read_text())
    expected = sorted(
        (cell.task, cell.method, cell.init, cell.n, cell.seed, metric)
        for benchmark, cell in grid.evaluation_jobs(config)
        for metric in METRICS_OF_BENCHMARK[benchmark]
    )
    metrics = pd.read_csv(finished_run / "results" / "metrics" / "metrics.tsv", sep="\t")
    assert list(metrics.columns) == ["task", "method", "init", "n", "seed", "metric", "value"]
    got = sorted(metrics[["task", "method", "init", "n", "seed", "metric"]].itertuples(index=False, name=None))
    assert got == expected
    assert metrics["value"].notna().all()
    # One interval per cell and metric (seeds pooled), around the metrics table's mean over seeds.
    intervals = pd.read_csv(finished_run / "results" / "metrics" / "intervals.tsv", sep="\t")
    means = metrics.groupby(["task", "method", "init", "n", "metric"], as_index=False)["value"].mean()
    joined = means.merge(intervals, on=["task", "method", "init", "n", "metric"], how="outer", validate="1:1")
    assert len(joined) == len(means) and (joined["value"] - joined["mean"]).abs().max() < 1e-4
    assert ((joined["ci_low"] <= joined["mean"] + 1e-9) & (joined["mean"] <= joined["ci_high"] + 1e-9)).all()


def test_metrics_table_is_byte_identical_to_the_committed_fixture(finished_run):
    """Refactoring must not change what the pipeline computes (GitHub issue 14, item 6). The tiny
    config pins float32 on the CPU, so its metrics do not depend on the machine. A change that is
    meant to move the numbers regenerates the fixture (its commit says why):
    `cp <run>/results/metrics/metrics.tsv tests/fixtures/tiny_metrics.tsv`."""
    fixture = REPO / "tests" / "fixtures" / "tiny_metrics.tsv"
    assert (finished_run / "results" / "metrics" / "metrics.tsv").read_bytes() == fixture.read_bytes()


def test_arc_choice_logprobs_match_the_committed_fixture(finished_run):
    """Most of the tiny grid's metrics are 0 (a random 2-layer model), so the fixture above would miss
    a change of training or scoring that leaves them there; the ARC choice log-likelihoods of the
    base, warm-up and trained cells move with any such change (cells differ by 1e-3 to 1e-2)."""
    fixture = json.loads((REPO / "tests" / "fixtures" / "tiny_arc_choice_logprobs.json").read_text())
    eval_dir = finished_run / "results" / "eval" / "arc_easy"
    for cell, expected in fixture.items():
        rows = [json.loads(line) for line in (eval_dir / cell / "predictions.jsonl").read_text().splitlines()]
        got = [row["choice_logprobs"] for row in rows]
        assert len(got) == len(expected), cell
        for item, (got_item, expected_item) in enumerate(zip(got, expected)):
            assert got_item == pytest.approx(expected_item, abs=3e-4), (cell, item)


def test_per_example_outputs_sit_beside_every_score(finished_run):
    scores = list((finished_run / "results" / "eval").rglob("scores.json"))
    assert scores
    for path in scores:
        assert (path.parent / "predictions.jsonl").stat().st_size > 0


def test_second_run_has_nothing_to_do(finished_run):
    result = _snakemake(finished_run, "-n", "all")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_editing_the_plotting_code_reruns_only_figures(finished_run):
    code = finished_run / "src" / "d2lora" / "results" / "figures.py"
    code.write_text(code.read_text() + "\n# edited by the test\n")
    result = _snakemake(finished_run, "-n", "all")
    counts = _job_counts(result.stdout + result.stderr)
    assert counts == {"figure": 4, "all": 1}, counts


def test_report_is_self_contained_html(finished_run):
    _snakemake(finished_run, "--report", "results/report.html")
    html = (finished_run / "results" / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in (
        "figure1.png",
        "table3.csv",
        "metrics.tsv",
        "runtimes.tsv",
        "dataset_checksums.tsv",
        "intervals.tsv",
        "significance.csv",
    ):
        assert name in html, name
