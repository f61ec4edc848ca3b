"""benchmarks/training_startup.py: adapt jobs in their own process and through the cell server, run
here on the CPU on the tiny model (on a GPU node: MODE=training_startup, benchmarks/device/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from d2lora.io import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_adapt_jobs_report_their_wall_time_and_train_the_same_adapter(tiny_model_dir, tmp_path):
    rows = [
        {"id": f"r{i}", "prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {i}."}
        for i in range(6)
    ]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    out = tmp_path / "startup"
    hp = {"learning_rate": 5e-3, "epochs": 1, "scheduler": "constant", "batch_size": 2, "max_length": 128}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "training_startup.py"),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "data"),
            "--hp",
            json.dumps(hp),
            "--lora",
            json.dumps({"rank": 4, "alpha": 8}),
            "--rows",
            "4",
            "--jobs",
            "2",
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
    assert summary["adapters_identical"] and summary["rows"] == 4 and summary["device"] == "cpu"
    assert summary["own_jobs_adapters_identical"]
    losses = summary["train_loss"]["own"] + summary["train_loss"]["server"]
    assert len(losses) == 2 * summary["jobs"] and len(set(losses)) == 1 and losses[0] > 0
    for mode in ("own", "server"):
        walls, cells = summary["seconds"][mode], summary["in_cell_seconds"][mode]
        assert len(walls) == len(cells) == 2
        for wall, cell in zip(walls, cells):
            assert 0 < cell["train_seconds"] and cell["trainer_setup_seconds"] + cell["train_seconds"] < wall
    assert set(summary["mean_jobs_2_to_n"]) == {"own", "server"}
    # the server's jobs were served by one process: its log has both cells
    (server_log,) = (out / "server_logs").glob("*.log")
    assert server_log.read_text().count("done in") == 2
