"""On-policy negatives: math preference pairs built from the base model's own wrong solutions.

The SPEC's stand-in for Math-Step-DPO-10K where that set is absent: GSM8K train questions with
the reference solution as *chosen* and a solution SAMPLED FROM THE BASE MODEL whose final answer
is wrong as *rejected* -- the way Step-DPO collects its negatives (from the model being trained,
so the preference is about the model's own mistakes, not about text it would never write).

Config (a math `train` source):
    {source: onpolicy, from: <a gsm8k source, e.g. local ../shared/data/gsm8k/train.jsonl>,
     samples: 4, temperature: 0.8, top_p: 0.95, max_new_tokens: 384, batch_size: 256}
The workflow's `sample_negatives` rule runs `sample_negatives` below on the cached base model and
writes raw rows {id, question, answer (GSM8K's solution), rejected, rejected_answer, round}; the
math data is then prepared from that file as a local source of format `gsm8k_onpolicy`.

Per question, up to `samples` rounds: each round samples one solution for every question that
has no negative yet; the first solution with an extractable final answer that differs from the
reference becomes the rejected answer. Questions whose samples were all right (or had no
answer) are dropped, and the manifest counts them. Sampling is seeded (torch's generator is
reset to a value derived from `seed` and the round before each round), so a rerun on the same
hardware, batch size and library versions gives the same file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from d2lora.data.formats import to_canonical
from d2lora.data.mapping import fill_template
from d2lora.data.sources import load_raw, source_format, source_name, source_origin
from d2lora.evaluation.answers import answers_match, extract_with_rule
from d2lora.evaluation.generation import (
    decode_new_tokens,
    encode_chat_prompts,
    left_pad,
    log_progress,
    longest_first_batches,
    model_device,
    stop_token_ids,
)
from d2lora.io import sha256_file, write_json, write_jsonl
from d2lora.models import load_model, load_tokenizer, resolve_device
from d2lora.precision import resolve_dtype

ONPOLICY_DEFAULTS = {"samples": 4, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 384, "batch_size": 64}
OUTPUT_FORMAT = "gsm8k_onpolicy"


def onpolicy_settings(source_cfg: dict) -> dict:
    if source_cfg.get("source") != "onpolicy":
        raise ValueError(f"not an onpolicy source: {source_cfg!r}")
    base = source_cfg.get("from")
    if not isinstance(base, dict) or base.get("source") not in ("local", "hub"):
        raise ValueError("onpolicy source: 'from' must be a local or hub source of GSM8K-format rows")
    if source_format(base) != "gsm8k":
        raise ValueError(f"onpolicy source: 'from' must have format gsm8k, got {source_format(base)!r}")
    settings = {**ONPOLICY_DEFAULTS, **{k: source_cfg[k] for k in ONPOLICY_DEFAULTS if k in source_cfg}}
    if int(settings["samples"]) < 1:
        raise ValueError("onpolicy source: 'samples' must be >= 1")
    return settings


def sampling_config(max_new_tokens: int, temperature: float, top_p: float, eos_ids: list[int], pad_id: int):
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=0,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


def sample_generate(model, tokenizer, user_prompts: Sequence[str], settings: dict, seed: int) -> list[str]:
    """One sampled completion per prompt (a chat user turn), in the order given."""
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    if not user_prompts:
        return []
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(model, tokenizer)
    config = sampling_config(settings["max_new_tokens"], settings["temperature"], settings["top_p"], eos_ids, pad_id)
    encoded = encode_chat_prompts(tokenizer, list(user_prompts))
    batches = longest_first_batches([len(ids) for ids in encoded], int(settings["batch_size"]))
    outputs: list[str | None] = [None] * len(user_prompts)
    torch.manual_seed(seed)
    model.eval()
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for number, batch in enumerate(batches, start=1):
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id, device)
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            new_tokens = generated[:, input_ids.shape[1] :].cpu()
            for row, index in enumerate(batch):
                outputs[index] = decode_new_tokens(tokenizer, new_tokens[row], eos_ids)
            done += len(batch)
            log_progress("sample-negatives", number, len(batches), done, len(user_prompts), started)
    return outputs  # type: ignore[return-value]


def round_seed(seed: int, round_index: int) -> int:
    return 1_000_003 * int(seed) + round_index


def find_negatives(questions: list[dict], generate, prompt_template: str | None, samples: int, seed: int):
    """(negative rows, stats) for canonical math_eval rows `questions` (id, question, answer).

    `generate(prompts, seed) -> texts` samples one solution per prompt; it is a parameter so the
    selection logic is tested without a model.
    """
    pending = list(range(len(questions)))
    found: dict[int, dict] = {}
    stats = {
        "questions": len(questions),
        "rounds": 0,
        "samples_drawn": 0,
        "correct_samples": 0,
        "unanswered_samples": 0,
    }
    for round_index in range(samples):
        if not pending:
            break
        prompts = [fill_template(prompt_template, "question", questions[i]["question"]) for i in pending]
        texts = generate(prompts, round_seed(seed, round_index))
        stats["rounds"] += 1
        stats["samples_drawn"] += len(texts)
        still = []
        for i, text in zip(pending, texts):
            answer, rule = extract_with_rule(text)
            if answer is None:
                stats["unanswered_samples"] += 1
                still.append(i)
            elif answers_match(answer, questions[i]["answer"]):
                stats["correct_samples"] += 1
                still.append(i)
            else:
                found[i] = {"rejected": text, "rejected_answer": answer, "rejected_rule": rule, "round": round_index}
        pending = still
    stats["pairs"] = len(found)
    stats["dropped_no_wrong_sample"] = len(pending)
    return found, stats


def sample_negatives(
    source_cfg: dict,
    model_dir,
    out_path,
    manifest_path,
    prompt_template: str | None,
    seed: int,
    device: str = "auto",
    dtype: str | None = "auto",
) -> dict:
    """Sample negatives for the `from` source's questions and write the raw pair file + manifest."""
    settings = onpolicy_settings(source_cfg)
    base = dict(source_cfg["from"])
    raw, files = load_raw(base, seed)
    name = source_name(base)
    # The gsm8k mapping validates every row (question, '#### <number>') and gives the final answer.
    questions = to_canonical(raw, "gsm8k", "math_eval", None, name, source_origin(base))
    device = resolve_device(device)
    precision = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_model(model_dir, dtype=precision.dtype, device=device)
    start = time.perf_counter()
    found, stats = find_negatives(
        questions,
        lambda prompts, s: sample_generate(model, tokenizer, prompts, settings, s),
        prompt_template,
        int(settings["samples"]),
        seed,
    )
    seconds = time.perf_counter() - start
    rows = []
    for i in sorted(found):
        raw_row = raw[i]
        rows.append(
            {
                "id": questions[i]["id"],
                "question": raw_row["question"],
                "answer": raw_row["answer"],
                "reference_answer": questions[i]["answer"],
                **found[i],
            }
        )
    if not rows:
        raise RuntimeError(f"sample_negatives: no wrong sample for any of {len(questions)} questions")
    write_jsonl(out_path, rows)
    manifest = {
        "function": "d2lora.data.onpolicy.sample_negatives",
        "config": source_cfg,
        "settings": settings,
        "seed": seed,
        "seed_rule": "torch.manual_seed(1_000_003 * seed + round) before each round",
        "prompt_template": prompt_template,
        "model": str(model_dir),
        "model_source": _model_record(model_dir),
        "device": device,
        "dtype": precision.dtype,
        "precision": precision.record(),
        "source_files": [{"path": str(path), "sha256": sha256_file(path)} for path in files],
        "output": {"path": str(out_path), "sha256": sha256_file(out_path), "rows": len(rows), "format": OUTPUT_FORMAT},
        "stats": stats,
        "seconds": round(seconds, 3),
    }
    write_json(manifest_path, manifest)
    print(f"sample_negatives: {stats}", file=sys.stderr)
    return manifest


def _model_record(model_dir) -> dict | None:
    path = Path(model_dir) / "source.json"
    if not path.is_file():
        return None

    return json.loads(path.read_text(encoding="utf-8"))


def as_local_source(source_cfg: dict, out_path: str | os.PathLike) -> dict:
    """The local source the math data are prepared from once `sample_negatives` has run."""
    return {"source": "local", "data_files": str(out_path), "format": OUTPUT_FORMAT}
