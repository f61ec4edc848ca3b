"""Data of benchmarks/paper_scale.py: the roles prepared by the pipeline's own d2lora.data.prepare,
and the token count per row of each stand-in set (what the paper grid's estimate multiplies).

The math pairs are the config's on-policy source with the sampler replaced: a random-init model's
samples are noise that runs to max_new_tokens, so they would measure nothing about real lengths.
Each question's rejected answer is instead ANOTHER question's reference solution (rotated by one
in the file's order, by two in the next round where the final answers happened to agree), chosen
by the pipeline's own selection (d2lora.data.onpolicy.find_negatives: a different final answer)
and written in the file format the sample_negatives rule writes. Real text of real length on both
sides, standing in for Math-Step-DPO-10K's whole solutions; not a preference to learn from.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from d2lora import grid
from d2lora.data.formats import to_canonical
from d2lora.data.onpolicy import as_local_source, find_negatives, onpolicy_settings
from d2lora.data.prepare import prepare_role
from d2lora.data.sources import load_raw, source_name, source_origin
from d2lora.io import read_jsonl, sha256_file, write_json, write_jsonl

STANDIN_RULE = (
    "rejected = the reference solution (boxed, as chosen) of another question: question i gets "
    "question (i + round + 1) mod rows, kept by find_negatives when its final answer differs"
)


def standin_negatives(train_cfg: dict, prompt_template: str, seed: int, out_path: Path) -> dict:
    """Write the pair file sample_negatives would write, with other questions' solutions as negatives."""
    settings = onpolicy_settings(train_cfg)
    base = dict(train_cfg["from"])
    raw, files = load_raw(base, seed)
    name, origin = source_name(base), source_origin(base)
    questions = to_canonical(raw, "gsm8k", "math_eval", None, name, origin)
    pairs = to_canonical(raw, "gsm8k", "pairs", prompt_template, name, origin)
    position = {pair["prompt"]: i for i, pair in enumerate(pairs)}
    rounds = iter(range(int(settings["samples"])))

    def other_solutions(prompts: list[str], _seed: int) -> list[str]:
        shift = next(rounds) + 1
        return [pairs[(position[p] + shift) % len(pairs)]["chosen"] for p in prompts]

    found, stats = find_negatives(questions, other_solutions, prompt_template, int(settings["samples"]), seed)
    rows = [
        {
            "id": questions[i]["id"],
            "question": raw[i]["question"],
            "answer": raw[i]["answer"],
            "reference_answer": questions[i]["answer"],
            **found[i],
        }
        for i in sorted(found)
    ]
    if not rows:
        raise RuntimeError(f"stand-in negatives: no question of {origin} got one")
    write_jsonl(out_path, rows)
    manifest = {
        "function": "benchmarks/paper_scale_data.standin_negatives",
        "rule": STANDIN_RULE,
        "config": train_cfg,
        "seed": seed,
        "stats": stats,
        "rows": len(rows),
        "source_files": [{"path": str(p), "sha256": sha256_file(p)} for p in files],
    }
    write_json(out_path.with_suffix(".manifest.json"), manifest)
    return manifest


def prepare_data(config: dict, data_dir: Path) -> dict:
    """Prepare warmup, math (train + GSM8K eval), titles (train: its tokens per row; eval) and
    forgetting (ARC-Easy eval) into data_dir: every role a paper job reads."""
    seed = int(config["seed"])
    report: dict = {}
    for role in ("warmup", "math", "titles", "forgetting"):
        start = time.perf_counter()
        role_cfg = dict(config["datasets"][role])
        train = role_cfg.get("train") or {}
        if train.get("source") == "onpolicy":
            pairs = data_dir / "onpolicy" / role / "negatives.jsonl"
            report[f"{role}_negatives"] = standin_negatives(train, role_cfg.get("prompt_template"), seed, pairs)
            role_cfg["train"] = as_local_source(train, pairs)
        max_n = grid.max_n(config, role) if role in grid.TASKS else 0
        manifest = prepare_role(role, role_cfg, data_dir / role, seed, max_n=max_n)
        report[role] = {
            "counts": manifest["counts"],
            "seconds": round(time.perf_counter() - start, 3),
            "sources": {split: src["config"] for split, src in manifest["sources"].items()},
        }
        print(f"paper_scale: data {role}: {manifest['counts']}", file=sys.stderr, flush=True)
    return report


def _chat_lengths(tokenizer, rows: list[dict], answer: str, max_length: int) -> list[int]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[answer]}], tokenize=False
        )
        for r in rows
    ]
    return [min(len(ids), max_length) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokens_per_row(tokenizer, data_dir: Path, max_length: int) -> dict:
    """Mean tokens the policy reads per row of each prepared training set: prompt + chosen through
    the chat template (preference rows: + prompt + rejected), each capped at max_length."""

    def mean(role: str, preference: bool) -> float:
        rows = read_jsonl(data_dir / role / "train.jsonl")
        total = sum(_chat_lengths(tokenizer, rows, "chosen", max_length))
        if preference:
            total += sum(_chat_lengths(tokenizer, rows, "rejected", max_length))
        return round(total / len(rows), 2)

    return {
        "warmup": mean("warmup", False),
        "math_sft": mean("math", False),
        "math_preference": mean("math", True),
        "titles_sft": mean("titles", False),
        "max_length": max_length,
        "counted": "chat template of the prepared rows, SmolLM2's tokenizer (the stand-in's, not Llama 3's)",
    }
