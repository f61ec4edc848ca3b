"""Speed levers of evaluation and training, each measured against its plain version in one run.

    python benchmarks/speed.py --model results/model/base --gsm8k ../shared/data/gsm8k/test.jsonl \
        --train ../shared/data/gsm8k/train.jsonl --out benchmarks/out

Generation (GSM8K prompts of the mini preset, greedy, <= --max-new-tokens):
  bf16 batched, all items in one batch (the pipeline's setting) | bf16 + static KV cache
  (compiled decoding) | batch 1 (first --single items, extrapolated) | and on --fp32-items items
  with <= --subset-new-tokens: fp32 vs bf16, LoRA merged vs unmerged.
  Identical-output counts are reported for every pair.
Training (TRL SFT, LoRA r=16 on --train-rows GSM8K rows, one epoch, same effective batch 32 so the
  optimization is the same): TRL's defaults (batch 8 x 4 accumulation, gradient checkpointing on,
  fp32) | ours (batch 32, bf16, no checkpointing) | ours + group_by_length (less padding).
Prints a table and writes <out>/speed.json. Every phase has a time guard (--budget seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from d2lora.cost import (  # noqa: E402
    measure_matmul_peak,
    mfu,
    parameter_count,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
)
from d2lora.io import read_jsonl  # noqa: E402

PROMPT = "{question} Please reason step by step, and put your final answer within \\boxed{}."
LORA = {"rank": 16, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}


def gsm8k_prompts(path: Path) -> list[str]:
    return [PROMPT.replace("{question}", row["question"]) for row in read_jsonl(path)]


def timed_generation(model, tokenizer, prompts, max_new_tokens, batch_size, cache="dynamic", device="cuda"):
    from d2lora.evaluation.generation import greedy_generate

    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress_desc="speed", cache=cache)
    synchronize(device)
    seconds = time.perf_counter() - start
    return outputs, {
        "items": len(prompts),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(prompts) / seconds, 2),
        "peak_gpu_mb": peak_memory_mb(device),
    }


def generation_bench(args, device, results):
    from d2lora.models import load_model, load_tokenizer

    prompts = gsm8k_prompts(Path(args.gsm8k))[: args.items]
    tokenizer = load_tokenizer(args.model, padding_side="left")
    bf16 = load_model(args.model, dtype="bfloat16", device=device).eval()
    runs = results.setdefault("generation", {})
    reference, runs["bf16_batched"] = timed_generation(
        bf16, tokenizer, prompts, args.max_new_tokens, len(prompts), device=device
    )
    print("bf16 batched", runs["bf16_batched"], flush=True)
    single, runs["bf16_batch1"] = timed_generation(
        bf16, tokenizer, prompts[: args.single], args.max_new_tokens, 1, device=device
    )
    runs["bf16_batch1"]["identical_to_batched"] = sum(a == b for a, b in zip(single, reference))
    runs["bf16_batch1"]["extrapolated_seconds_all_items"] = round(
        runs["bf16_batch1"]["seconds"] / args.single * len(prompts), 1
    )
    print("bf16 batch 1", runs["bf16_batch1"], flush=True)
    if args.static:
        static, runs["bf16_static_cache"] = timed_generation(
            bf16, tokenizer, prompts, args.max_new_tokens, len(prompts), "static", device
        )
        runs["bf16_static_cache"]["identical_to_batched"] = sum(a == b for a, b in zip(static, reference))
        print("bf16 static", runs["bf16_static_cache"], flush=True)
    del bf16
    fp32 = load_model(args.model, dtype="float32", device=device).eval()
    sub = prompts[: args.fp32_items]
    tokens = args.subset_new_tokens
    fp32_out, runs["fp32_batched_subset"] = timed_generation(fp32, tokenizer, sub, tokens, len(sub), device=device)
    bf16_out, runs["bf16_batched_subset"] = timed_generation(
        load_model(args.model, dtype="bfloat16", device=device).eval(), tokenizer, sub, tokens, len(sub), device=device
    )
    runs["fp32_batched_subset"]["identical_to_bf16"] = sum(a == b for a, b in zip(fp32_out, bf16_out))
    print("fp32 vs bf16 subset", runs["fp32_batched_subset"], runs["bf16_batched_subset"], flush=True)
    del fp32
    # A LoRA adapter with non-zero B (as after training), unmerged vs merged into the weights.
    adapter_dir = Path(args.out) / "speed_adapter"
    if not adapter_dir.exists():
        import torch

        from d2lora.training.inits import fresh_adapter
        from d2lora.training.variants import BUILTIN_VARIANTS

        torch.manual_seed(0)
        peft_model = fresh_adapter(
            load_model(args.model, dtype="float32", device="cpu"), LORA, BUILTIN_VARIANTS["lora"]
        )
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    unmerged = load_model(args.model, dtype="bfloat16", device=device, adapter_dir=adapter_dir).eval()
    un_out, runs["bf16_lora_unmerged_subset"] = timed_generation(
        unmerged, tokenizer, sub, tokens, len(sub), device=device
    )
    del unmerged
    merged = load_model(args.model, dtype="bfloat16", device=device, adapter_dir=adapter_dir, merge_adapter=True).eval()
    me_out, runs["bf16_lora_merged_subset"] = timed_generation(merged, tokenizer, sub, tokens, len(sub), device=device)
    runs["bf16_lora_merged_subset"]["identical_to_unmerged"] = sum(a == b for a, b in zip(me_out, un_out))
    print("lora unmerged vs merged", runs["bf16_lora_unmerged_subset"], runs["bf16_lora_merged_subset"], flush=True)


def training_bench(args, device, results, peak_flops):
    from datasets import Dataset
    from transformers import set_seed

    from d2lora.cost import sequence_tokens
    from d2lora.models import load_model, load_tokenizer
    from d2lora.training.inits import fresh_adapter
    from d2lora.training.trainers import build_trainer, conversational
    from d2lora.training.variants import BUILTIN_VARIANTS

    # The reference solutions as SFT targets: what the mini preset's SFT cells train on, near enough
    # for timing (the preset boxes the final answer; the token counts barely differ).
    rows = [
        {"id": str(i), "prompt": PROMPT.replace("{question}", r["question"]), "chosen": r["answer"]}
        for i, r in enumerate(read_jsonl(Path(args.train))[: args.train_rows])
    ]
    dataset = Dataset.from_list(conversational(rows, "sft"))
    tokenizer = load_tokenizer(args.model)
    settings = {
        "trl_defaults": {"batch_size": 8, "grad_accum": 4, "bf16": False, "gradient_checkpointing": True},
        "ours": {"batch_size": 32, "grad_accum": 1, "bf16": True, "gradient_checkpointing": False},
        "ours_group_by_length": {
            "batch_size": 32,
            "grad_accum": 1,
            "bf16": True,
            "gradient_checkpointing": False,
            "group_by_length": True,
        },
    }
    runs = results.setdefault("training", {})
    for name, extra in settings.items():
        set_seed(0)
        model = fresh_adapter(load_model(args.model, dtype="float32", device=device), LORA, BUILTIN_VARIANTS["lora"])
        hp = {"learning_rate": 1e-4, "epochs": 1, "scheduler": "cosine", "max_length": 768, **extra}
        trainer = build_trainer(
            "sft",
            model,
            tokenizer,
            dataset,
            hp=hp,
            output_dir=str(Path(args.out) / f"trainer_{name}"),
            seed=0,
            use_cpu=device == "cpu",
        )
        tokens = sequence_tokens(trainer.train_dataset, hp["max_length"])
        reset_peak_memory(device)
        synchronize(device)
        start = time.perf_counter()
        trainer.train()
        synchronize(device)
        seconds = time.perf_counter() - start
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        params = parameter_count(model, trainable=False) + parameter_count(model, trainable=True)
        runs[name] = {
            "rows": len(rows),
            "seconds": round(seconds, 2),
            "samples_per_s": round(len(rows) / seconds, 1),
            "tokens_per_s": round(tokens / seconds),
            "mfu": mfu(params, tokens, seconds, peak_flops),
            "peak_gpu_mb": peak_memory_mb(device),
            "steps": len(losses),
            "loss_first": round(losses[0], 4),
            "loss_last5_mean": round(statistics.mean(losses[-5:]), 4),
            "loss_mean": round(statistics.mean(losses), 4),
        }
        print(name, runs[name], flush=True)
        del trainer, model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="results/model/base")
    parser.add_argument("--gsm8k", default="../shared/data/gsm8k/test.jsonl")
    parser.add_argument("--train", default="../shared/data/gsm8k/train.jsonl")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--items", type=int, default=1319)
    parser.add_argument("--single", type=int, default=4, help="items generated one at a time")
    parser.add_argument("--fp32-items", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument(
        "--subset-new-tokens",
        type=int,
        default=128,
        help="token limit of the subset comparisons (fp32 vs bf16, merged vs unmerged)",
    )
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--no-static", dest="static", action="store_false")
    parser.add_argument("--skip", choices=["generation", "training"], action="append", default=[])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from d2lora.models import resolve_device

    device = resolve_device(args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    peak = measure_matmul_peak(device) if device == "cuda" else None
    results = {"device": device, "bf16_matmul_flops": peak, "args": vars(args)}
    out_file = Path(args.out) / "speed.json"
    try:
        # Training first: it is quick on a GPU, and the generation runs are the ones a time limit cuts.
        if "training" not in args.skip:
            training_bench(args, device, results, peak)
        if "generation" not in args.skip:
            generation_bench(args, device, results)
    finally:
        out_file.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
