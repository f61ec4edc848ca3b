"""Batched greedy generation whose outputs do not depend on the batch size.

Prompts are single user turns in the model's chat template. Batches are LEFT-padded so that
every prompt ends at the same column and new tokens follow directly; `generate` derives
position ids from the attention mask, so a padded prompt sees the same positions it would
alone. Sorting by length (longest first) keeps padding small and puts the slowest batch
first, so an out-of-memory error shows up at once rather than hours in.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Sequence


def model_device(model):
    return next(model.parameters()).device


def chat_prompt(tokenizer, user_prompt: str) -> str:
    """One user turn plus the assistant header; the template adds its own default system prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_chat_prompts(tokenizer, user_prompts: Sequence[str]) -> list[list[int]]:
    # The rendered template already carries BOS where the model wants one (e.g. Llama 3's
    # <|begin_of_text|>); letting the tokenizer add special tokens would double it.
    texts = [chat_prompt(tokenizer, p) for p in user_prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def longest_first_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first; ties keep input order so runs are reproducible."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device, width: int | None = None, rows: int | None = None
):
    """Left-padded ids and mask; `width` and `rows` (at least the batch's own) give every batch of a
    run one shape: extra rows repeat the last sequence and are dropped by the caller."""
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    sequences = list(sequences)
    if rows is not None and rows > len(sequences):
        sequences += [sequences[-1]] * (rows - len(sequences))
    width = max([len(seq) for seq in sequences] + [width or 0])
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists.

    Instruct models often end a turn with a token other than the tokenizer's EOS (Llama 3.1:
    <|eot_id|> besides <|end_of_text|>); missing one makes every answer run to the token limit.
    """
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


CACHE_KINDS = ("dynamic", "static")
PROMPT_WIDTHS = ("batch", "longest")


def greedy_config(
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    cache: str = "dynamic",
    compile: bool = True,
    max_cache_len: int | None = None,
):
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import GenerationConfig

    if cache not in CACHE_KINDS:
        raise ValueError(f"evaluation cache must be one of {CACHE_KINDS}, got {cache!r}")
    # "static" preallocates the KV cache at its final length instead of growing it by concatenation
    # every token, and lets transformers compile the decoding step (CUDA graphs) unless `compile` is
    # off. One `max_cache_len` for every batch keeps one compiled graph for the whole run.
    extra = {}
    if cache == "static":
        extra = {"cache_implementation": "static", "disable_compile": not compile}
        if max_cache_len is not None:
            extra["max_cache_len"] = max_cache_len

    # do_sample is set explicitly so that sampling settings inherited from the model's own
    # generation_config.json (temperature, top_p) are ignored without a warning per call.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **extra,
    )


def _generate_rows_leaving(
    model, input_ids, attention_mask, config, eos_ids: list[int], pad_id: int, cache: str, every: int
):
    """New tokens of one batch, generated `every` at a time: after each round, rows that emitted a stop
    token leave the batch and their rows of the KV cache go with them, so the longest answer no longer
    keeps every finished row computing to the end. Rows still running continue from the cache as it
    is (transformers' `generate` feeds only the tokens the cache lacks), so each row's tokens are the
    ones one `generate` call gives. Returns [rows, generated] token ids, pad_id after a row's stop."""

    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import DynamicCache, StaticCache

    total = config.max_new_tokens
    width = input_ids.shape[1]
    kv = (
        StaticCache(config=model.config, max_cache_len=width + total)
        if cache == "static"
        else DynamicCache(config=model.config)
    )
    # A cache of our own carries the kind; leaving rows change the batch, which a compiled step cannot follow.
    round_config = copy.deepcopy(config)
    round_config.cache_implementation = None
    round_config.disable_compile = True
    stop = torch.tensor(eos_ids, device=input_ids.device)
    tokens = torch.full((input_ids.shape[0], total), pad_id, dtype=torch.long)
    running = torch.arange(input_ids.shape[0])
    ids, mask, made = input_ids, attention_mask, 0
    while made < total and len(running):
        round_config.max_new_tokens = min(every, total - made)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=kv, generation_config=round_config)
        new = out[:, ids.shape[1] :]
        tokens[running, made : made + new.shape[1]] = new.cpu()
        made += new.shape[1]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], new.shape[1]))], dim=1)
        keep = (~torch.isin(new, stop).any(dim=1)).nonzero().squeeze(1)
        if len(keep) < len(running):
            kv.reorder_cache(keep)
            out, mask, running = out[keep], mask[keep], running[keep.cpu()]
        ids = out
    return tokens


def decode_new_tokens(tokenizer, new_tokens, eos_ids: list[int]) -> str:
    """Text of the generated tokens up to the first stop token."""
    tokens = new_tokens.tolist()
    for pos, token in enumerate(tokens):
        if token in eos_ids:
            tokens = tokens[:pos]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)


def log_progress(
    desc: str, batches_done: int, n_batches: int, items_done: int, n_items: int, started: float, unit: str = "items"
) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    print(
        f"[{desc}] batch {batches_done}/{n_batches}, {items_done}/{n_items} {unit}, "
        f"{items_done / elapsed:.2f} {unit}/s, {elapsed:.0f} s elapsed",
        file=sys.stderr,
        flush=True,
    )


