"""Evaluation: answer extraction, batch-size-independent generation, ROUGE, multiple choice."""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from d2lora.evaluation import (
    answers_match,
    evaluate_math,
    evaluate_multiple_choice,
    evaluate_titles,
    extract_final_answer,
    extract_with_rule,
    generation,
    greedy_generate,
    math_eval,
    multiple_choice,
    titles_eval,
)

PAPER_TEMPLATE = "{question} Please reason step by step, and put your final answer within \\boxed{}."

# (model output, expected answer, rule that should fire)
EXTRACTION_CASES = [
    ("She sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = $18.\n\n\\boxed{18}", "18", "boxed"),
    ("The fraction is \\boxed{\\frac{3}{4}}.", "0.75", "boxed"),
    ("Total cost: \\boxed{18 \\text{ dollars}}", "18", "boxed"),
    ("First guess \\boxed{5}. Wait, recheck: \\boxed{7}", "7", "boxed"),
    ("I will put the final answer within \\boxed{}. The result is 12.", "12", "last_number"),
    ("\\boxed {1,000}", "1000", "boxed"),
    ("\\fbox{42}", "42", "boxed"),
    ("So he paid $\\boxed{\\$1,234.50}$ in total.", "1234.5", "boxed"),
    ("The answer is 42.", "42", "answer_is"),
    ("Adding everything up, the answer is $1,234.", "1234", "answer_is"),
    ("Final Answer: The final answer is 64. I hope it is correct.", "64", "answer_is"),
    ("Step 1: 3 + 12 = 15\n**Answer:** 15 apples", "15", "answer_is"),
    ("The answer is:\n\n99", "99", "answer_is"),
    ("The answer is 5 + 3 = 8.", "8", "answer_is"),
    ("Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72", "hashes"),
    ("She ran 5 cm and then 12 cm.", "12", "last_number"),
    ("I am not sure how to solve this problem.", None, "none"),
    ("", None, "none"),
    ("\\boxed{-5}", "-5", "boxed"),
    ("The temperature drops to -12 degrees.", "-12", "last_number"),
    ("\\boxed{0.50}", "0.5", "boxed"),
    ("\\boxed{12.0}", "12", "boxed"),
    ("\\boxed{x = 12}", "12", "boxed"),
    ("The discount is \\boxed{50\\%}", "50", "boxed"),
    ("\\boxed{\\dfrac{1}{3}}", "1/3", "boxed"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "boxed"),
    ("Half of 60 is 60/2 = 30", "30", "last_number"),
    ("She ate 5/2 pizzas", "2.5", "last_number"),
    ("\\boxed{1{,}000}", "1000", "boxed"),
    ("\\boxed{1\\,000}", "1000", "boxed"),
    ("\\boxed{+5}", "5", "boxed"),
    ("\\boxed{\\text{B}}", "B", "boxed"),
    ("\\boxed{\\textbf{\\$18.00}}", "18", "boxed"),
    ("\\boxed{25^\\circ}", "25", "boxed"),
    # Cut off by the token limit: an unclosed box is not an answer.
    ("Then 3 + 4 = 7, so the total is \\boxed{1", "1", "last_number"),
    ("Pages 3-4 were torn", "4", "last_number"),
]


@pytest.mark.parametrize("text,expected,rule", EXTRACTION_CASES)
def test_extract_with_rule(text, expected, rule):
    assert extract_with_rule(text) == (expected, rule)
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "pred,reference,expected",
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("72.00", "72", True),
        ("1,000", "1000", True),
        ("18 dollars", "18", True),
        ("$18", "18", True),
        ("1/2", "0.5", True),
        ("0.3333333", "1/3", True),
        ("-3", "-3", True),
        ("-3", "3", False),
        ("71", "72", False),
        ("72.5", "72", False),
        (None, "72", False),
        ("B", "b", True),
        ("B", "C", False),
    ],
)
def test_answers_match(pred, reference, expected):
    assert answers_match(pred, reference) is expected


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost 10-100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROMPTS = [
    "Hi",
    "What is 2+2?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Tell me a story about a dragon.",
    "x",
    "A somewhat longer prompt about economics, research papers and their titles.",
]


@pytest.fixture(scope="module")
def varied_model(tokenizer):
    """A tiny random Llama whose greedy outputs differ between prompts.

    The shared `tiny_model` (tied embeddings, std 0.02) just repeats the last prompt token
    ("\\n") for every prompt, which would make any batching comparison vacuous.
    """
    from conftest import TINY_ARCH
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.3,
        **TINY_ARCH,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def single_outputs(varied_model, tokenizer):
    return greedy_generate(varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=1)


def record_generate_calls(model, monkeypatch) -> list[dict]:
    """The keyword arguments of every `model.generate` call from now on (the calls still run)."""
    calls, generate = [], model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_batched_generation_equals_one_at_a_time(varied_model, tokenizer, single_outputs, capfd):
    batched = greedy_generate(varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, progress_desc="t")
    assert len(set(single_outputs)) > 1, "outputs must differ between prompts for the comparison to mean anything"
    assert batched == single_outputs
    stderr = capfd.readouterr().err
    assert "[t] batch 1/2" in stderr and "[t] batch 2/2" in stderr and "items/s" in stderr


def test_static_kv_cache_gives_the_same_answers(varied_model, tokenizer, single_outputs):
    # The speed setting evaluation.<benchmark>.cache: static must not change a single answer.
    static = greedy_generate(varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, cache="static")
    assert static == single_outputs


