"""What a job cost: device seconds, peak accelerator memory, tokens trained on, model FLOPs.

Recorded by the training and evaluation jobs beside their results, so "D2LoRA is cheaper"
becomes a measured number (d2lora.results.cost) and the GPU benchmark's timing table
(benchmarks/run_mini.py) reads the same records the workflow writes.
"""

from __future__ import annotations

import math
import time

import torch


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float | None:
    """Peak memory PyTorch allocated on the accelerator since the last reset; None on CPU (not measured)."""
    if device != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parameter_count(model, trainable: bool | None = None) -> int:
    """Parameters of a model; trainable=True/False counts only those (not) requiring gradients."""
    return int(sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable))


def base_parameter_count(model) -> int:
    """Parameters of the base model under a PeftModel (adapter weights, any of them, left out)."""
    return int(sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name))


def _capped(lengths, max_length: int) -> int:
    return int(sum(min(int(n), max_length) for n in lengths))


def sequence_tokens(dataset, max_length: int) -> int:
    """Tokens one epoch feeds through the policy, from a TRL trainer's tokenized train_dataset.

    The policy runs prompt + answer for SFT, and both prompt + chosen and prompt + rejected for the
    preference methods; each sequence counts up to max_length (as truncated), padding not at all.
    TRL 1.16's column layouts: SFT `input_ids`; DPO `prompt_ids` + `chosen_ids` / `rejected_ids`
    (completions only); ORPO (trl.experimental) `chosen_input_ids` / `rejected_input_ids`
    (whole sequences, the prompt included).
    """
    columns = set(dataset.column_names)
    if "input_ids" in columns:
        return _capped((len(ids) for ids in dataset["input_ids"]), max_length)
    if {"chosen_input_ids", "rejected_input_ids"} <= columns:
        return _capped((len(ids) for ids in dataset["chosen_input_ids"]), max_length) + _capped(
            (len(ids) for ids in dataset["rejected_input_ids"]), max_length
        )
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:
        prompts = dataset["prompt_ids"]
        return _capped((len(p) + len(c) for p, c in zip(prompts, dataset["chosen_ids"])), max_length) + _capped(
            (len(p) + len(r) for p, r in zip(prompts, dataset["rejected_ids"])), max_length
        )
    raise ValueError(
        f"cannot count tokens: train_dataset has columns {sorted(columns)}; expected input_ids (SFT), "
        "prompt_ids/chosen_ids/rejected_ids (DPO) or chosen_input_ids/rejected_input_ids (ORPO)"
    )


def training_flops(parameters: int, tokens: int) -> float:
    """The usual 6 x parameters x tokens estimate (forward 2N, backward 4N per token).

    With a frozen base the backward pass skips the base's weight gradients, so the true count is
    nearer 4N: MFU computed from 6N overstates the work by up to 1.5x, as every 6N figure does.
    """
    return 6.0 * parameters * tokens


def mfu(parameters: int, tokens: int, seconds: float, peak_flops: float) -> float | None:
    if not seconds or not peak_flops or not tokens:
        return None
    value = training_flops(parameters, tokens) / seconds / peak_flops
    return None if math.isnan(value) else value


def measure_matmul_peak(device: str = "cuda", size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate of this accelerator in FLOP/s (the MFU denominator).

    METHOD.md's way: one large product, three warm-ups, the mean of `repeats` timed ones.
    """
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return 2.0 * size**3 / seconds