def greedy_generate(
    model,
    tokenizer,
    user_prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress_desc: str | None = None,
    partial=None,
    cache: str = "dynamic",
    compile: bool = True,
    rows_leave_every: int = 0,
    packed_gqa: bool = False,
    filled_cache_only: bool = False,
    native_gqa: bool = False,
    prompt_width: str = "batch",
    cudnn_attention: bool = True,
    flex_attention: bool = False,
) -> list[str]:
    """Greedy completions of each prompt (as a chat user turn), in the order given.

    `partial` (d2lora.evaluation.partial.PartialResults, optional) holds batches finished by an
    earlier, killed run: they are taken from it, and every new batch is recorded in it.
    With the static cache every batch gets one cache length (the run's longest prompt plus the new
    tokens) and a full batch of rows, so that the compiled decoding step (one graph per shape) is
    built once, not once per batch. `prompt_width` "batch" pads each batch's prompts to its own
    longest: transformers runs the prefill eagerly and builds the decoding step's mask over the
    whole cache, so that step's shapes stay the same; "longest" pads every batch to the run's longest.
    `rows_leave_every` > 0: finished rows leave the batch every that many new tokens (eager only).
    `packed_gqa`: decode with d2lora.evaluation.packed_gqa's attention (no KV head copies when compiled).
    `native_gqa`: decoding steps through SDPA's enable_gqa with the padding mask (d2lora.evaluation.packed_gqa).
    `filled_cache_only` (static cache, eager): attention reads only the cache positions written so far,
    and each batch keeps its own prompt width (d2lora.evaluation.packed_gqa).
    `cudnn_attention` False: SDPA without cuDNN's kernel (d2lora.evaluation.packed_gqa says why).
    `flex_attention` (static cache): decoding steps through FlexAttention over the grouped KV heads,
    skipping the cache's blocks that are all padding or not yet written (d2lora.evaluation.packed_gqa).
    """
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    # packed_gqa imports torch and transformers: kept out of workflow parsing (the rules import this module)
    from d2lora.evaluation.packed_gqa import check_cudnn_choice, decoding_attention

    if rows_leave_every < 0:
        raise ValueError(f"rows_leave_every must be >= 0, got {rows_leave_every}")
    if rows_leave_every and cache == "static" and compile:
        raise ValueError(
            "finished rows leaving the batch change its shape, which a compiled decoding step cannot "
            "follow: with the static cache set compile: false (evaluation.gsm8k.compile)"
        )
    if filled_cache_only and (cache != "static" or compile):
        raise ValueError(
            "filled_cache_only changes the attention's length every step: it needs cache: static and "
            f"compile: false (evaluation.gsm8k), got cache: {cache}, compile: {compile}"
        )
    if packed_gqa + native_gqa + flex_attention > 1:
        raise ValueError(
            "packed_gqa, native_gqa and flex_attention are ways to attend over grouped KV heads: choose one"
        )
    if flex_attention and (cache != "static" or filled_cache_only):
        raise ValueError(
            "flex_attention skips the static cache's unwritten blocks itself: it needs cache: static and "
            f"filled_cache_only: false (evaluation.gsm8k), got cache: {cache}, filled_cache_only: {filled_cache_only}"
        )
    check_cudnn_choice("native" if native_gqa else "packed", cudnn_attention)
    if prompt_width not in PROMPT_WIDTHS:
        raise ValueError(f"prompt_width must be one of {PROMPT_WIDTHS}, got {prompt_width!r}")
    if not user_prompts:
        return []
    gqa = "native" if native_gqa else "packed" if packed_gqa else "flex" if flex_attention else "transformers"
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(model, tokenizer)
    encoded = encode_chat_prompts(tokenizer, user_prompts)
    batches = longest_first_batches([len(ids) for ids in encoded], batch_size)
    # Eager with filled_cache_only, a batch's shape costs nothing: each keeps its own cache length.
    fixed_shape = cache == "static" and not filled_cache_only
    longest = max(len(ids) for ids in encoded)
    width = longest if fixed_shape and prompt_width == "longest" else None
    rows = len(batches[0]) if fixed_shape else None
    config = greedy_config(
        max_new_tokens,
        eos_ids,
        pad_id,
        cache,
        compile=compile,
        max_cache_len=longest + max_new_tokens if fixed_shape else None,
    )
    desc = progress_desc or "generate"

    outputs: list[str | None] = [None] * len(user_prompts)
    model.eval()
    if partial is not None and partial.resumed:
        print(
            f"[{desc}] resuming: {sum(partial.has_all(b) for b in batches)} of {len(batches)} batches already done",
            file=sys.stderr,
            flush=True,
        )
    started, done = time.perf_counter(), 0
    with torch.inference_mode(), decoding_attention(model, gqa, filled_cache_only, cudnn_attention):
        for number, batch in enumerate(batches, start=1):
            if partial is not None and partial.has_all(batch):
                for index in batch:
                    outputs[index] = partial.done[index]
                done += len(batch)
                continue
            batch_width = width
            if filled_cache_only and len({len(encoded[i]) for i in batch}) == 1:
                # transformers drops a padding mask of all ones, and the filled length is read from it:
                # one pad column keeps it (a masked position, so the answers stay the same)
                batch_width = len(encoded[batch[0]]) + 1
            input_ids, attention_mask = left_pad(
                [encoded[i] for i in batch], pad_id, device, width=batch_width, rows=rows
            )
            if rows_leave_every:
                new_tokens = _generate_rows_leaving(
                    model, input_ids, attention_mask, config, eos_ids, pad_id, cache, rows_leave_every
                )
            else:
                generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                new_tokens = generated[:, input_ids.shape[1] :].cpu()
            for row, index in enumerate(batch):
                outputs[index] = decode_new_tokens(tokenizer, new_tokens[row], eos_ids)
            if partial is not None:
                partial.record({index: outputs[index] for index in batch})
            done += len(batch)
            log_progress(desc, number, len(batches), done, len(user_prompts), started)
    return outputs  # type: ignore[return-value]
