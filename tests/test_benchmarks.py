"""The benchmark catalog (d2lora.benchmarks) agrees with everything that reads it or sits beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2lora import grid
from d2lora.benchmarks import BENCHMARKS, METRICS, benchmark_of_metric, eval_roles
from d2lora.data.prepare import ROLE_FORMS
from d2lora.evaluation.lm_eval_backend import TASK_NAMES, TEMPLATE_DIR
from d2lora.results.figures import METRIC_LABELS
from d2lora.results.metrics import BENCHMARK_METRICS
from d2lora.results.per_example import EXAMPLE_METRICS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def test_each_benchmark_reads_an_eval_split_of_a_known_role_and_scores_a_known_task():
    for name, bench in BENCHMARKS.items():
        assert "eval" in ROLE_FORMS[bench.role], name
        assert bench.task in grid.TASKS, name
    assert eval_roles() == {"gsm8k": "math", "arc_easy": "forgetting", "titles": "titles"}


def test_lm_eval_tasks_exist_as_templates():
    assert TASK_NAMES == {"gsm8k": "d2lora_gsm8k", "arc_easy": "d2lora_arc_easy"}
    for task in TASK_NAMES.values():
        assert (Path(TEMPLATE_DIR) / f"{task}.yaml").is_file(), task


def test_every_metric_the_schema_lets_an_experiment_plot_is_in_the_catalog():
    plotted = SCHEMA["$defs"]["experiment"]["properties"]["metric"]["enum"]
    assert set(plotted) <= set(METRICS)
    for metric in plotted:
        assert grid.TASK_OF_BENCHMARK[benchmark_of_metric(metric)] in grid.TASKS


def test_the_readers_derive_their_tables_from_the_catalog():
    assert set(METRIC_LABELS) == set(EXAMPLE_METRICS) == set(METRICS) == set(grid.BENCHMARK_OF_METRIC)
    assert set(BENCHMARK_METRICS) == set(BENCHMARKS)
    assert BENCHMARK_METRICS["titles"]["rougeL"] == ("rougeL", 1.0)  # scores.json already in 0-100
    assert EXAMPLE_METRICS["rougeL"].scale == 100.0 and not EXAMPLE_METRICS["rougeL"].binary  # per example 0-1
    assert EXAMPLE_METRICS["arc_easy_accuracy_norm"].field == "correct_norm"


def test_each_benchmark_has_one_evaluator_and_each_evaluator_a_benchmark():
    from d2lora.evaluation.run import EVALUATORS, score_benchmark

    assert set(EVALUATORS) == set(BENCHMARKS)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        score_benchmark("nope", None, None, [], {})
