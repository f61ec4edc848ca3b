"""End to end: the init axis through the real workflow (tiny random model, CPU).

The tiny preset plus variants: PiSSA with and without its own warm-up (a residual base), EVA
(data-driven init from the cell's rows), AdaLoRA and Dynamic LoRA at the LoRA budget. Every cell
must train, save, evaluate through the plain evaluation code, and reach the figures, the
significance table (a PiSSA pair besides LoRA/D2LoRA) and the cost table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INITS = ["lora", "d2lora", "pissa", "d2lora_pissa", "eva", "adalora", "dynamic"]

pytestmark = pytest.mark.slow


def _variants_config(path: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["run_name"] = "tiny_variants"
    config["variants"] = {
        "pissa": {"init_lora_weights": "pissa", "label": "PiSSA"},
        "d2lora_pissa": {"init_lora_weights": "pissa", "warmup": True, "label": "D2LoRA+PiSSA"},
        "eva": {"init_lora_weights": "eva", "calibration_rows": 2},
        "adalora": {"adapter": "adalora", "label": "AdaLoRA"},
        "dynamic": {"adapter": "dynamic", "label": "Dynamic LoRA", "options": {"reallocations": 2}},
    }
    small = {"methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 2]}
    config["experiments"] = {
        "figure1": {"task": "math", "metric": "gsm8k_accuracy", "panels": "none", **small, "inits": ["lora"], "n": [2]},
        "figure2": {"task": "math", "metric": "gsm8k_accuracy", "panels": "method", **small},
        "table3": {"task": "math", "metric": "gsm8k_accuracy", **small},
        "figure3": {"task": "math", "metric": "arc_easy_accuracy", "panels": "method", **small},
        "figure4": {"task": "math", "metric": "gsm8k_accuracy", "panels": "method", **small, "n": [2]},
        # The init axis: every variant on the titles task, n = 0 and 2.
        "table1": {"task": "titles", "metric": "rougeL", "methods": ["sft"], "inits": INITS, "n": [0, 2]},
    }
    config["statistics"] = {"bootstrap_samples": 500, "comparisons": [["lora", "d2lora"], ["pissa", "d2lora_pissa"]]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("variants")
    for name in ("Snakefile", "workflow", "config", "report", "src", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    _variants_config(work / "config" / "variants_tiny.yaml")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "all", "--configfile", "config/variants_tiny.yaml"]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((work / "logs").rglob("*.log"))[-4:])
        pytest.fail(f"snakemake failed:\n{result.stderr[-6000:]}\n{logs}")
    return work


def test_every_variant_is_trained_evaluated_and_tabled(variants_run):
    metrics = pd.read_csv(variants_run / "results" / "metrics" / "metrics.tsv", sep="\t")
    titles = metrics[(metrics["task"] == "titles") & (metrics["metric"] == "rougeL")]
    assert sorted(set(titles["init"])) == sorted(INITS)
    assert sorted(set(titles[titles["init"] == "dynamic"]["n"])) == [0, 2]
    table1 = (variants_run / "results" / "tables" / "table1.md").read_text()
    assert "LoRA" in table1 and "D2LoRA" in table1


def test_pissa_warmup_trains_on_its_residual_base_and_adaptation_continues_there(variants_run):
    warm = variants_run / "results" / "warmup" / "d2lora_pissa" / "adapter"
    record = json.loads((warm / "training.json").read_text())
    assert record["variant"]["init_lora_weights"] == "pissa"
    assert (warm / "residual").is_dir()
    adapted = variants_run / "results" / "adapters" / "titles" / "sft" / "d2lora_pissa" / "n2" / "s0"
    cell = json.loads((adapted / "training.json").read_text())
    assert cell["residual_base"] and cell["variant"]["warmup"] is True
    # The plain d2lora warm-up is a different adapter (peft's default init, no residual base).
    plain = json.loads((variants_run / "results" / "warmup" / "d2lora" / "adapter" / "training.json").read_text())
    assert plain["variant"]["init_lora_weights"] == "default"


def test_adaptive_adapters_keep_the_lora_budget(variants_run):
    lora = json.loads((variants_run / "results/adapters/titles/sft/lora/n2/s0/training.json").read_text())
    dynamic = json.loads((variants_run / "results/adapters/titles/sft/dynamic/n2/s0/training.json").read_text())
    report = dynamic["adapter"]
    assert report["adapter"] == "dynamic"
    assert report["total_rank"] == report["rank_budget"]
    assert report["lora_equivalent_parameters"] == lora["trainable_parameters"]
    adalora = json.loads((variants_run / "results/adapters/titles/sft/adalora/n2/s0/training.json").read_text())
    assert adalora["adapter"]["adapter"] == "adalora"
    assert adalora["adapter"]["lora_equivalent_parameters"] == lora["trainable_parameters"]


def test_significance_and_cost_tables_cover_the_variants(variants_run):
    significance = pd.read_csv(variants_run / "results" / "tables" / "significance.csv")
    pairs = {tuple(x) for x in significance[["a", "b"]].drop_duplicates().itertuples(index=False)}
    assert ("pissa", "d2lora_pissa") in pairs and ("lora", "d2lora") in pairs
    cost = pd.read_csv(variants_run / "results" / "metrics" / "cost.tsv", sep="\t")
    warm = cost[(cost["init"] == "d2lora_pissa") & (cost["n"] == 0)]
    assert len(warm) == 1 and warm["warmup_device_seconds"].iloc[0] > 0 and warm["train_device_seconds"].iloc[0] == 0
    # Two tasks start from the d2lora warm-up in this grid; each carries half of it.
    d2 = cost[cost["init"] == "d2lora"]
    warm_seconds = json.loads((variants_run / "results/warmup/d2lora/adapter/training.json").read_text())[
        "train_seconds"
    ]
    assert d2["warmup_device_seconds"].round(3).eq(round(warm_seconds / 2, 3)).all()
    assert (cost[cost["n"] > 0]["train_tokens"] > 0).all()
    assert (variants_run / "results" / "figures" / "score_vs_cost.png").stat().st_size > 1000


def test_every_result_verifies_against_its_manifest(variants_run):
    result = subprocess.run(
        [sys.executable, "-m", "d2lora.verify", "results"],
        cwd=variants_run,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(variants_run / "src"), "PATH": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
