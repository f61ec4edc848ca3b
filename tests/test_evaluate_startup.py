"""benchmarks/evaluate_startup.py: evaluate jobs in their own process and through the cell server,
run here on the CPU on the tiny model (the 8B run happens on a GPU node: benchmarks/device/paper_scale.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from d2lora.io import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_jobs_report_their_wall_time_and_what_the_cell_spent_loading(tiny_model_dir, tmp_path):
    rows = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    write_jsonl(tmp_path / "data" / "eval.jsonl", rows)
    out = tmp_path / "startup"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "evaluate_startup.py"),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "data"),
            "--settings",
            json.dumps({"max_new_tokens": 4, "batch_size": 2, "prompt_template": "{question} Answer."}),
            "--jobs",
            "2",
            "--modes",
            "own,server,server_kept",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictions_identical"] and summary["items"] == 3
    for mode in ("own", "server", "server_kept"):
        walls, cells = summary["seconds"][mode], summary["in_cell_seconds"][mode]
        assert len(walls) == len(cells) == 2
        for wall, cell in zip(walls, cells):
            assert 0 < cell["load_seconds"] < cell["eval_seconds"] < wall
    assert set(summary["mean_jobs_2_to_n"]) == {"own", "server", "server_kept"}
    # the kept mode's first job read the checkpoint into host memory, its second built from it
    kept_logs = [(out / "server_kept" / f"job{i}" / "evaluate.log").read_text() for i in range(2)]
    assert "read into host memory" in kept_logs[0] and "read into host memory" not in kept_logs[1]
    assert all("built from the base weights kept in host memory" in log for log in kept_logs)
