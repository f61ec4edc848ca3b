"""Where a GSM8K decoding step goes: torch.profiler over a few greedy decoding steps of one batch,
eager, with the static KV cache and the packed-GQA attention (`evaluation.gsm8k.cache: static`,
`packed_gqa: true`; the compiled step runs the same kernels, fused and replayed as CUDA graphs), or
with `--gqa native` SDPA's enable_gqa (`native_gqa: true`), or transformers' own attention.

    python benchmarks/decode_profile.py --model benchmarks/results_paper_scale/work/model/base \
        --data benchmarks/results_paper_scale/work/data/math --rows 440 --out benchmarks/out/decode_profile
    python benchmarks/decode_profile.py --random-init config/paper_shape.yaml \
        --data ../shared/data/gsm8k/test.jsonl --rows 440     # the 8B shape drawn on the GPU, no files

The prompts are the eval set's longest first (as the evaluator batches them), left-padded to the
set's longest prompt, and the cache is as long as that plus `--new-tokens`, as in the evaluator.
The prefill and `--warmup` steps run outside the profiler; only `--steps` decoding steps are
profiled, so the table is the decoding step alone. Writes profile.txt (operators by GPU time) and
summary.json (the unprofiled step time, GPU time and calls per operator a step, and what a step must
at least move and compute: the weights, the static KV cache, the matmuls' FLOPs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a prepared base model folder")
    source.add_argument(
        "--random-init",
        type=Path,
        metavar="CONFIG",
        help="a config whose model is random_init (config/paper_shape.yaml): drawn in memory in bf16 "
        "where its init_device says, nothing written",
    )
    parser.add_argument("--data", required=True, help="a prepared data folder with eval.jsonl, or a GSM8K-style jsonl")
    parser.add_argument("--rows", type=int, default=440)
    parser.add_argument("--new-tokens", type=int, default=256, help="the cache's room for new tokens")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timed-steps", type=int, default=32, help="unprofiled steps for the step time")
    parser.add_argument(
        "--prompt-template",
        default="{question} Please reason step by step, and put your final answer within \\boxed{}.",
    )
    parser.add_argument(
        "--gqa",
        choices=["packed", "native", "transformers"],
        default="packed",
        help="attention over the grouped KV heads: packed_gqa, native_gqa, or transformers' own",
    )
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on a tiny model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "decode_profile")
    args = parser.parse_args()
    if args.warmup + args.steps + args.timed_steps >= args.new_tokens:
        parser.error("--warmup + --steps + --timed-steps must stay under --new-tokens")

    import torch
    import yaml
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    from d2lora.evaluation.generation import encode_chat_prompts, left_pad
    from d2lora.evaluation.math_eval import render_math_prompt
    from d2lora.evaluation.packed_gqa import decoding_attention
    from d2lora.cost import parameter_count, synchronize
    from d2lora.io import read_jsonl
    from d2lora.models import load_model, load_tokenizer, random_init_model

    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"

    if args.model:
        tokenizer = load_tokenizer(args.model, padding_side="left")
        model = load_model(args.model, dtype="bfloat16", device=args.device).eval()
    else:
        model_cfg = yaml.safe_load(args.random_init.read_text())["model"]
        if model_cfg.get("source") != "random_init":
            parser.error(f"--random-init: {args.random_init}'s model.source is not random_init")
        model, tokenizer = random_init_model(model_cfg, torch.bfloat16)
        model = model.to(args.device).eval()
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        tokenizer.padding_side = "left"
    data = Path(args.data)
    rows = read_jsonl(data / "eval.jsonl" if data.is_dir() else data)
    prompts = [render_math_prompt(args.prompt_template, row["question"]) for row in rows]
    encoded = sorted(encode_chat_prompts(tokenizer, prompts), key=len, reverse=True)
    width = len(encoded[0])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask = left_pad(encoded[: args.rows], pad_id, args.device, width=width)
    cache = StaticCache(config=model.config, max_cache_len=width + args.new_tokens)
    position = 0

    def step(ids):
        nonlocal mask, position
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            cache_position=torch.arange(position, position + ids.shape[1], device=args.device),
            use_cache=True,
            logits_to_keep=1,  # as generate: a prefill's logits for every position are 26 GB at 440 x 235
        )
        position += ids.shape[1]
        following = out.logits[:, -1].float().argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        return following

    with torch.inference_mode(), decoding_attention(model, gqa=args.gqa):
        following = step(input_ids)  # the prefill
        for _ in range(args.warmup):
            following = step(following)
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(args.timed_steps):
            following = step(following)
        synchronize(args.device)
        step_seconds = (time.perf_counter() - start) / args.timed_steps
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            for _ in range(args.steps):
                following = step(following)
            synchronize(args.device)

    averages = prof.key_averages()
    table = averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)
    (args.out / "profile.txt").write_text(table + "\n")
    per_op = sorted(
        (
            (
                e.key,
                (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / args.steps,
                e.count // args.steps,
            )
            for e in averages
        ),
        key=lambda item: -item[1],
    )
    if cuda:
        # Device-side events only, as the table's "Self CUDA time total": an operator's row repeats
        # the time of the kernels it launched, so summing every row counts it twice.
        from torch.autograd import DeviceType

        busy = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e6 / args.steps
    else:
        busy = sum(seconds for _, seconds, _ in per_op)
    parameters = parameter_count(model)
    config = model.config
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    summary = {
        "device": torch.cuda.get_device_properties(0).name if cuda else "cpu",
        "rows": args.rows,
        "gqa": args.gqa,
        "prompt_width": width,
        "cache_length": width + args.new_tokens,
        "step_seconds": round(step_seconds, 5),
        "busy_seconds_per_step": round(busy, 5),
        "top_operators": [
            {"op": name, "seconds_per_step": round(seconds, 6), "calls_per_step": calls}
            for name, seconds, calls in per_op[:25]
        ],
        # What one step has to do at least: every weight read once, the whole static cache read once.
        "weights_gb": round(parameters * 2 / 1e9, 2),
        "kv_cache_gb": round(args.rows * (width + args.new_tokens) * kv_bytes_per_token / 1e9, 2),
        "matmul_tflop_per_step": round(2 * parameters * args.rows / 1e12, 2),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(json.dumps({k: v for k, v in summary.items() if k != "top_operators"}, indent=2))


if __name__ == "__main__":
    main()
