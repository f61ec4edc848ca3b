"""benchmarks/lever_accuracy.py through the real workflow (tiny random model, CPU): the chosen cells
trained and evaluated without a lever and with it, compared; a lever that changes nothing these
cells depend on is refused, not reported as a match.

The tests run in file order on one copy of the repository: the refused lever's run trains the plain
arm, which the real lever's run then finds done."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DPO_CELLS = {"methods": ["dpo"], "inits": ["lora"], "n": [2, 4]}

pytestmark = pytest.mark.slow


def _lever_run(work: Path, lever: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/lever_accuracy.py", "--config", "config/lever_tiny.yaml", "--lever", lever]
    cmd += ["--methods", "dpo", "--out", "out", *extra, "--", "--cores", "2"]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("lever")
    for name in ("Snakefile", "workflow", "config", "report", "src", "envs", "benchmarks"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    math = {"task": "math", "metric": "gsm8k_accuracy", **DPO_CELLS}
    config["experiments"] = {
        "figure1": {**math, "panels": "none"},
        "figure2": {**math, "panels": "method"},
        "table3": math,
        "figure3": {**math, "metric": "arc_easy_accuracy", "panels": "method"},
        "figure4": {**math, "panels": "method"},
        "table1": {"task": "titles", "metric": "rougeL", "methods": ["sft"], "inits": ["lora"], "n": [2]},
    }
    (work / "config" / "lever_tiny.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work


def test_bad_levers_are_refused_before_any_job(work):
    (work / "config" / "no_change.yaml").write_text("seed: 0\n")
    result = _lever_run(work, "config/no_change.yaml")
    assert result.returncode != 0 and "changes no setting" in result.stderr
    (work / "config" / "grid_change.yaml").write_text("seeds: [0, 1]\n")
    result = _lever_run(work, "config/grid_change.yaml")
    assert result.returncode != 0 and "changes which cells" in result.stderr
    result = _lever_run(work, "benchmarks/levers/group_by_length.yaml", "--methods", "none")
    assert result.returncode != 0 and "training methods only" in result.stderr
    for seeds in ("1,x", "1,1", ","):
        result = _lever_run(work, "benchmarks/levers/group_by_length.yaml", "--seeds", seeds)
        assert result.returncode != 0 and "--seeds:" in result.stderr
    assert not (work / "out" / "snakemake_no_change.log").exists()


def test_a_lever_that_leaves_the_cells_alone_is_refused(work):
    (work / "config" / "titles_only.yaml").write_text("evaluation:\n  titles: {max_new_tokens: 5}\n")
    result = _lever_run(work, "config/titles_only.yaml", "--seeds", "1")
    assert result.returncode != 0
    assert "did not make Snakemake recompute 2 of 2 evaluation(s)" in result.stderr
    assert not (work / "out" / "titles_only").exists()


def test_the_lever_retrains_only_its_cells_and_the_two_arms_are_compared(work):
    # Seed 1 instead of the preset's 0, in both arms.
    result = _lever_run(work, "benchmarks/levers/group_by_length.yaml", "--seeds", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads((work / "out" / "comparison.json").read_text())
    assert comparison["cells_compared"] == 2 and comparison["verdict"] in ("same within noise", "different")
    assert comparison["config_difference"] == {
        "training.adapt.dpo.group_by_length": [None, True],
        "training.adapt.orpo.group_by_length": [None, True],
    }
    for arm in ("plain", "group_by_length"):
        for n in (2, 4):
            cell = work / "out" / arm / "eval" / "gsm8k" / "math" / "dpo" / "lora" / f"n{n}" / "s1"
            assert {p.name for p in cell.iterdir()} == {"predictions.jsonl", "scores.json", "manifest.json"}
            assert not cell.with_name("s0").exists()
        assert yaml.safe_load((work / "out" / arm / "provenance" / "config_used.yaml").read_text())["seeds"] == [1]
    # The lever's arm trained its adapters grouped, the plain arm did not: each arm keeps the workflow's own
    # training records, which the next arm overwrites in results/.
    for arm, grouped in (("plain", False), ("group_by_length", True)):
        for n in (2, 4):
            kept = work / "out" / arm / "adapters" / "math" / "dpo" / "lora" / f"n{n}" / "s1"
            assert {p.name for p in kept.iterdir()} == {"training.json", "manifest.json"}
            assert json.loads((kept / "training.json").read_text())["hparams"]["group_by_length"] is grouped
    assert "group_by_length against plain" in (work / "out" / "comparison.md").read_text()
