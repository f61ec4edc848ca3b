"""What a LoRA branch adds to a training step, counted as operator calls on the CPU.

    python benchmarks/lora_branch_ops.py            # a 2-layer Llama, bf16 autocast, r 16 on all-linear

At the 8B shape a step's small kernels, not its matmuls, hold the SFT MFU target back
(benchmarks/RESULTS.md, Round 7: ~14,500 launches a step). The GPU profile counts kernels for the
whole model; this counts, on the CPU and so on any machine, the operator calls one LoRA projection
adds per micro-batch, forward and backward, against the same model with its base frozen and no
adapter. Calls are grouped by operator and by what they touch: activations (batch x length x
width), weights (2-D: the adapter's A and B, their gradients), other (scalars). Variants: Table 2's
dropout 0.05 or none, peft's float32 adapters under autocast or bf16 ones (`autocast_adapter_dtype`),
the inputs cast or not (`cast_adapter_inputs`), the B matmul adding into the output or not
(`fuse_adapter_add`). Prints one JSON object per variant.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ROWS, LENGTH = 4, 64
OPERATORS = (
    "aten::mm",
    "aten::addmm",
    "aten::copy_",
    "aten::mul",
    "aten::add",
    "aten::add_",
    "aten::bernoulli_",
    "aten::native_dropout",
)
VARIANTS = {
    "table2": {"dropout": 0.05, "adapters_bf16": False, "cast_inputs": True},
    "uncast_inputs": {"dropout": 0.05, "adapters_bf16": False, "cast_inputs": False},
    "dropout0": {"dropout": 0.0, "adapters_bf16": False, "cast_inputs": False},
    "bf16_adapters": {"dropout": 0.05, "adapters_bf16": True, "cast_inputs": False},
    "fused_add": {"dropout": 0.05, "adapters_bf16": False, "cast_inputs": False, "fuse_add": True},
}


def _kind(shape: list) -> str:
    if len(shape) >= 3 and shape[0] == ROWS and shape[1] == LENGTH:
        return "activation"
    return "weight" if len(shape) == 2 else "other"


def count_calls(adapter: dict | None, hidden: int = 256, layers: int = 2) -> tuple[collections.Counter, int]:
    """Operator calls of one forward and backward under bf16 autocast, by (operator, kind); and the
    number of LoRA projections (0 without an adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from d2lora.training.fast_paths import fuse_adapter_add, keep_adapter_inputs

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    projections = 0
    if adapter is None:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # a backward through every layer, as with LoRA
    else:
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=adapter["dropout"], target_modules="all-linear")
        model = get_peft_model(model, lora, autocast_adapter_dtype=not adapter["adapters_bf16"])
        if not adapter["cast_inputs"]:
            keep_adapter_inputs(model)
        if adapter.get("fuse_add"):
            fuse_adapter_add(model)
        projections = sum(
            1 for module in model.modules() if type(module).__name__ == "Linear" and hasattr(module, "lora_A")
        )
    model.train()
    ids = torch.randint(0, config.vocab_size, (ROWS, LENGTH))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # first-call work outside the count
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls = collections.Counter()
    for event in prof.events():
        # autocast's addmm records itself and then the addmm it dispatches to: one call, one kernel
        nested = event.cpu_parent is not None and event.cpu_parent.name == event.name
        if event.name in OPERATORS and not nested:
            calls[(event.name, _kind(event.input_shapes[0] if event.input_shapes else []))] += 1
    return calls, projections


def per_projection(variant: dict, base: collections.Counter) -> dict:
    calls, projections = count_calls(variant)
    added = {
        f"{op.removeprefix('aten::')}/{kind}": round((calls[(op, kind)] - base[(op, kind)]) / projections, 2)
        for op, kind in sorted(set(calls) | set(base))
        if calls[(op, kind)] != base[(op, kind)]
    }
    return {"projections": projections, "calls_added_per_projection": added, "total": round(sum(added.values()), 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    args = parser.parse_args(argv)
    names = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    base, _ = count_calls(None)
    results = {name: {**VARIANTS[name], **per_projection(VARIANTS[name], base)} for name in names}
    for name, result in results.items():
        print(json.dumps({"variant": name, **result}))
    return results


if __name__ == "__main__":
    main()
