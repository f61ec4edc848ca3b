"""Decoding attention: over grouped KV heads without copying them, compiled or not; and over only the
filled part of a static KV cache.

transformers' SDPA attention already folds a single query token's heads onto the key/value heads
(`pack_gqa`) instead of repeating K and V `num_key_value_groups` times, but only in eager mode: under
torch.compile it falls back to `repeat_kv`, which copies the whole KV cache every decoding step and
is why the compiled static cache was slower than the eager one at the 8B shape (benchmarks/RESULTS.md).
Decoding shapes are fixed with the static cache, so the fold is safe to compile; this attention
does it there too and hands every other case (prefill, masks per head, position bias) to SDPA's own.

A static cache is as long as the run's longest prompt plus the new tokens, and SDPA reads all of it
every step, the positions not yet written included (masked): at the 8B shape on GSM8K that is 491
positions a row where 237 are filled on average, and the attention was half of a decoding step
(Round 13, benchmarks/RESULTS.md). With `filled_cache_only` the mask is built over the positions
written so far, in windows of FILLED_WINDOW (the 2-D padding mask has one column per token seen),
and the keys and values are cut to the same length, a view of the cache, not a copy. The length
changes as the batch decodes, so this is for the eager static cache (a compiled step would
recompile for each).

On CUDA, SDPA takes cuDNN's kernel for a masked call wherever it can. For a single query position
(`native`) that kernel's output drifts by a bf16 rounding from call to call on the same inputs (Round 15:
two runs of one GSM8K evaluation gave different greedy answers); with `cudnn_attention=False` the
decoding attention runs inside `sdpa_kernel` without it, so the packed call takes the memory-efficient
kernel, repeatable and faster than cuDNN's at the 8B shape (455 against 565 us a layer on an H100,
benchmarks/decode_attention.py). SDPA's memory-efficient kernel has no grouped KV heads, so `native`
without cuDNN would fall back to the math kernel (11 ms a layer): refused.

`flex` runs each decoding step through FlexAttention over the grouped KV heads, with a block mask
made from the step's padding-and-cache mask: blocks of 128 cache positions that are all padding or
not yet written are skipped, not read (one layer at the 8B shape on an H100: 145-288 us against
~457 us for the packed heads on the memory-efficient kernel, the same output on every call; Round 15,
benchmarks/decode_attention.py). The mask is made where transformers makes SDPA's (flex's own mask in
transformers 5.x breaks `generate` with a static cache: it calls `.contiguous()` on the BlockMask), and
the block mask from it in each layer: a few small kernels a layer and step, which torch.compile does
not merge across layers (compiled on a CPU, four layers' calls kept four block masks' sorts in the
graph); their cost on a GPU is not measured yet. The prefill goes to transformers' SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.flex_attention import compile_friendly_flex_attention
from transformers.utils import is_torchdynamo_compiling
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from d2lora.models import attention_heads, check_flex_attention_heads


def _grouped_decoding_step(groups: int, query, attention_mask, kwargs: dict) -> bool:
    """Whether a call is one decoding step over grouped KV heads with a mask shared by the heads and
    nothing else (position bias, paged cache, softcap): the case the packed and native attentions
    take; every other goes to transformers' SDPA attention."""
    return (
        groups > 1
        and query.shape[2] == 1
        and (attention_mask is None or attention_mask.shape[1] == 1)
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and kwargs.get("softcap") is None
    )


def packed_gqa_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, _, _ = query.shape
    if not _grouped_decoding_step(groups, query, attention_mask, kwargs):
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


# The filled part is read in windows of this many positions: a length that changed every step made
# the eager step slower, not faster (Round 14: 67.9 s against 40.1 s for 1,319 x 256 at the 8B shape on
# an H100), each new attention shape paying the kernel's set-up again; windows give a batch a few shapes.
FILLED_WINDOW = 128


