"""benchmarks/run_mini.py's summary: jobs done of planned and the wall clock read from Snakemake's
log (so a run cut off midway still reports them), and the GSM8K evaluations' mean time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_mini", REPO / "benchmarks" / "run_mini.py")
run_mini = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_mini)

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
LOG = """Assuming unrestricted shared filesystem usage.
[Tue Dec  1 22:56:20 2026]
localrule prepare_data:
1 of 5 steps (20%) done
[Tue Dec  1 22:58:05 2026]
Finished jobid: 3 (Rule: evaluate)
2 of 5 steps (40%) done
[Tue Dec  1 23:01:20 2026]
3 of 5 steps (60%) done
"""


def _bench(results: Path, rule: str, job: str, seconds: float) -> None:
    path = results / "benchmarks" / rule / f"{job}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCH_HEADER + f"{seconds}\t0:00:{int(seconds):02d}\t900\t0\t0\t0\t0\t0\t0\t0\n")


def _run(tmp_path: Path, wall: dict | None):
    results, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    (out / "snakemake.log").write_text(LOG)
    (out / "device.json").write_text(json.dumps({"cuda": True, "name": "NVIDIA H200", "bf16_matmul_flops": 7.94e14}))
    if wall:
        (out / "workflow_wall.json").write_text(json.dumps(wall))
    _bench(results, "prepare_data", "titles", 1.5)
    for cell, seconds in (("math/sft/lora/n100/s0", 60.0), ("math/none/lora/n0/s0", 80.0)):
        _bench(results, "evaluate", f"gsm8k/{cell}", seconds)
        scores = results / "eval" / "gsm8k" / cell / "scores.json"
        scores.parent.mkdir(parents=True)
        scores.write_text(json.dumps({"n_items": 1319, "items_per_second": 20.0}))
    _bench(results, "evaluate", "arc_easy/math/none/lora/n0/s0", 30.0)
    run_mini.write_table(results, out)
    return json.loads((out / "summary.json").read_text())


def test_summary_of_a_run_cut_off_midway_comes_from_the_log(tmp_path):
    summary = _run(tmp_path, wall=None)
    assert (summary["jobs_done"], summary["jobs_total"], summary["finished"]) == (3, 5, False)
    assert summary["grid_wall_s"] == 300.0  # 22:56:20 -> 23:01:20
    assert summary["gpu"] == "NVIDIA H200" and summary["bf16_matmul_tflops"] == 794.0
    assert (summary["gsm8k_items"], summary["gsm8k_eval_jobs"], summary["gsm8k_eval_s_mean"]) == (1319, 2, 70.0)
    assert summary["job_seconds_by_rule"] == {"evaluate": 170.0, "prepare_data": 1.5}


def test_summary_of_a_finished_run_takes_the_workflow_wall_clock(tmp_path):
    summary = _run(tmp_path, wall={"wall_seconds": 972.2, "exit_code": 0})
    assert summary["finished"] is True and summary["grid_wall_s"] == 972.2