@pytest.mark.parametrize("prompt_width", ["batch", "longest"])
def test_static_cache_gives_every_batch_one_cache_length(
    varied_model, tokenizer, single_outputs, monkeypatch, prompt_width
):
    # One cache length and a full batch of rows for the whole run is what lets the compiled decoding
    # step be built once (padding rows repeat the last prompt and are dropped); the prompts are padded
    # to the batch's own longest or the run's; the answers stay those of one prompt at a time.
    calls = record_generate_calls(varied_model, monkeypatch)
    static = greedy_generate(
        varied_model,
        tokenizer,
        PROMPTS,
        max_new_tokens=16,
        batch_size=4,
        cache="static",
        compile=False,
        prompt_width=prompt_width,
    )
    shapes = [tuple(call["input_ids"].shape) for call in calls]
    configs = [call["generation_config"] for call in calls]
    assert static == single_outputs
    assert len(PROMPTS) % 4 != 0 and len(shapes) == -(-len(PROMPTS) // 4)
    assert {rows for rows, _ in shapes} == {4}
    encoded = generation.encode_chat_prompts(tokenizer, PROMPTS)
    longest = max(len(ids) for ids in encoded)
    batches = generation.longest_first_batches([len(ids) for ids in encoded], 4)
    own = [max(len(encoded[i]) for i in batch) for batch in batches]
    assert len(set(own)) > 1, "the batches' own widths must differ for the comparison to mean anything"
    assert [width for _, width in shapes] == (own if prompt_width == "batch" else [longest] * len(batches))
    assert {(c.max_cache_len, c.disable_compile) for c in configs} == {(longest + 16, True)}


def test_a_compiled_decoding_step_is_built_once_for_batches_of_their_own_width(varied_model, tokenizer, monkeypatch):
    # transformers compiles only the decoding step (the prefill runs eagerly) and builds its mask over
    # the whole static cache, so batches padded to their own widths keep its shapes: no recompile after
    # the first batch. On the CPU through a backend that counts the graphs dynamo hands it.
    from transformers import CompileConfig

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(len(example_inputs))
        return graph_module.forward

    generate = varied_model.generate
    graphs_after_batch = []

    def compiled_generate(*args, generation_config, **kwargs):
        generation_config.compile_config = CompileConfig(backend=counting_backend, mode=None)
        generation_config.compile_config._compile_all_devices = True  # transformers compiles on CUDA only otherwise
        out = generate(*args, generation_config=generation_config, **kwargs)
        graphs_after_batch.append(len(graphs))
        return out

    monkeypatch.setattr(varied_model, "generate", compiled_generate)
    torch._dynamo.reset()
    try:
        greedy_generate(varied_model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=4, cache="static", compile=True)
    finally:
        torch._dynamo.reset()
        if hasattr(varied_model, "_compiled_call"):
            del varied_model._compiled_call  # later tests decode eagerly on this module-scoped model
    assert len(graphs_after_batch) == 2 and graphs_after_batch[0] > 0, graphs_after_batch
    assert graphs_after_batch[1] == graphs_after_batch[0], f"the second batch recompiled: {graphs_after_batch}"


def test_dynamic_cache_keeps_each_batch_its_own_shape(varied_model, tokenizer, monkeypatch):
    calls = record_generate_calls(varied_model, monkeypatch)
    greedy_generate(varied_model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=4)
    shapes = [tuple(call["input_ids"].shape) for call in calls]
    assert shapes[-1][0] == len(PROMPTS) % 4 and len({width for _, width in shapes}) > 1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_finished_rows_leave_the_batch_without_changing_an_answer(varied_model, tokenizer, monkeypatch, cache):
    # A random model never emits EOS in 16 tokens; a token that some rows write early and others
    # late (or never) stands in for it, so rows end at different steps and leave at different rounds.
    plain_ids = greedy_generate(varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=6)
    encoded = generation.encode_chat_prompts(tokenizer, [PROMPTS[0]])
    first = varied_model.generate(input_ids=torch.tensor(encoded), max_new_tokens=4, do_sample=False)
    stop = int(first[0, -1])
    monkeypatch.setattr(generation, "stop_token_ids", lambda model, tok: [tok.eos_token_id, stop])
    plain = greedy_generate(
        varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=6, cache=cache, compile=False
    )
    assert len({len(text) for text in plain}) > 2, "rows must end at different steps for the test to mean anything"
    assert plain != plain_ids

    rounds = []
    real_generate = varied_model.generate

    def spy(**kwargs):
        rounds.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(varied_model, "generate", spy)
    leaving = greedy_generate(
        varied_model,
        tokenizer,
        PROMPTS,
        max_new_tokens=16,
        batch_size=6,
        cache=cache,
        compile=False,
        rows_leave_every=2,
    )
    assert leaving == plain
    assert rounds[0] == 6 and rounds == sorted(rounds, reverse=True) and rounds[-1] < 6, rounds


@pytest.mark.parametrize("forward", ["packed_gqa_attention_forward", "native_gqa_attention_forward"])
def test_grouped_attention_equals_sdpa_for_a_decoding_step(forward):
    # One query token, 8 query heads on 2 KV heads, a padding mask shared by the heads: folding the
    # heads onto the KV heads (packed), or SDPA's enable_gqa with the mask (native), must give SDPA's
    # result over repeated K and V.
    from transformers.integrations.sdpa_attention import repeat_kv

    from d2lora.evaluation import packed_gqa

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of the first row
    grouped, _ = getattr(packed_gqa, forward)(module, query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert grouped.shape == (3, 1, 8, 16)
    torch.testing.assert_close(grouped, expected)


def test_flex_attention_equals_sdpa_for_a_decoding_step(monkeypatch):
    # A decoding step over a cache of 12 positions in blocks of 4: the first row's first block is all
    # left padding, the last block is not yet written for any row. FlexAttention over the grouped heads
    # with the block mask must give SDPA's result over repeated K and V, and skip the masked blocks.
    from transformers.integrations.sdpa_attention import repeat_kv

    from d2lora.evaluation import packed_gqa

    monkeypatch.setattr(packed_gqa, "FLEX_BLOCK", 4)
    masks = []
    real_create = packed_gqa.create_block_mask

    def spy(*args, **kwargs):
        masks.append(real_create(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(packed_gqa, "create_block_mask", spy)
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 12, 16), torch.randn(3, 2, 12, 16)
    mask = torch.ones(3, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding of the first row: its whole first block and one more position
    mask[..., 7:] = False  # not yet written
    flex, _ = packed_gqa.flex_gqa_attention_forward(module, query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert flex.shape == (3, 1, 8, 16)
    torch.testing.assert_close(flex, expected)
    (block_mask,) = masks
    dense = block_mask.to_dense()[:, 0, 0]  # (rows, kv blocks): which blocks each row reads
    assert dense.tolist() == [[0, 1, 0], [1, 1, 0], [1, 1, 0]]


def test_flex_attention_gives_the_same_answers(varied_model, tokenizer, single_outputs, monkeypatch):
    from d2lora.evaluation import packed_gqa

    query_lengths, real = [], packed_gqa.flex_attention

    def spy(query, *args, **kwargs):
        query_lengths.append(query.shape[2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(packed_gqa, "flex_attention", spy)
    answers = greedy_generate(
        varied_model,
        tokenizer,
        PROMPTS,
        max_new_tokens=16,
        batch_size=4,
        cache="static",
        compile=False,
        flex_attention=True,
    )
    assert answers == single_outputs
    # two batches of 15 decoding steps through FlexAttention in each of the 2 layers; prefills on SDPA
    assert query_lengths == [1] * (2 * 15 * varied_model.config.num_hidden_layers)
    assert varied_model.config._attn_implementation == "sdpa", "the model's own attention is restored"


def test_flex_attention_refuses_query_heads_per_kv_head_not_a_power_of_2(varied_model, tokenizer):
    model = copy.deepcopy(varied_model)
    model.config.num_attention_heads, model.config.num_key_value_heads = 6, 2
    with pytest.raises(
        ValueError, match=r"flex_attention: the model has 6 query heads over 2 KV heads, 3 each; .*needs a power of 2"
    ):
        greedy_generate(
            model, tokenizer, PROMPTS[:1], max_new_tokens=2, batch_size=1, cache="static", flex_attention=True
        )
    assert model.config._attn_implementation == "sdpa", "refused before the attention is swapped"


@pytest.mark.parametrize("setting", ["packed_gqa", "flex_attention"])
def test_compiled_decoding_step_gives_the_same_answers(varied_model, tokenizer, single_outputs, monkeypatch, setting):
    # transformers compiles the static cache's decoding step only on accelerators; here it is made to
    # compile on the CPU (inductor, one graph for the whole forward), so that the attention is traced
    # as on a GPU: no graph break, and the answers of the plain path.
    from transformers.generation.configuration_utils import CompileConfig

    real_config = generation.greedy_config
    compiled_forwards = []

    def compiling_config(*args, **kwargs):
        config = real_config(*args, **kwargs)
        config.compile_config = CompileConfig(fullgraph=True, mode="default")
        config.compile_config._compile_all_devices = True
        return config

    def counting_backend(graph, example_inputs):
        compiled_forwards.append(graph)
        return torch._inductor.compile(graph, example_inputs)

    monkeypatch.setattr(generation, "greedy_config", compiling_config)
    torch._dynamo.reset()
    real_compile = torch.compile

    def compile_counting(model, **kwargs):
        return real_compile(model, **{**kwargs, "backend": counting_backend, "mode": None})

    monkeypatch.setattr(torch, "compile", compile_counting)
    model = copy.deepcopy(varied_model)  # transformers keeps the compiled forward on the model
    answers = greedy_generate(
        model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, cache="static", **{setting: True}
    )
    assert answers == single_outputs
    assert len(compiled_forwards) == 1, "one compiled decoding step for both batches"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cache": "static", "packed_gqa": True}, "packed_gqa, native_gqa and flex_attention"),
        ({"cache": "dynamic"}, "needs cache: static"),
        ({"cache": "static", "compile": False, "filled_cache_only": True}, "filled_cache_only: false"),
    ],
)
def test_flex_attention_refuses_what_it_cannot_combine(varied_model, tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        greedy_generate(
            varied_model, tokenizer, PROMPTS[:1], max_new_tokens=2, batch_size=1, flex_attention=True, **settings
        )


@pytest.mark.parametrize("setting", ["packed_gqa", "native_gqa"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_grouped_attention_gives_the_same_answers(varied_model, tokenizer, single_outputs, monkeypatch, cache, setting):
    from d2lora.evaluation import packed_gqa

    assert varied_model.config.num_key_value_heads < varied_model.config.num_attention_heads
    forward = f"{setting}_attention_forward"
    query_lengths, real = [], getattr(packed_gqa, forward)

    def spy(module, query, *args, **kwargs):
        query_lengths.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(packed_gqa, forward, spy)  # what the registered attention calls
    answers = greedy_generate(
        varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, cache=cache, compile=False, **{setting: True}
    )
    assert answers == single_outputs
    assert 1 in query_lengths and max(query_lengths) > 1, "prefill and decoding steps both go through it"
    assert varied_model.config._attn_implementation == "sdpa", "the model's own attention is restored"


def test_packed_and_native_gqa_are_one_choice(varied_model, tokenizer):
    with pytest.raises(ValueError, match="packed_gqa, native_gqa and flex_attention"):
        greedy_generate(
            varied_model, tokenizer, PROMPTS[:1], max_new_tokens=2, batch_size=1, packed_gqa=True, native_gqa=True
        )


@pytest.mark.parametrize("gqa", ["transformers", "packed"])
def test_attention_without_cudnn_gives_the_same_answers(varied_model, tokenizer, single_outputs, monkeypatch, gqa):
    # Every SDPA call of the run (prefill and decoding) sees cuDNN's kernel switched off, the other
    # kernels on; the run with the default sees it on; afterwards it is on again. A CPU has no cuDNN
    # kernel, so the answers stay those of the plain path.
    real = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    settings = {"packed_gqa": gqa == "packed", "cache": "static", "compile": False}
    without = greedy_generate(
        varied_model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, cudnn_attention=False, **settings
    )
    assert without == single_outputs
    assert seen and set(seen) == {(False, True)}
    seen.clear()
    assert greedy_generate(varied_model, tokenizer, PROMPTS[:2], max_new_tokens=4, batch_size=2, **settings)
    assert seen and set(seen) == {(True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert varied_model.config._attn_implementation == "sdpa", "the model's own attention is restored"


def test_native_gqa_without_cudnn_is_refused(varied_model, tokenizer):
    with pytest.raises(ValueError, match="use packed_gqa with cudnn_attention: false"):
        greedy_generate(
            varied_model, tokenizer, PROMPTS[:1], max_new_tokens=2, batch_size=1, native_gqa=True, cudnn_attention=False
        )


def test_rows_leaving_refuses_a_compiled_static_cache(varied_model, tokenizer):
    with pytest.raises(ValueError, match="evaluation.gsm8k.compile"):
        greedy_generate(
            varied_model, tokenizer, PROMPTS[:1], max_new_tokens=2, batch_size=1, cache="static", rows_leave_every=2
        )


@pytest.mark.parametrize("gqa", ["transformers", "packed", "native"])
def test_attention_over_the_filled_cache_gives_the_same_answers(
    varied_model, tokenizer, single_outputs, monkeypatch, gqa
):
    # The static cache is as long as the longest prompt + 16 new tokens; with filled_cache_only each
    # batch keeps its own width and every attention call reads only the positions written so far.
    from d2lora.evaluation import packed_gqa

    monkeypatch.setattr(packed_gqa, "FILLED_WINDOW", 4)  # 128 on a GPU; windows this short show the cut here
    reads = []
    real = packed_gqa.decoding_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        reads.append((query.shape[2], attention_mask.shape[-1], key.shape[2], kwargs["gqa"]))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(packed_gqa, "decoding_attention_forward", spy)  # what register() installs calls it
    calls = record_generate_calls(varied_model, monkeypatch)
    filled = greedy_generate(
        varied_model,
        tokenizer,
        PROMPTS,
        max_new_tokens=16,
        batch_size=4,
        cache="static",
        compile=False,
        packed_gqa=gqa == "packed",
        native_gqa=gqa == "native",
        filled_cache_only=True,
    )
    widths = [call["input_ids"].shape[1] for call in calls]
    assert filled == single_outputs
    assert {kind for *_, kind in reads} == {gqa}
    lengths = [len(ids) for ids in generation.encode_chat_prompts(tokenizer, PROMPTS)]
    assert len(set(widths)) > 1 and widths[0] == max(lengths), "each batch its own prompt width"
    decoding = [(mask, cache) for q_length, mask, cache, _ in reads if q_length == 1]
    prefills = [mask for q_length, mask, _, _ in reads if q_length > 1]
    assert decoding and prefills
    # a decoding step's mask covers the prompt and the tokens so far, in windows of 4, not the whole
    # static cache (the attention cuts the keys and values to it: test_filled_cache_reads_only_the_masked_positions)
    cache_length = max(widths) + 16

    def window(seen):
        return min(cache_length, -(-seen // 4) * 4)

    assert min(mask for mask, _ in decoding) == window(min(widths) + 1)
    assert max(mask for mask, _ in decoding) == window(max(widths) + 15)
    assert {cache for _, cache in decoding} == {cache_length}
    assert sum(mask < cache for mask, cache in decoding) > len(decoding) / 2
    assert set(prefills) == {window(width) for width in widths}
    assert varied_model.config._attn_implementation == "sdpa", "the model's own attention is restored"


@pytest.mark.parametrize("gqa", ["transformers", "packed", "native"])
def test_filled_cache_reads_only_the_masked_positions(gqa):
    # Garbage past the mask's length (the cache's unwritten positions) must not reach the output.
    from d2lora.evaluation.packed_gqa import decoding_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., :2] = False
    poisoned_key, poisoned_value = key.clone(), value.clone()
    poisoned_key[:, :, 6:], poisoned_value[:, :, 6:] = float("nan"), float("nan")
    clean, _ = decoding_attention_forward(
        module, query, key[:, :, :6], value[:, :, :6], mask, scaling=0.25, gqa=gqa, filled_cache_only=True
    )
    cut, _ = decoding_attention_forward(
        module, query, poisoned_key, poisoned_value, mask, scaling=0.25, gqa=gqa, filled_cache_only=True
    )
    torch.testing.assert_close(cut, clean)


def test_filled_cache_mask_covers_the_tokens_seen_and_is_never_skipped():
    from d2lora.evaluation import packed_gqa
    from d2lora.evaluation.packed_gqa import filled_cache_mask

    seen = torch.ones(2, 5, dtype=torch.long)
    seen[0, :2] = 0  # left padding
    mask = filled_cache_mask(
        batch_size=2, q_length=1, kv_length=300, q_offset=4, attention_mask=seen, allow_is_causal_skip=True
    )
    assert mask.shape == (2, 1, 1, packed_gqa.FILLED_WINDOW)  # 5 seen, read in one window
    assert mask[0, 0, 0, :5].tolist() == [False, False, True, True, True] and mask[1, ..., :5].all()
    assert not mask[..., 5:].any(), "the window's unwritten positions are masked"
    assert filled_cache_mask(batch_size=2, q_length=1, kv_length=12, q_offset=4, attention_mask=seen).shape[-1] == 12
    # no padding and one query token: transformers would skip the mask; the length must still reach the attention
    unpadded = filled_cache_mask(
        batch_size=1, q_length=1, kv_length=300, q_offset=4, attention_mask=torch.ones(1, 5, dtype=torch.long)
    )
    assert unpadded is not None and unpadded.shape[-1] == packed_gqa.FILLED_WINDOW


@pytest.mark.parametrize(("cache", "compile"), [("static", True), ("dynamic", False)])
def test_attention_over_the_filled_cache_needs_an_eager_static_cache(varied_model, tokenizer, cache, compile):
    with pytest.raises(ValueError, match="filled_cache_only .* needs cache: static and compile: false"):
        greedy_generate(
            varied_model,
            tokenizer,
            PROMPTS[:1],
            max_new_tokens=2,
            batch_size=1,
            cache=cache,
            compile=compile,
            filled_cache_only=True,
        )


def test_unknown_cache_kind_is_refused(varied_model, tokenizer):
    with pytest.raises(ValueError, match="cache must be one of"):
        greedy_generate(varied_model, tokenizer, PROMPTS[:1], max_new_tokens=2, batch_size=1, cache="paged")


def _save_adapter_with_nonzero_b(model_dir, out, seed: int):
    """A rank-4, alpha-8 LoRA adapter on every linear layer of the model, B drawn away from zero so
    that the adapter changes the output, saved to `out` as safetensors."""
    import torch

    from d2lora.models import load_model
    from d2lora.training.inits import fresh_adapter
    from d2lora.training.variants import BUILTIN_VARIANTS

    torch.manual_seed(seed)
    peft_model = fresh_adapter(
        load_model(model_dir), {"rank": 4, "alpha": 8, "target_modules": "all-linear"}, BUILTIN_VARIANTS["lora"]
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.save_pretrained(str(out), safe_serialization=True)


def test_merged_adapter_matches_the_unmerged_one(tiny_model_dir, tmp_path):
    """evaluation.merge_adapter folds W + BA once; logits stay within bf16/fp32 rounding."""
    import torch

    from d2lora.models import load_model

    _save_adapter_with_nonzero_b(tiny_model_dir, tmp_path / "adapter", seed=0)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        unmerged = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter").eval()(ids).logits
        merged_model = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter", merge_adapter=True).eval()
        merged = merged_model(ids).logits
        base = load_model(tiny_model_dir).eval()(ids).logits
    assert not hasattr(merged_model, "peft_config"), "the merged model must be a plain model"
    assert (unmerged - base).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"
    assert torch.allclose(merged, unmerged, atol=1e-4)


def test_merge_in_bf16_rounds_once_after_a_float32_merge(tiny_model_dir, tmp_path):
    """merge_adapter with dtype bfloat16 loads float32 weights (onto the card where it has room:
    merge_device), folds W + scale * BA in float32 and rounds once: every adapted weight equals that
    sum computed here from the saved files, cast to bf16."""
    import torch
    from safetensors.torch import load_file

    from d2lora.models import ADAPTER_WEIGHTS, load_model

    _save_adapter_with_nonzero_b(tiny_model_dir, tmp_path / "adapter", seed=1)
    adapter = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    base = load_model(tiny_model_dir).state_dict()
    merged = load_model(
        tiny_model_dir, dtype="bfloat16", device="cpu", adapter_dir=tmp_path / "adapter", merge_adapter=True
    ).state_dict()
    checked = 0
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        expected = (base[f"{module}.weight"] + (lora_b @ lora_a) * (8 / 4)).to(torch.bfloat16)
        assert merged[f"{module}.weight"].dtype == torch.bfloat16
        assert torch.equal(merged[f"{module}.weight"], expected), module
        checked += 1
    assert checked >= 7, "every linear layer of the tiny model is adapted"


def test_a_checkpoint_stored_in_bf16_merges_without_a_float32_copy(tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 checkpoint evaluated in bf16 loads in bf16 (no float32 copy of the model) and still folds
    W + scale * BA in float32 with one rounding: every adapted weight equals that sum from the files."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from d2lora import models
    from d2lora.models import ADAPTER_WEIGHTS, load_model, stored_dtype

    stored = tmp_path / "bf16"
    load_model(tiny_model_dir, dtype="bfloat16").save_pretrained(str(stored), safe_serialization=True)
    assert stored_dtype(stored) == torch.bfloat16 and stored_dtype(tiny_model_dir) == torch.float32
    assert stored_dtype(tmp_path) is None
    _save_adapter_with_nonzero_b(tiny_model_dir, tmp_path / "adapter", seed=2)
    adapter = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    base = load_file(str(next(stored.glob("*.safetensors"))))

    loads = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(k["dtype"]) or real(*a, **k)
    )
    monkeypatch.setattr(models, "merge_device", lambda *a: pytest.fail("no float32 copy to place"))
    merged = load_model(stored, dtype="bfloat16", adapter_dir=tmp_path / "adapter", merge_adapter=True).state_dict()
    assert loads == [torch.bfloat16]
    checked = 0
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        expected = (base[f"{module}.weight"].float() + (lora_b @ lora_a) * (8 / 4)).to(torch.bfloat16)
        assert merged[f"{module}.weight"].dtype == torch.bfloat16
        assert torch.equal(merged[f"{module}.weight"], expected), module
        checked += 1
    assert checked >= 7, "every linear layer of the tiny model is adapted"


def test_merge_happens_on_the_card_only_with_room_for_the_float32_copy(tiny_model_dir, monkeypatch):
    import torch

    from d2lora.models import merge_device

    stored = sum(path.stat().st_size for path in tiny_model_dir.glob("*.safetensors"))
    assert merge_device(tiny_model_dir, "cpu") == "cpu"
    assert merge_device(tiny_model_dir, "mps") == "cpu"
    for free, where in ((2 * stored + 1, "cuda"), (2 * stored - 1, "cpu")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 10 * free))
        assert merge_device(tiny_model_dir, "cuda") == where


def test_generation_returns_original_order(varied_model, tokenizer, single_outputs):
    reversed_outputs = greedy_generate(varied_model, tokenizer, PROMPTS[::-1], max_new_tokens=16, batch_size=3)
    assert reversed_outputs == single_outputs[::-1]


def test_generation_ignores_sampling_defaults_of_the_model(varied_model, tokenizer, single_outputs, capfd):
    # Instruct checkpoints ship do_sample/temperature/top_p in generation_config.json.
    saved = varied_model.generation_config
    varied_model.generation_config = saved.__class__(
        **{**saved.to_dict(), "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    )
    try:
        outputs = greedy_generate(varied_model, tokenizer, PROMPTS[:3], max_new_tokens=16, batch_size=2)
    finally:
        varied_model.generation_config = saved
    assert outputs == single_outputs[:3]
    assert "temperature" not in capfd.readouterr().err


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_generation_with_peft_model(varied_model, tokenizer, single_outputs):
    import copy

    from peft import LoraConfig, get_peft_model

    # A fresh LoRA adapter has B = 0, so the wrapped model must generate what the base does.
    peft_model = get_peft_model(copy.deepcopy(varied_model), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    assert greedy_generate(peft_model, tokenizer, PROMPTS[:2], max_new_tokens=16, batch_size=2) == single_outputs[:2]


def test_prompts_are_single_chat_turns_without_extra_special_tokens(tokenizer):
    ids = generation.encode_chat_prompts(tokenizer, ["Hello"])[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_decode_stops_at_first_stop_token(tokenizer):
    hello = tokenizer.encode("Hello world", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    tokens = torch.tensor(hello + [eos] + tokenizer.encode(" junk", add_special_tokens=False) + [eos])
    assert generation.decode_new_tokens(tokenizer, tokens, [eos]) == "Hello world"


def test_longest_first_batches():
    assert generation.longest_first_batches([3, 9, 5, 9], 3) == [[1, 3, 2], [0]]
    with pytest.raises(ValueError):
        generation.longest_first_batches([1], 0)


# ---------------------------------------------------------------- math

MATH_ROWS = [
    {
        "id": "m0",
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "answer": "72",
    },
    {"id": "m1", "question": "What is 2 + 3?", "answer": "5"},
    {"id": "m2", "question": "What is 10 - 1?", "answer": "9"},
]


def test_evaluate_math_scores_canned_outputs(monkeypatch, tokenizer):
    seen = {}

    def fake_generate(model, tok, prompts, max_new_tokens, batch_size, progress_desc=None, partial=None, **_):
        seen["prompts"] = prompts
        return ["48 + 24 = 72, so \\boxed{72}", "The answer is 5.", "I do not know."]

    monkeypatch.setattr(math_eval, "greedy_generate", fake_generate)
    per_example, scores = evaluate_math(None, tokenizer, MATH_ROWS, PAPER_TEMPLATE, 64, 2)
    assert seen["prompts"][1] == (
        "What is 2 + 3? Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert [ex["rule"] for ex in per_example] == ["boxed", "answer_is", "none"]
    assert [ex["correct"] for ex in per_example] == [True, True, False]
    assert scores == {"accuracy": pytest.approx(2 / 3), "n_items": 3, "n_boxed": 1}
    assert set(per_example[0]) == {"id", "prompt", "output", "extracted", "rule", "reference", "correct"}


def test_evaluate_math_runs_the_model(varied_model, tokenizer):
    per_example, scores = evaluate_math(varied_model, tokenizer, MATH_ROWS, PAPER_TEMPLATE, 8, 2)
    assert [ex["id"] for ex in per_example] == ["m0", "m1", "m2"]
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["n_items"] == 3


@pytest.mark.parametrize(
    "template,message",
    [("{question} within \\boxed{{}}.", "single braces"), ("Solve it within \\boxed{}.", "must contain")],
)
def test_bad_math_templates_are_rejected(tokenizer, template, message):
    with pytest.raises(ValueError, match=message):
        evaluate_math(None, tokenizer, MATH_ROWS, template, 8, 1)


def test_config_math_template_renders_the_paper_prompt():
    import yaml
    from conftest import REPO

    template = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["datasets"]["math"]["prompt_template"]
    assert math_eval.render_math_prompt(template, "Q?") == (
        "Q? Please reason step by step, and put your final answer within \\boxed{}."
    )


# ---------------------------------------------------------------- titles

TITLE_ROWS = [
    {"id": "t0", "prompt": "Abstract one", "reference": "Monetary Policy and Inflation Expectations"},
    {"id": "t1", "prompt": "Abstract two", "reference": "Trade Networks in Early Modern Europe"},
]


def test_rouge_identical_and_disjoint(monkeypatch, tokenizer):
    outputs = [
        'Title: "Monetary Policy and Inflation Expectations"\nThis paper studies...',
        "Quantum chromodynamics lattice",
    ]
    monkeypatch.setattr(titles_eval, "greedy_generate", lambda *args, **kwargs: outputs)
    per_example, scores = evaluate_titles(None, tokenizer, TITLE_ROWS, 24, 2)
    assert per_example[0]["prediction"] == "Monetary Policy and Inflation Expectations"
    assert [per_example[0][k] for k in ("rouge1", "rouge2", "rougeL")] == [1.0, 1.0, 1.0]
    assert [per_example[1][k] for k in ("rouge1", "rouge2", "rougeL")] == [0.0, 0.0, 0.0]
    assert scores == {"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0, "n_items": 2}


@pytest.mark.parametrize(
    "output,title",
    [
        ("**Title:** Growth and Debt", "Growth and Debt"),
        ("\n\n\u201cGrowth and Debt\u201d\nMore text", "Growth and Debt"),
        ("Title:\nGrowth and Debt", "Growth and Debt"),
        ("# Growth and Debt", "Growth and Debt"),
        ("", ""),
    ],
)
def test_extract_title(output, title):
    assert titles_eval.extract_title(output) == title


def test_evaluate_titles_runs_the_model(varied_model, tokenizer):
    per_example, scores = evaluate_titles(varied_model, tokenizer, TITLE_ROWS, 8, 2)
    assert [ex["id"] for ex in per_example] == ["t0", "t1"]
    assert all(0.0 <= scores[k] <= 100.0 for k in ("rouge1", "rouge2", "rougeL"))


# ---------------------------------------------------------------- multiple choice

MC_ROWS = [
    {
        "id": "a0",
        "question": "What is the capital of France?",
        "choices": ["Paris", "London", "Berlin", "Rome"],
        "labels": ["A", "B", "C", "D"],
        "answer_index": 2,
    },
    {
        "id": "a1",
        "question": "Which gas do plants absorb from the air?",
        "choices": ["carbon dioxide", "oxygen", "neon"],
        "labels": ["A", "B", "C"],
        "answer_index": 0,
    },
    {
        "id": "a2",
        "question": "A long question about the water cycle: which process turns lake water into vapour "
        "under strong summer sunlight?",
        "choices": ["evaporation", "condensation", "precipitation of rain", "runoff"],
        "labels": ["1", "2", "3", "4"],
        "answer_index": 0,
    },
]


def test_encode_pair_moves_trailing_whitespace_like_lm_eval(tokenizer):
    context = multiple_choice.mc_context(tokenizer, "What is the capital of France?")
    assert context.endswith("assistant\n")
    context_ids, continuation_ids = multiple_choice.encode_pair(tokenizer, context, "Paris")
    assert tokenizer.decode(context_ids).endswith("assistant")
    assert tokenizer.decode(continuation_ids) == "\nParis"


def test_multiple_choice_batched_equals_one_at_a_time(varied_model, tokenizer):
    single, single_scores = evaluate_multiple_choice(varied_model, tokenizer, MC_ROWS, batch_size=1)
    batched, batched_scores = evaluate_multiple_choice(varied_model, tokenizer, MC_ROWS, batch_size=5)
    for one, many in zip(single, batched):
        assert torch.allclose(torch.tensor(one["choice_logprobs"]), torch.tensor(many["choice_logprobs"]), atol=1e-4)
    assert single_scores == batched_scores
    assert set(single_scores) == {"accuracy", "accuracy_norm", "n_items"}


def test_multiple_choice_matches_a_direct_forward_pass(varied_model, tokenizer):
    row = MC_ROWS[1]
    context = multiple_choice.mc_context(tokenizer, row["question"])
    context_ids, continuation_ids = multiple_choice.encode_pair(tokenizer, context, row["choices"][0])
    with torch.no_grad():
        logits = varied_model(torch.tensor([context_ids + continuation_ids])).logits[0].log_softmax(-1)
    expected = sum(logits[len(context_ids) - 1 + k, token].item() for k, token in enumerate(continuation_ids))
    per_example, _ = evaluate_multiple_choice(varied_model, tokenizer, [row], batch_size=2)
    assert per_example[0]["choice_logprobs"][0] == pytest.approx(expected, abs=1e-4)
    per_char = per_example[0]["choice_logprobs_per_char"][0]
    assert per_char == pytest.approx(expected / len(row["choices"][0]), abs=1e-4)


class BiasedLM(torch.nn.Module):
    """Adds a large logit to one token, so a continuation ending in it must win."""

    def __init__(self, inner, token_id: int):
        super().__init__()
        self.inner, self.token_id = inner, token_id

    def forward(self, **kwargs):
        logits = self.inner(**kwargs).logits.clone()
        logits[..., self.token_id] += 30.0
        return SimpleNamespace(logits=logits)


def test_multiple_choice_picks_the_forced_choice(varied_model, tokenizer):
    row = MC_ROWS[0]
    context = multiple_choice.mc_context(tokenizer, row["question"])
    continuations = [multiple_choice.encode_pair(tokenizer, context, c)[1] for c in row["choices"]]
    target = continuations[row["answer_index"]][-1]
    assert all(target not in ids for i, ids in enumerate(continuations) if i != row["answer_index"])
    per_example, scores = evaluate_multiple_choice(BiasedLM(varied_model, target), tokenizer, [row], batch_size=4)
    assert per_example[0]["predicted_index"] == 2 and per_example[0]["predicted_label"] == "C"
    assert scores == {"accuracy": 1.0, "accuracy_norm": 1.0, "n_items": 1}


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_multiple_choice_with_peft_model(varied_model, tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(varied_model), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    base, _ = evaluate_multiple_choice(varied_model, tokenizer, MC_ROWS[:2], batch_size=3)
    wrapped, _ = evaluate_multiple_choice(peft_model, tokenizer, MC_ROWS[:2], batch_size=3)
    for a, b in zip(base, wrapped):
        assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-4)


def test_multiple_choice_agrees_with_lm_eval(varied_model, tokenizer):
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    lm = lm_eval_hf.HFLM(pretrained=varied_model, tokenizer=tokenizer, device="cpu", batch_size=4)
    requests = []
    for row in MC_ROWS:
        context = lm.apply_chat_template([{"role": "user", "content": f"Question: {row['question']}\nAnswer:"}])
        requests += [Instance("loglikelihood", {}, (context, choice), 0) for choice in row["choices"]]
    theirs = [loglik for loglik, _ in lm.loglikelihood(requests)]
    ours, _ = evaluate_multiple_choice(varied_model, tokenizer, MC_ROWS, batch_size=4)
    assert sum((ex["choice_logprobs"] for ex in ours), []) == pytest.approx(theirs, abs=1e-4)
    assert not any(math.isnan(x) for x in theirs)


def test_answers_match_survives_a_runaway_number():
    runaway = "4" + "0" * 400
    assert answers_match(runaway, "40") is False
    assert answers_match(runaway, runaway) is True


def _weights(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_kept_base_weights_build_the_same_models_from_one_read(tiny_model_dir, tmp_path, monkeypatch):
    """evaluation.server.keep_base_weights (d2lora.base_weights): inside `keeping`, the checkpoint is
    read once, and every model built from the kept tensors equals the one read from the files, a
    merged adapter included; a merge does not write into the kept tensors; a rewritten checkpoint
    is read again; a block that does not keep frees them."""
    from d2lora import base_weights
    from d2lora.evaluation.generation import stop_token_ids
    from d2lora.models import load_model, load_tokenizer

    _save_adapter_with_nonzero_b(tiny_model_dir, tmp_path / "adapter", seed=1)
    base, merged = (
        _weights(load_model(tiny_model_dir)),
        _weights(load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter", merge_adapter=True)),
    )
    reads, read = [], base_weights._read
    monkeypatch.setattr(base_weights, "_read", lambda folder: reads.append(folder) or read(folder))
    base_weights.forget()
    try:
        with base_weights.keeping(True):
            first = load_model(tiny_model_dir)
            assert len(reads) == 1 and base_weights.kept_key() is not None
            kept_merged = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter", merge_adapter=True)
            again = load_model(tiny_model_dir)
            assert len(reads) == 1, "the next models came from the kept tensors"
            for model, expected in ((first, base), (kept_merged, merged), (again, base)):
                got = _weights(model)
                assert got.keys() == expected.keys()
                assert all(torch.equal(got[name], expected[name]) for name in expected)
            assert stop_token_ids(again, load_tokenizer(tiny_model_dir)) == stop_token_ids(
                load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
            ), "the generation config comes from the folder too"
            # a rewritten checkpoint (same name, new modification time) is read again
            checkpoint = next(tiny_model_dir.glob("*.safetensors"))
            stat = checkpoint.stat()
            os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
            load_model(tiny_model_dir)
            assert len(reads) == 2
        with base_weights.keeping(False):
            assert base_weights.kept_key() is None
            load_model(tiny_model_dir)
        assert len(reads) == 2, "without keeping, from_pretrained reads the files itself"
        assert set(reads) == {tiny_model_dir.resolve()}
    finally:
        base_weights.forget()
