"""Evaluate one grid cell on one benchmark: load base (+ adapter), score, write per-example rows."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from d2lora.cost import peak_memory_mb, reset_peak_memory, synchronize
from d2lora.evaluation import lm_eval_backend
from d2lora.evaluation.lm_eval_backend import SUPPORTED
from d2lora.evaluation.math_eval import evaluate_math
from d2lora.evaluation.multiple_choice import evaluate_multiple_choice
from d2lora.evaluation.partial import PartialResults, eval_fingerprint, sidecar_path
from d2lora.evaluation.titles_eval import evaluate_titles
from d2lora.io import read_jsonl, sha256_file, write_json, write_jsonl
from d2lora.manifests import MANIFEST_NAME, build_manifest, write_manifest
from d2lora.models import load_model, load_tokenizer, resolve_device
from d2lora.precision import resolve_dtype
from d2lora.settings import Decoding, defaults

# What the evaluate rule adds to a benchmark's own block (evaluation.<benchmark>): the evaluation
# block's dtype, engine and merge_adapter, GSM8K's prompt template, lm-eval's task templates.
CELL_KEYS = ("dtype", "engine", "merge_adapter", "prompt_template", "lm_eval_templates")


def decoding(benchmark: str, settings: dict) -> Decoding:
    """The benchmark's own settings (evaluation.<benchmark>, the schema's defaults filled in)."""
    block = {key: value for key, value in settings.items() if key not in CELL_KEYS}
    return Decoding.of(block, f"evaluation.{benchmark}", f"evaluation/{benchmark}")


def _gsm8k(model, tokenizer, rows: list[dict], settings: dict, partial):
    gsm8k = decoding("gsm8k", settings)
    return evaluate_math(
        model,
        tokenizer,
        rows,
        settings["prompt_template"],
        gsm8k.max_new_tokens,
        gsm8k.batch_size,
        partial=partial,
        cache=gsm8k.cache,
        compile=gsm8k.compile,
        rows_leave_every=gsm8k.rows_leave_every,
        packed_gqa=gsm8k.packed_gqa,
        filled_cache_only=gsm8k.filled_cache_only,
        native_gqa=gsm8k.native_gqa,
        prompt_width=gsm8k.prompt_width,
        cudnn_attention=gsm8k.cudnn_attention,
        flex_attention=gsm8k.flex_attention,
    )


def _titles(model, tokenizer, rows: list[dict], settings: dict, partial):
    titles = decoding("titles", settings)
    return evaluate_titles(model, tokenizer, rows, titles.max_new_tokens, titles.batch_size, partial=partial)


def _arc_easy(model, tokenizer, rows: list[dict], settings: dict, partial):
    return evaluate_multiple_choice(model, tokenizer, rows, decoding("arc_easy", settings).batch_size, partial=partial)


# One evaluator per entry of the benchmark catalog (d2lora.benchmarks; tests/test_benchmarks.py checks
# both name the same benchmarks): (model, tokenizer, eval rows, the evaluate rule's settings, partial
# results or None) -> (per-example records, summary scores).
EVALUATORS = {"gsm8k": _gsm8k, "titles": _titles, "arc_easy": _arc_easy}


def score_benchmark(benchmark: str, model, tokenizer, rows: list[dict], settings: dict, partial=None):
    if benchmark not in EVALUATORS:
        raise ValueError(f"unknown benchmark '{benchmark}' (known: {', '.join(EVALUATORS)})")
    return EVALUATORS[benchmark](model, tokenizer, rows, settings, partial)


def engine_for(benchmark: str, engine: str) -> str:
    """Which evaluator produces this benchmark's number: `evaluation.engine`, where it can.

    lm-eval has tasks for GSM8K and ARC-Easy (workflow/resources/lm_eval/); titles (ROUGE) are
    always scored by our own evaluator.
    """
    if engine not in ("pipeline", "lm_eval"):
        raise ValueError(f"evaluation.engine must be 'pipeline' or 'lm_eval', got {engine!r}")
    return engine if engine == "pipeline" or benchmark in SUPPORTED else "pipeline"


def evaluate_cell(
    benchmark: str,
    *,
    cell: dict,
    model_dir,
    adapter_dir,
    data_dir,
    settings: dict,
    scores_path,
    predictions_path,
    device: str = "auto",
) -> dict:
    device = resolve_device(device)
    # The evaluation block's defaults (dtype, engine, merge_adapter) where a caller leaves them out.
    top_level = {key: value for key, value in defaults("evaluation").items() if key in CELL_KEYS}
    settings = {**top_level, **settings}
    precision = resolve_dtype(settings["dtype"], device)
    settings = {**settings, "dtype": precision.dtype}
    eval_path = Path(data_dir) / "eval.jsonl"
    rows = read_jsonl(eval_path)
    engine = engine_for(benchmark, settings["engine"])
    print(
        f"evaluate: {benchmark} on {len(rows)} items, adapter={adapter_dir}, device={device}, engine={engine}",
        file=sys.stderr,
    )
    reset_peak_memory(device)
    start = time.perf_counter()
    load_seconds = None  # lm-eval loads the model inside its own run
    if engine == "lm_eval":
        work_dir = Path(predictions_path).parent / "lm_eval"
        per_example, scores = lm_eval_backend.evaluate_with_lm_eval(
            benchmark, model_dir, adapter_dir, eval_path, rows, settings, work_dir, device
        )
        engine_version = lm_eval_backend.lm_eval_version()
    else:
        # Left padding: generation appends new tokens on the right of every row in a batch.
        tokenizer = load_tokenizer(model_dir, padding_side="left")
        model = load_model(
            model_dir,
            dtype=settings["dtype"],
            device=device,
            adapter_dir=adapter_dir,
            merge_adapter=bool(settings["merge_adapter"]),
        )
        model.eval()
        synchronize(device)
        load_seconds = time.perf_counter() - start
        # Finished batches go to a sidecar beside the outputs, so a killed job resumes (partial.py).
        partial = PartialResults(
            sidecar_path(predictions_path),
            eval_fingerprint(benchmark, settings, eval_path, model_dir, adapter_dir, device),
        )
        try:
            per_example, scores = score_benchmark(benchmark, model, tokenizer, rows, settings, partial=partial)
        finally:
            partial.close()
        engine_version = None
    synchronize(device)
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
        "engine": engine,
        "engine_version": engine_version,
        # Model load included: what the job held the device for, the cost a user pays per cell.
        "eval_seconds": round(seconds, 3),
        # Of which loading the tokenizer and the model (and merging the adapter): a job's start-up.
        "load_seconds": round(load_seconds, 3) if load_seconds is not None else None,
        "items_per_second": round(len(per_example) / seconds, 3) if seconds > 0 else None,
        "peak_gpu_memory_mb": peak_memory_mb(device),
        "device": device,
        "precision": precision.record(),
    }
    write_json(scores_path, record)
    _write_eval_manifest(record, cell, model_dir, adapter_dir, eval_path, scores_path, predictions_path, device)
    if engine != "lm_eval":
        partial.remove()
    return record


def _write_eval_manifest(
    record: dict, cell: dict, model_dir, adapter_dir, eval_path, scores_path, predictions_path, device: str
) -> None:
    """manifest.json beside scores.json: config hash, input and output sha256, versions, host, device."""
    out_dir = Path(scores_path).parent
    params = {
        "benchmark": record["benchmark"],
        **{k: record[k] for k in ("task", "method", "init", "n", "seed")},
        "settings": record["settings"],
        "engine": record["engine"],
        "precision": record["precision"],
    }
    outputs = [Path(scores_path).name, os.path.relpath(predictions_path, out_dir)]
    inputs = {"model": model_dir, "adapter": adapter_dir, "eval_data": eval_path}
    write_manifest(
        out_dir / MANIFEST_NAME, build_manifest("evaluation", inputs, out_dir, params, outputs, device=device)
    )
