"""One layer's attention in a GSM8K decoding step, alone, by kernel: what the static KV cache's
attention costs and what a different kernel or a shorter read would save.

    python benchmarks/decode_attention.py --rows 440 --width 235 --new-tokens 256 --out benchmarks/out/decode_attention

Round 13's profile (`benchmarks/decode_profile.py`, 8B shape, 440 rows, H100) put half of a decoding
step's GPU time in the packed-GQA attention: cuDNN's flash forward, 0.56 ms a layer, reading the
whole static cache (prompt width + new tokens, for every row) at about half the card's bandwidth.
This times that call and its alternatives on one layer's tensors of the same shape (query
(rows, heads, 1, head_dim); key and value (rows, kv_heads, cache, head_dim), bf16 on CUDA), at three
points of a batch's decoding: its first step, its middle and its last (`filled` cache positions):

- sdpa_gqa: transformers' "sdpa" path as it runs today, `enable_gqa` with the boolean padding mask;
- packed: the evaluator's packed GQA (`evaluation.gsm8k.packed_gqa`), query heads folded onto the
  KV heads, over the whole cache;
- packed_efficient: the same call with SDPA's memory-efficient kernel forced;
- packed_without_cudnn, and _compiled: the same call with every kernel but cuDNN's allowed, as
  `evaluation.gsm8k.cudnn_attention: false` runs it, eager and inside torch.compile (whether the
  compiled graph keeps the choice);
- packed_filled_128: packed over only the filled positions rounded up to a multiple of 128, what a
  static cache read in a few fixed windows would do (each window its own compiled shape);
- flex: FlexAttention (compiled), `enable_gqa`, a block mask that skips the cache's unfilled blocks
  and masks each row's left padding, made once outside the timed call;
- flex_pipeline: `evaluation.gsm8k.flex_attention`'s call (d2lora.evaluation.packed_gqa), its block
  mask made inside every call from the boolean mask, as each layer of a decoding step makes it;
- sdpa_gqa_without_cudnn: the same call with cuDNN's kernel excluded (SDPA picks among the others);
- flash_no_mask: SDPA's flash kernel on the packed query without any mask, wrong wherever a row is
  padded: how fast a mask-free kernel reads the same cache (a bound, not a lever).

Each is checked against a float32 reference of the same attention (max abs difference), timed
with CUDA events (mean of --repeats calls after --warmup), and called --repeat-check more times on
the same inputs: `bitwise_repeatable` says whether every output equalled the first bit for bit (a
kernel whose reduction order varies from call to call makes greedy decoding differ between runs). Rows' left padding is drawn with --seed
from the lengths of real prompts (`--data` rendered and tokenized as `--config`'s GSM8K evaluation
does; the longest sets the width), else uniformly up to --width. Writes summary.json with
microseconds per call, the bytes of cache each reads, and the implied GB/s. On a CPU the kernels
that need CUDA are skipped; the rest still run (the test's tiny shape).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WINDOW = 128  # the window packed_filled_128 rounds to, and FlexAttention's block size


def without_cudnn():
    """SDPA's kernels but cuDNN's: d2lora.evaluation.packed_gqa.WITHOUT_CUDNN (a test keeps them equal),
    repeated here so that this script runs where transformers is not installed."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def left_pad_lengths(rows: int, width: int, prompt_lengths: list[int] | None, seed: int):
    """Per row, how many of the `width` prompt positions are padding (the evaluator pads on the left)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if prompt_lengths:
        lengths = torch.tensor(prompt_lengths)[torch.randint(len(prompt_lengths), (rows,), generator=generator)]
        lengths = lengths.clamp(1, width)
    else:
        lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    return width - lengths


def real_prompt_lengths(config_path: Path, data: Path) -> list[int]:
    """Token lengths of the GSM8K prompts as the evaluator encodes them (template, chat template)."""
    import yaml

    from d2lora.evaluation.generation import encode_chat_prompts
    from d2lora.evaluation.math_eval import render_math_prompt
    from d2lora.io import read_jsonl
    from d2lora.models import random_init_tokenizer

    config = yaml.safe_load(Path(config_path).read_text())
    tokenizer = random_init_tokenizer(config["model"])
    template = config["datasets"]["math"]["prompt_template"]
    rows = read_jsonl(data / "eval.jsonl" if data.is_dir() else data)
    return [
        len(ids) for ids in encode_chat_prompts(tokenizer, [render_math_prompt(template, r["question"]) for r in rows])
    ]


def make_inputs(rows, heads, kv_heads, head_dim, cache, device, dtype, seed):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return draw(rows, heads, 1, head_dim), draw(rows, kv_heads, cache, head_dim), draw(rows, kv_heads, cache, head_dim)


def padding_mask(pads, filled: int, cache: int, device):
    """(rows, 1, 1, cache) bool: a position is attended if it is past the row's padding and filled."""
    import torch

    positions = torch.arange(cache, device=device)
    return ((positions >= pads.to(device)[:, None]) & (positions < filled))[:, None, None, :]


