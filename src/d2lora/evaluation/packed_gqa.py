"""Decoding attention over grouped KV heads without copying them, compiled or not.

transformers' SDPA attention already folds a single query token's heads onto the key/value heads
(`pack_gqa`) instead of repeating K and V `num_key_value_groups` times, but only in eager mode: under
torch.compile it falls back to `repeat_kv`, which copies the whole KV cache every decoding step and
is why the compiled static cache was slower than the eager one at the 8B shape (benchmarks/RESULTS.md).
Decoding shapes are fixed with the static cache, so the fold is safe to compile; this attention
does it there too and hands every other case (prefill, masks per head, position bias) to SDPA's own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_GQA = "sdpa_packed_gqa"


def packed_gqa_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_length, _ = query.shape
    mask_shared_by_heads = attention_mask is None or attention_mask.shape[1] == 1
    if (
        groups == 1
        or q_length != 1
        or not mask_shared_by_heads
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # (batch, heads, 1, d) -> (batch, kv_heads, groups, d): each KV head attends for its group of
    # query heads as if they were query positions; a (batch, 1, 1, kv) mask broadcasts over both.
    folded = pack_gqa(query, groups)
    output = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    return output.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    AttentionInterface.register(PACKED_GQA, packed_gqa_attention_forward)
    AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)  # the same masks as "sdpa"
    return PACKED_GQA


@contextmanager
def packed_gqa_attention(model, enabled: bool = True):
    """Decode with the packed-GQA attention inside the block, then restore the model's own."""
    if not enabled:
        yield model
        return
    previous = model.config._attn_implementation
    if previous != "sdpa":
        raise ValueError(f"evaluation.gsm8k.packed_gqa needs the model's attention to be 'sdpa', it is '{previous}'")
    model.set_attn_implementation(register())
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