def filled_cache_mask(*, kv_length: int, kv_offset: int = 0, attention_mask=None, **kwargs):
    """transformers' SDPA mask over the cache positions written so far, rounded up to FILLED_WINDOW
    (the 2-D padding mask has one column per token seen, this step's included) instead of the static
    cache's full length. Never None (no causal skip), so that the attention always learns the length
    to read from the mask."""
    if attention_mask is not None and attention_mask.dim() == 2 and kv_offset == 0:
        seen = attention_mask.shape[-1]
        kv_length = min(kv_length, -(-seen // FILLED_WINDOW) * FILLED_WINDOW)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(kv_length=kv_length, kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def native_gqa_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """A decoding step through SDPA's own grouped-query attention (`enable_gqa`), the padding mask
    included: transformers keeps `enable_gqa` for calls without a mask on CUDA (it expects the math
    kernel otherwise) and folds the heads instead, which ran at 568 us a layer against 313 us for
    this call at the 8B shape on an H100 (Round 14, benchmarks/decode_attention.py). Every other case
    goes to transformers' SDPA attention."""
    if not _grouped_decoding_step(getattr(module, "num_key_value_groups", 1), query, attention_mask, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


# FlexAttention's block of cache positions: a block all masked for a row is skipped for that row.
FLEX_BLOCK = 128


def flex_gqa_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """A decoding step through FlexAttention over the grouped KV heads, skipping the cache's blocks
    that the step's boolean mask (batch, 1, 1, cache) hides entirely. Every other case (prefill, no
    mask, float masks) goes to transformers' SDPA attention."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        not _grouped_decoding_step(groups, query, attention_mask, kwargs)
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or dropout
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    visible_mask = attention_mask

    def visible(batch, head, q_index, kv_index):
        return visible_mask[batch, 0, q_index, kv_index]

    block_mask = create_block_mask(
        visible,
        B=query.shape[0],
        H=None,
        Q_LEN=1,
        KV_LEN=key.shape[2],
        device=query.device,
        BLOCK_SIZE=FLEX_BLOCK,
    )
    # Inside a compiled step inductor lowers flex_attention to its decoding kernel; called eagerly on
    # CUDA it is compiled once (transformers' wrapper); on a CPU the eager reference is enough.
    if is_torchdynamo_compiling() or query.device.type != "cuda":
        output = flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    else:
        output = compile_friendly_flex_attention(
            query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True, training=False
        )
    return output.transpose(1, 2).contiguous(), None


def _filled(key, value, attention_mask):
    """Keys and values cut to the mask's length (views of the cache): the filled positions only."""
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[-2]:
        length = attention_mask.shape[-1]
        return key[:, :, :length], value[:, :, :length]
    return key, value


GQA_KINDS = ("transformers", "packed", "native", "flex")
# Every SDPA kernel but cuDNN's; on a CPU, which has no cuDNN kernel, SDPA's choice is unchanged.
WITHOUT_CUDNN = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def check_cudnn_choice(gqa: str, cudnn_attention: bool) -> None:
    if gqa == "native" and not cudnn_attention:
        raise ValueError(
            "native_gqa without cuDNN's attention falls back to SDPA's math kernel (no other takes grouped KV "
            "heads with a mask; 11 ms against 0.3 ms a layer at the 8B shape): use packed_gqa with "
            "cudnn_attention: false (evaluation.gsm8k)"
        )


def decoding_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    *,
    gqa: str,
    filled_cache_only: bool,
    cudnn_attention: bool = True,
    **kwargs,
):
    """The attention `register` installs: keys and values cut to the filled cache if asked, then the
    grouped heads folded (packed), through SDPA's enable_gqa (native), through FlexAttention (flex), or
    as transformers does; SDPA without cuDNN's kernel if asked."""
    if filled_cache_only:
        key, value = _filled(key, value, attention_mask)
    inner = {
        "packed": packed_gqa_attention_forward,
        "native": native_gqa_attention_forward,
        "flex": flex_gqa_attention_forward,
    }.get(gqa)
    attend = inner or sdpa_attention_forward
    if cudnn_attention:
        return attend(module, query, key, value, attention_mask, **kwargs)
    with sdpa_kernel(WITHOUT_CUDNN):
        return attend(module, query, key, value, attention_mask, **kwargs)


def register(gqa: str = "packed", filled_cache_only: bool = False, cudnn_attention: bool = True) -> str:
    """Register the attention (and its mask) for this combination; its name for set_attn_implementation.
    The name differs per combination, so a compiled step is built for each, never reused across them.
    The forwards are looked up when called, so that a test can spy on them."""
    if gqa not in GQA_KINDS:
        raise ValueError(f"gqa must be one of {GQA_KINDS}, got {gqa!r}")
    check_cudnn_choice(gqa, cudnn_attention)
    name = (
        f"sdpa_{gqa}_gqa"
        + ("_filled_cache" if filled_cache_only else "")
        + ("" if cudnn_attention else "_without_cudnn")
    )

    def forward(*args, **kwargs):
        return decoding_attention_forward(
            *args, gqa=gqa, filled_cache_only=filled_cache_only, cudnn_attention=cudnn_attention, **kwargs
        )

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, filled_cache_mask if filled_cache_only else sdpa_mask)
    return name


@contextmanager
def decoding_attention(model, gqa: str = "packed", filled_cache_only: bool = False, cudnn_attention: bool = True):
    """Decode with the chosen grouped-query attention, attention over the filled cache and/or SDPA
    without cuDNN's kernel inside the block, then restore the model's own."""
    if gqa == "transformers" and not filled_cache_only and cudnn_attention:
        yield model
        return
    previous = model.config._attn_implementation
    if previous != "sdpa":
        setting = {"flex": "flex_attention", "transformers": ""}.get(gqa, f"{gqa}_gqa") or (
            "filled_cache_only" if filled_cache_only else "cudnn_attention"
        )
        raise ValueError(f"evaluation.gsm8k.{setting} needs the model's attention to be 'sdpa', it is '{previous}'")
    if gqa == "flex":
        check_flex_attention_heads(*attention_heads(model.config.to_dict()))
    model.set_attn_implementation(register(gqa, filled_cache_only, cudnn_attention))
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