def fold(query, groups: int):
    """(rows, heads, 1, d) -> (rows, kv_heads, groups, d), as d2lora.evaluation.packed_gqa does."""
    rows, heads, _, dim = query.shape
    return query.reshape(rows, heads // groups, groups, dim)


def unfold(output, heads: int):
    return output.reshape(output.shape[0], heads, 1, output.shape[-1])


def reference(query, key, value, mask):
    """Float32 attention with the KV heads repeated: what every variant must equal."""
    import torch

    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = query.float() @ k.transpose(-1, -2) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def variants(query, key, value, pads, filled: int, cuda: bool) -> dict:
    """name -> (a function of no arguments giving (rows, heads, 1, d), cache positions it reads)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, heads, _, _ = query.shape
    kv_heads, cache = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    mask = padding_mask(pads, filled, cache, query.device)
    folded = fold(query, groups)
    window = min(cache, math.ceil(filled / WINDOW) * WINDOW)
    key_window, value_window, mask_window = key[:, :, :window], value[:, :, :window], mask[..., :window]
    out = {
        "sdpa_gqa": (lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True), cache),
        "packed": (lambda: unfold(F.scaled_dot_product_attention(folded, key, value, attn_mask=mask), heads), cache),
        "packed_filled_128": (
            lambda: unfold(
                F.scaled_dot_product_attention(folded, key_window, value_window, attn_mask=mask_window), heads
            ),
            window,
        ),
    }

    def efficient():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return unfold(F.scaled_dot_product_attention(folded, key, value, attn_mask=mask), heads)

    out["packed_efficient"] = (efficient, cache)

    def packed_without_cudnn(folded, key, value, mask):
        with sdpa_kernel(without_cudnn()):
            return unfold(F.scaled_dot_product_attention(folded, key, value, attn_mask=mask), heads)

    out["packed_without_cudnn"] = (lambda: packed_without_cudnn(folded, key, value, mask), cache)
    compiled = torch.compile(packed_without_cudnn, fullgraph=True, dynamic=False)
    out["packed_without_cudnn_compiled"] = (lambda: compiled(folded, key, value, mask), cache)
    if cuda:

        def flash_no_mask():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return unfold(F.scaled_dot_product_attention(folded, key, value), heads)

        out["flash_no_mask"] = (flash_no_mask, cache)

        def sdpa_gqa_without_cudnn():
            with sdpa_kernel(without_cudnn()):
                return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)

        out["sdpa_gqa_without_cudnn"] = (sdpa_gqa_without_cudnn, cache)
    out["flex"] = (flex_variant(query, key, value, pads, filled, cuda), window)
    pipeline = pipeline_flex_variant(query, key, value, mask, cuda)
    if pipeline is not None:
        out["flex_pipeline"] = (pipeline, window)
    return out


def pipeline_flex_variant(query, key, value, mask, cuda: bool):
    """`evaluation.gsm8k.flex_attention`'s call as one layer makes it, the block mask built from the
    step's boolean mask inside the call (compiled on CUDA, as in the compiled decoding step): what
    `flex` costs with its block mask's making. None where transformers is not installed."""
    import types

    import torch

    try:
        from d2lora.evaluation.packed_gqa import flex_gqa_attention_forward
    except ImportError:
        return None
    module = types.SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1])

    def attend(query, key, value, mask):
        output, _ = flex_gqa_attention_forward(module, query, key, value, mask, scaling=query.shape[-1] ** -0.5)
        return output.transpose(1, 2)

    call = torch.compile(attend, fullgraph=True, dynamic=False) if cuda else attend
    return lambda: call(query, key, value, mask)


