"""The paper grid's GPU-hours from rates measured at the paper's shape (benchmarks/paper_scale.py).

Every training cell of config/paper.yaml's grid is n rows x epochs x tokens per row, at the tokens/s
its method ran at; every job also pays the measured per-job overhead (loading the base model,
building the trainer, saving the adapter) and, where its method's layers are compiled, the measured
compile, once per job rather than per token; every evaluation costs what the measured one of its
benchmark did.
Tokens per row come from the local stand-ins (the paper's hub sets are not on our machines), so
these are estimates: GSM8K-based pairs for Math-Step-DPO-10K, Alpaca for orpo-dpo-mix-40k (whose
replies are longer), arXiv abstracts for the economics titles.
"""

from __future__ import annotations

from d2lora import grid
from d2lora.settings import TrainingHparams

# The warm-up set's size in the paper (SPEC, config/paper.yaml): the hub copy is not here to count.
PAPER_WARMUP_ROWS = 40_218
PREFERENCE = ("dpo", "orpo")
# What a measured evaluation stands for, where its cost is a bound rather than an estimate.
EVALUATION_NOTES = {
    "gsm8k": "every answer max_new_tokens long (a random model never stops): an upper bound for trained models",
    "titles": "every title max_new_tokens long (a random model never stops): an upper bound for trained models",
}


def tokens_key(task: str, method: str) -> str:
    """Which stand-in's tokens per row a cell of (task, method) reads."""
    if task == "titles":
        return "titles_sft"
    return "math_preference" if method in PREFERENCE else "math_sft"


def _hours(seconds: float) -> float:
    return round(seconds / 3600.0, 3)


def _uncompiled_warmup_note(warmup_hp: dict) -> str | None:
    """Where the preset compiles the warm-up's layers (long enough for compile_layers_min_steps) but
    no measured rate had them compiled: say that its rate is the eager one. The warm-up stage trains
    a few dozen steps, under the threshold, and its short rows are unlike SFT's large cells."""
    hp = TrainingHparams.of(warmup_hp)
    steps = hp.optimizer_steps(PAPER_WARMUP_ROWS)
    if not hp.compiles_layers(steps):
        return None
    return (
        f"the preset compiles this job's layers ({steps:,} optimizer steps, compile_layers_min_steps="
        f"{hp.compile_layers_min_steps}); priced at the warm-up stage's rate, measured without them"
    )


def _training_groups(paper: dict, large_cells: dict[str, dict]) -> dict[tuple[str, str, bool], dict]:
    """Cells by (task, method, large): large where large_cells gives the method a rate for cells of at
    least its min_steps optimizer steps."""
    groups: dict[tuple[str, str, bool], dict] = {}
    for cell in grid.training_cells(paper):
        hp = paper["training"]["adapt"][cell.method]
        epochs = float(hp["epochs"])
        large = cell.method in large_cells and (
            TrainingHparams.of(hp).optimizer_steps(cell.n) >= large_cells[cell.method]["min_steps"]
        )
        group = groups.setdefault((cell.task, cell.method, large), {"cells": 0, "rows_x_epochs": 0.0, "n": set()})
        group["cells"] += 1
        group["rows_x_epochs"] += cell.n * epochs
        group["n"].add(cell.n)
    return groups


