"""The benchmark catalog: each benchmark the grid evaluates, declared once.

A benchmark belongs to a task (the adaptation whose cells it scores), reads the `eval` split of one
data role, may be run by EleutherAI lm-eval under a task name of workflow/resources/lm_eval/, and
reports metrics. A metric has its name in the metrics table, the key in scores.json it comes from
(and the scale from there to the report's unit), the per-example field of predictions.jsonl the
statistics resample (and its scale), whether that field is 0/1 (McNemar applies), and its label.
The grid, the workflow's rules, the metrics table, the statistics, the figures and the lm-eval
backend all read these entries (docs/benchmarks.md: adding one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # in metrics.tsv and the config's experiments.<name>.metric
    score_key: str  # in scores.json
    score_scale: float  # scores.json value -> the metrics table's unit
    example_field: str  # per-example field of predictions.jsonl
    example_scale: float  # per-example value -> the metrics table's unit
    binary: bool  # 0/1 per example
    label: str  # axis label of the figures


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str  # the task whose cells it evaluates
    role: str  # the data role whose eval split it reads
    lm_eval_task: str | None  # lm-eval task name (workflow/resources/lm_eval/<name>.yaml); None: ours only
    metrics: tuple[Metric, ...]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "gsm8k",
            task="math",
            role="math",
            lm_eval_task="d2lora_gsm8k",
            metrics=(Metric("gsm8k_accuracy", "accuracy", 100.0, "correct", 100.0, True, "GSM8K accuracy (%)"),),
        ),
        Benchmark(
            "arc_easy",
            task="math",
            role="forgetting",
            lm_eval_task="d2lora_arc_easy",
            metrics=(
                Metric("arc_easy_accuracy", "accuracy", 100.0, "correct", 100.0, True, "ARC-Easy accuracy (%)"),
                Metric(
                    "arc_easy_accuracy_norm",
                    "accuracy_norm",
                    100.0,
                    "correct_norm",
                    100.0,
                    True,
                    "ARC-Easy accuracy, length-normalised (%)",
                ),
            ),
        ),
        Benchmark(
            "titles",
            task="titles",
            role="titles",
            lm_eval_task=None,
            metrics=(
                Metric("rouge1", "rouge1", 1.0, "rouge1", 100.0, False, "ROUGE-1"),
                Metric("rouge2", "rouge2", 1.0, "rouge2", 100.0, False, "ROUGE-2"),
                Metric("rougeL", "rougeL", 1.0, "rougeL", 100.0, False, "ROUGE-L"),
            ),
        ),
    )
}

# metric name -> (its benchmark, the metric)
METRICS: dict[str, tuple[Benchmark, Metric]] = {m.name: (b, m) for b in BENCHMARKS.values() for m in b.metrics}


def benchmark_of_metric(metric: str) -> str:
    return METRICS[metric][0].name


def eval_roles() -> dict[str, str]:
    """benchmark -> the data role whose eval split it reads."""
    return {name: b.role for name, b in BENCHMARKS.items()}