def flex_variant(query, key, value, pads, filled: int, cuda: bool):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pads = pads.to(query.device)
    filled_positions = torch.tensor(filled, device=query.device)  # a tensor: one compiled kernel for every point

    def visible(batch, head, q_index, kv_index):
        return (kv_index >= pads[batch]) & (kv_index < filled_positions)

    rows, cache = key.shape[0], key.shape[2]
    block_mask = create_block_mask(
        visible, B=rows, H=None, Q_LEN=1, KV_LEN=cache, device=query.device, BLOCK_SIZE=WINDOW
    )
    attend = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    return lambda: attend(query, key, value, block_mask=block_mask, enable_gqa=True)


def time_call(call, warmup: int, repeats: int, cuda: bool) -> float:
    """Mean microseconds a call (CUDA events on a GPU, wall clock on a CPU)."""
    import time

    import torch

    for _ in range(warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - began) * 1e6 / repeats


def repeat_drift(call, calls: int) -> float:
    """The largest absolute difference between the first output and any of `calls` more."""
    first = call()
    return max((call() - first).abs().max().item() for _ in range(calls)) if calls else 0.0


def measure(args) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    prompt_lengths = real_prompt_lengths(args.config, args.data) if args.data else None
    if prompt_lengths:
        args.width = max(prompt_lengths)
    cache = args.width + args.new_tokens
    pads = left_pad_lengths(args.rows, args.width, prompt_lengths, args.seed)
    query, key, value = make_inputs(
        args.rows, args.heads, args.kv_heads, args.head_dim, cache, args.device, dtype, args.seed
    )
    bytes_per_position = 2 * args.rows * args.kv_heads * args.head_dim * key.element_size()  # K and V
    points = {"first_step": args.width + 1, "middle": args.width + args.new_tokens // 2, "last_step": cache}
    results = {}
    with torch.inference_mode():
        for point, filled in points.items():
            mask = padding_mask(pads, filled, cache, args.device)
            expected = reference(query, key, value, mask)
            results[point] = {"filled": filled}
            for name, (call, positions) in variants(query, key, value, pads, filled, cuda).items():
                try:
                    difference = (call().float() - expected).abs().max().item()
                    micros = time_call(call, args.warmup, args.repeats, cuda)
                    drift = repeat_drift(call, args.repeat_check)
                except Exception as err:  # noqa: BLE001 -- a kernel this build lacks is recorded, the rest run
                    results[point][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
                    print(f"{point:>10} {name:>18}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    continue
                moved = bytes_per_position * positions
                results[point][name] = {
                    "microseconds": round(micros, 1),
                    "cache_positions_read": positions,
                    "cache_gb_read": round(moved / 1e9, 4),
                    "gb_per_second": round(moved / micros / 1e3, 1),
                    "max_abs_difference": difference,
                    "bitwise_repeatable": drift == 0.0,
                    "max_abs_drift_between_calls": drift,
                    "exact_for_padded_rows": name != "flash_no_mask",
                }
                print(
                    f"{point:>10} {name:>18}: {micros:8.1f} us, {moved / micros / 1e3:7.1f} GB/s, "
                    f"max |diff| {difference:.2e}, between calls {drift:.2e}",
                    flush=True,
                )
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": {
            "rows": args.rows,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "prompt_width": args.width,
            "new_tokens": args.new_tokens,
            "cache": cache,
        },
        "padding": {
            "source": f"{args.data} through {args.config}" if args.data else "uniform",
            "mean_pad": round(pads.float().mean().item(), 1),
            "seed": args.seed,
        },
        "repeats": args.repeats,
        "repeat_check": args.repeat_check,
        "points": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=440)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=235, help="the longest prompt, in tokens (the cache's prefix)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--data", type=Path, help="GSM8K rows (a jsonl, or a folder with eval.jsonl): real prompt lengths"
    )
    parser.add_argument(
        "--config", type=Path, default=ROOT / "config" / "paper_shape.yaml", help="its tokenizer and prompt template"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--repeat-check", type=int, default=20, help="calls compared with the first, bit for bit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "decode_attention")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    summary = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
