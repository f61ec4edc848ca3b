"""How close greedy decoding's choices are to ties, for a trained model and the same architecture at
random init: why a random-weight model's GSM8K answers can differ between two runs of the same job.

    python benchmarks/greedy_margins.py --rows 32 --new-tokens 128 --out benchmarks/out/greedy_margins

Round 19 (benchmarks/RESULTS.md) saw the 8B-shape random-weight model's compiled GSM8K answers
differ between two processes, while the real SmolLM2-135M's compiled answers repeat bit for bit in a
fresh process (Round 21). Greedy decoding takes the largest logit; where the two largest are closer
than the rounding of a bf16 logit, any change in the order a kernel sums in (another kernel picked by
autotuning, another batch shape) can swap them, and from that token on the row's answer differs.

For `--config`'s model (a trained one; the test uses a tiny random one) and the same architecture
drawn at random (`--seed`, as `model.source: random_init` draws it), this decodes `--rows` GSM8K
prompts greedily in float32 (rendered and chat-templated as the evaluator does, left-padded batches
of `--batch-size`) and records, at every step of every unfinished row, the gap between the largest
and the second-largest logit in units of a bf16 ulp at the largest logit's magnitude. Then it decodes
the same prompts in bf16 twice, one row at a time and in batches, and counts the rows whose answers
differ: the direct effect of a different reduction order. Writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BF16_MANTISSA_BITS = 7


def bf16_ulp(value: float) -> float:
    """The spacing of bf16 numbers at |value| (the smallest normal's spacing for 0)."""
    magnitude = max(abs(value), 2.0**-126)
    return 2.0 ** (math.floor(math.log2(magnitude)) - BF16_MANTISSA_BITS)


def top2_margins_in_ulps(logits) -> list[float]:
    """Per row of a (rows, vocab) float tensor: (largest - second largest) / bf16 ulp at the largest."""
    import torch

    top = torch.topk(logits.float(), 2, dim=-1).values
    return [float(first - second) / bf16_ulp(float(first)) for first, second in top.tolist()]


def margin_summary(margins_by_row: list[list[float]], thresholds=(1.0, 4.0)) -> dict:
    """The steps' margins pooled, and per threshold the share of steps and of rows with a step below it."""
    steps = sorted(m for row in margins_by_row for m in row)
    if not steps:
        raise ValueError("no decoding steps to summarise")
    summary = {
        "rows": len(margins_by_row),
        "steps": len(steps),
        "median_margin_ulps": steps[len(steps) // 2],
        "p10_margin_ulps": steps[len(steps) // 10],
    }
    for t in thresholds:
        summary[f"share_of_steps_below_{t:g}_ulp"] = sum(m < t for m in steps) / len(steps)
        summary[f"share_of_rows_with_a_step_below_{t:g}_ulp"] = sum(
            any(m < t for m in row) for row in margins_by_row
        ) / len(margins_by_row)
    return summary


def float32_margins(model, tokenizer, prompt_ids: list[list[int]], new_tokens: int, batch_size: int):
    """Greedy float32 decoding; per row, the margin of each step up to and including its first stop token."""
    import torch

    from d2lora.evaluation.generation import greedy_config, left_pad, stop_token_ids

    stop_ids = stop_token_ids(model, tokenizer)
    stops = set(stop_ids)
    # the evaluator's own greedy settings (its sampling and stop tokens), with the logits kept
    config = greedy_config(new_tokens, stop_ids, tokenizer.pad_token_id)
    margins_by_row = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        input_ids, attention_mask = left_pad(batch, tokenizer.pad_token_id, model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                output_logits=True,
                return_dict_in_generate=True,
            )
        per_step = [top2_margins_in_ulps(step_logits) for step_logits in out.logits]
        generated = out.sequences[:, input_ids.shape[1] :].tolist()
        for row, tokens in enumerate(generated):
            until = next((i + 1 for i, token in enumerate(tokens) if token in stops), len(tokens))
            margins_by_row.append([per_step[i][row] for i in range(until)])
    return margins_by_row


def bf16_answer_flips(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int) -> dict:
    """The same greedy bf16 decoding one row at a time and in batches of batch_size: rows that differ."""
    import torch

    from d2lora.evaluation.generation import greedy_generate

    bf16 = model.to(torch.bfloat16)
    alone = greedy_generate(bf16, tokenizer, prompts, new_tokens, batch_size=1, compile=False)
    batched = greedy_generate(bf16, tokenizer, prompts, new_tokens, batch_size=batch_size, compile=False)
    differ = [i for i, (a, b) in enumerate(zip(alone, batched, strict=True)) if a != b]
    return {"rows": len(prompts), "rows_differing": len(differ), "first_differing_rows": differ[:10]}


def gsm8k_prompts(config: dict, data: Path, rows: int) -> list[str]:
    from d2lora.evaluation.math_eval import render_math_prompt
    from d2lora.io import read_jsonl

    template = config["datasets"]["math"]["prompt_template"]
    return [render_math_prompt(template, r["question"]) for r in read_jsonl(data)[:rows]]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the random-init model's draw")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "greedy_margins")
    args = parser.parse_args(argv)
    for name in ("rows", "new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.data.is_file():
        parser.error(f"--data: {args.data} does not exist")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import yaml

    from d2lora.evaluation.generation import encode_chat_prompts
    from d2lora.models import load_model, load_tokenizer, prepare_base_model
    from d2lora.provenance import run_manifest

    config = yaml.safe_load(args.config.read_text())
    prompts = gsm8k_prompts(config, args.data, args.rows)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # the models are never moved off the CPU, whatever accelerator the host has
    run = run_manifest(ROOT, device=f"cpu ({os.cpu_count()} logical cores)") | {"torch": torch.__version__}
    summary = {"arguments": arguments, "run": run, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        prepare_base_model({**config["model"], "dtype": "float32"}, model_dir)
        tokenizer = load_tokenizer(model_dir, padding_side="left")
        trained = load_model(model_dir, "float32").eval()
    torch.manual_seed(args.seed)
    # the same draw as model.source random_init on the CPU: the class's own initialisation
    random = type(trained)(trained.config).eval()
    prompt_ids = encode_chat_prompts(tokenizer, prompts)
    for name, model in (("configured", trained), ("random_init", random)):
        started = time.perf_counter()
        margins = float32_margins(model, tokenizer, prompt_ids, args.new_tokens, args.batch_size)
        summary["models"][name] = {
            "float32_margins": margin_summary(margins),
            "bf16_one_row_against_batched": bf16_answer_flips(
                model, tokenizer, prompts, args.new_tokens, args.batch_size
            ),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(name, json.dumps(summary["models"][name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
