"""Determinism: the same config on CPU gives byte-identical results across two runs.

Two separate processes (different PYTHONHASHSEED, so set and dict-of-set orders differ) each run
prepare -> train -> evaluate -> collect_metrics (tests/reliability_entry.py `chain`: a tiny math
grid, SFT with LoRA dropout, checkpointing on); metrics.tsv, the adapter weights, the prepared
data and the per-example predictions must be byte-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "reliability_entry.py"
SAME_BYTES = [
    "metrics/metrics.tsv",
    "data/math/train.jsonl",
    "data/math/eval.jsonl",
    "adapters/math/sft/lora/n4/s0/adapter_model.safetensors",
    "eval/gsm8k/math/sft/lora/n4/s0/predictions.jsonl",
    "eval/gsm8k/math/none/lora/n0/s0/predictions.jsonl",
]


def test_two_runs_give_byte_identical_metrics(tiny_model_dir, tmp_path):
    procs = []
    for run, hash_seed in (("a", "1"), ("b", "2")):
        env = dict(
            os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO / "src")
        )
        kwargs = {"model_dir": str(tiny_model_dir), "out": str(tmp_path / run)}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ENTRY), "chain", json.dumps(kwargs)],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    for rel in SAME_BYTES:
        a, b = (tmp_path / run / rel for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), rel
    metrics = (tmp_path / "a" / "metrics" / "metrics.tsv").read_text().splitlines()
    assert metrics[0] == "task\tmethod\tinit\tn\tseed\tmetric\tvalue" and len(metrics) == 3