def estimate(
    paper: dict,
    rates: dict[str, float],
    tokens_per_row: dict[str, float],
    job_overhead_s: float | None,
    eval_seconds: dict[str, float],
    compile_seconds: dict[str, float] | None = None,
    large_cells: dict[str, dict] | None = None,
) -> dict:
    """GPU-hours of `paper`'s grid. rates: tokens/s per method (warmup, sft, dpo, orpo);
    tokens_per_row: per tokens_key and "warmup"; eval_seconds: one evaluation job's seconds per
    benchmark measured; compile_seconds: per method whose layers compile, a job's seconds beyond its
    compile-free rate (rates then being compile-free); large_cells: per adapt method, the rate
    ("tokens_per_second", compile-free) and a job's "compile_seconds" of its cells of at least
    "min_steps" optimizer steps, which the preset trains otherwise (compile_layers_min_steps); what
    is missing is listed, not guessed."""
    compile_seconds = compile_seconds or {}
    large_cells = large_cells or {}
    missing: list[str] = []
    parts: list[dict] = []

    def part(
        name: str, task: str, method: str, cells: int, rows_x_epochs: float, key: str, n=None, large=False
    ) -> None:
        entry = {
            "part": name,
            "task": task,
            "method": method,
            "cells": cells,
            "rows_x_epochs": rows_x_epochs,
            "tokens_per_row_from": key,
            "n": n,
        }
        rate_key = method if name != "warmup" else "warmup"
        per_row, rate = tokens_per_row.get(key), rates.get(rate_key)
        job_compile = compile_seconds.get(rate_key)
        if large:
            spec = large_cells[method]
            entry["large_cells"] = f"at least {spec['min_steps']} optimizer steps each"
            rate, job_compile = spec["tokens_per_second"], spec["compile_seconds"]
        if per_row is None or not rate:
            missing.append(
                f"{name} {task}/{method}: " + ("no tokens per row" if per_row is None else "no measured rate")
            )
        else:
            entry["tokens_per_row"] = round(per_row, 1)
            entry["tokens"] = int(round(rows_x_epochs * per_row))
            entry["tokens_per_second"] = round(rate, 1)
            seconds = entry["tokens"] / rate
            if job_compile is not None:
                entry["compile_seconds_per_job"] = round(job_compile, 1)
                seconds += cells * job_compile
            entry["gpu_hours"] = _hours(seconds)
        parts.append(entry)

    warm_jobs = len(grid.warm_inits(paper))
    if warm_jobs:
        epochs = float(paper["training"]["warmup"]["epochs"])
        part("warmup", "warmup", "sft", warm_jobs, warm_jobs * PAPER_WARMUP_ROWS * epochs, "warmup")
        note = _uncompiled_warmup_note(paper["training"]["warmup"])
        if note:
            parts[-1]["note"] = note
    for (task, method, large), group in sorted(_training_groups(paper, large_cells).items()):
        key = tokens_key(task, method)
        part("adapt", task, method, group["cells"], group["rows_x_epochs"], key, sorted(group["n"]), large)

    training_jobs = warm_jobs + len(grid.training_cells(paper))
    eval_counts: dict[str, int] = {}
    for benchmark, _ in grid.evaluation_jobs(paper):
        eval_counts[benchmark] = eval_counts.get(benchmark, 0) + 1
    overhead = {"jobs": training_jobs, "seconds_per_job": job_overhead_s}
    if job_overhead_s is None:
        missing.append("training job overhead: no training stage measured")
    else:
        overhead["gpu_hours"] = _hours(training_jobs * job_overhead_s)
    evaluations: dict[str, dict] = {}
    for benchmark, jobs in sorted(eval_counts.items()):
        seconds = eval_seconds.get(benchmark)
        entry = {"jobs": jobs, "seconds_per_job": seconds}
        if benchmark in EVALUATION_NOTES:
            entry["note"] = EVALUATION_NOTES[benchmark]
        if seconds is None:
            missing.append(f"{benchmark} evaluation: not measured")
        else:
            entry["gpu_hours"] = _hours(jobs * seconds)
        evaluations[benchmark] = entry

    known = [p["gpu_hours"] for p in parts if "gpu_hours" in p]
    known += [x["gpu_hours"] for x in (overhead, *evaluations.values()) if "gpu_hours" in x]
    return {
        "basis": (
            "estimates: config/paper.yaml's cells (n x epochs) x tokens per row of the LOCAL STAND-IN data "
            f"(warm-up: {PAPER_WARMUP_ROWS:,} rows, the paper's count) / the tokens per second measured here"
        ),
        "training": parts,
        "training_job_overhead": overhead,
        "evaluations": evaluations,
        "total_gpu_hours": round(sum(known), 2),
        "complete": not missing,
        "missing": missing,
    }
