"""Evaluate one grid cell on one benchmark: load base (+ adapter), score, write per-example rows."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from d2lora.io import read_jsonl, sha256_file, write_json, write_jsonl
from d2lora.models import load_model, load_tokenizer


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def score_benchmark(benchmark: str, model, tokenizer, rows: list[dict], settings: dict):
    if benchmark == "gsm8k":
        from d2lora.evaluation.math_eval import evaluate_math

        return evaluate_math(model, tokenizer, rows, settings["prompt_template"], settings["max_new_tokens"],
                             settings["batch_size"])
    if benchmark == "titles":
        from d2lora.evaluation.titles_eval import evaluate_titles

        return evaluate_titles(model, tokenizer, rows, settings["max_new_tokens"], settings["batch_size"])
    if benchmark == "arc_easy":
        from d2lora.evaluation.multiple_choice import evaluate_multiple_choice

        return evaluate_multiple_choice(model, tokenizer, rows, settings["batch_size"])
    raise ValueError(f"unknown benchmark '{benchmark}' (known: gsm8k, titles, arc_easy)")


def evaluate_cell(benchmark: str, cell: dict, model_dir, adapter_dir, data_dir, settings: dict, scores_path,
                  predictions_path, device: str = "auto") -> dict:
    device = _device(device)
    eval_path = Path(data_dir) / "eval.jsonl"
    rows = read_jsonl(eval_path)
    # Left padding: generation appends new tokens on the right of every row in a batch.
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_model(model_dir, dtype=settings.get("dtype", "float32"), device=device, adapter_dir=adapter_dir)
    model.eval()
    print(f"evaluate: {benchmark} on {len(rows)} items, adapter={adapter_dir}, device={device}", file=sys.stderr)
    start = time.perf_counter()
    per_example, scores = score_benchmark(benchmark, model, tokenizer, rows, settings)
    seconds = time.perf_counter() - start
    write_jsonl(predictions_path, per_example)
    record = {
        "task": cell["task"],
        "benchmark": benchmark,
        "method": cell["method"],
        "init": cell["init"],
        "n": int(cell["n"]),
        "seed": int(cell["seed"]),
        "metrics": {k: v for k, v in scores.items() if k != "n_items"},
        "n_items": scores.get("n_items", len(per_example)),
        "predictions": str(predictions_path),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "eval_data_sha256": sha256_file(eval_path),
        "settings": settings,
        "eval_seconds": round(seconds, 3),
        "device": device,
    }
    write_json(scores_path, record)
    return record
