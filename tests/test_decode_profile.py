"""benchmarks/decode_profile.py: torch.profiler over GSM8K decoding steps, run here on the CPU on
the tiny model (the 8B run happens on a GPU node: benchmarks/device/paper_scale.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from d2lora.io import write_jsonl

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A train travels 60 miles an hour for 2 hours, then 40 miles an hour for 3 hours. How far does it go in all?",
    "What is 7 times 8?",
]


@pytest.mark.parametrize("gqa", ["packed", "native"])
def test_profile_covers_only_the_decoding_steps(tiny_model_dir, tmp_path, gqa):
    write_jsonl(
        tmp_path / "data" / "eval.jsonl",
        [{"id": str(i), "question": q, "answer": "0"} for i, q in enumerate(QUESTIONS)],
    )
    out = tmp_path / "profile"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "decode_profile.py"),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tmp_path / "data"),
            "--rows",
            "2",
            "--new-tokens",
            "16",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--timed-steps",
            "2",
            "--device",
            "cpu",
            "--gqa",
            gqa,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 2 and summary["gqa"] == gqa
    assert summary["cache_length"] == summary["prompt_width"] + 16
    calls = {op["op"]: op["calls_per_step"] for op in summary["top_operators"]}
    # Per step: 7 projections in each of 2 layers and the output layer, one attention per layer. The
    # prefill (and the warm-up steps) ran outside the profiler, or the counts would be higher.
    assert calls["aten::mm"] == 2 * 7 + 1, calls
    attention = [count for op, count in calls.items() if "scaled_dot_product" in op]
    assert attention and all(count == 2 for count in attention), calls
    assert summary["step_seconds"] > 0 and (out / "profile.txt").read_text().strip()


def test_random_init_shape_needs_no_model_files(tmp_path):
    """--random-init draws a config's random_init model in memory (the 8B shape on a GPU node)."""
    import yaml
    from conftest import SMOL_GGUF, TINY_ARCH

    config = tmp_path / "shape.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "source": "random_init",
                    "architecture": TINY_ARCH,
                    "tokenizer": SMOL_GGUF,
                    "init_device": "cpu",
                }
            }
        )
    )
    data = tmp_path / "test.jsonl"
    write_jsonl(data, [{"id": str(i), "question": q, "answer": "0"} for i, q in enumerate(QUESTIONS)])
    out = tmp_path / "profile"
    arguments = ["--data", str(data), "--rows", "3", "--new-tokens", "8", "--warmup", "1", "--steps", "2"]
    arguments += ["--timed-steps", "2", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "decode_profile.py"), "--random-init", str(config), *arguments],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 3 and summary["cache_length"] == summary["prompt_width"] + 8
    wrong = tmp_path / "hub.yaml"
    wrong.write_text(yaml.safe_dump({"model": {"source": "hub", "id": "x/y"}}))
    refused = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "decode_profile.py"), "--random-init", str(wrong), *arguments],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "not random_init" in refused.stderr
