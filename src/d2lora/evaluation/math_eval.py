"""GSM8K-style evaluation: zero-shot greedy generation, last-\\boxed{} answer, accuracy.

The prompt template is filled by replacing `{question}` (the data stage's `fill_template`,
so training prompts and evaluation prompts cannot drift apart), NOT by `str.format`: the
paper's template (App. A) holds a literal `\\boxed{}` with single braces. In YAML it reads
    prompt_template: "{question} Please reason step by step, and put your final answer within \\\\boxed{}."
(YAML turns `\\\\` into one backslash) and renders as
    "<question> Please reason step by step, and put your final answer within \\boxed{}."
"""

from __future__ import annotations

from d2lora.data.mapping import fill_template
from d2lora.evaluation.answers import answers_match, extract_with_rule
from d2lora.evaluation.generation import greedy_generate


def render_math_prompt(prompt_template: str, question: str) -> str:
    # A template written for str.format ("\\boxed{{}}") would silently show the model doubled
    # braces; it is a stale config, not a prompt anyone means.
    if "{{" in prompt_template or "}}" in prompt_template:
        raise ValueError(
            f"math prompt_template {prompt_template!r} doubles braces; templates are filled by replacing "
            "{question}, so write the literal box with single braces: \\boxed{}"
        )
    return fill_template(prompt_template, "question", question)


def score_math_output(row: dict, prompt: str, output: str) -> dict:
    extracted, rule = extract_with_rule(output)
    return {
        "id": row["id"],
        "prompt": prompt,
        "output": output,
        "extracted": extracted,
        "rule": rule,
        "reference": row["answer"],
        "correct": answers_match(extracted, row["answer"]),
    }


def summarize_math(per_example: list[dict]) -> dict:
    n_items = len(per_example)
    return {
        "accuracy": sum(ex["correct"] for ex in per_example) / n_items,
        "n_items": n_items,
        "n_boxed": sum(ex["rule"] == "boxed" for ex in per_example),
    }


def evaluate_math(
    model,
    tokenizer,
    rows: list[dict],
    prompt_template: str,
    max_new_tokens: int,
    batch_size: int,
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
) -> tuple[list[dict], dict]:
    """Per-example records and {"accuracy" (fraction), "n_items", "n_boxed"}."""
    if not rows:
        raise ValueError("evaluate_math: no evaluation rows")
    prompts = [render_math_prompt(prompt_template, row["question"]) for row in rows]
    outputs = greedy_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        progress_desc="gsm8k",
        partial=partial,
        cache=cache,
        compile=compile,
        rows_leave_every=rows_leave_every,
        packed_gqa=packed_gqa,
        filled_cache_only=filled_cache_only,
        native_gqa=native_gqa,
        prompt_width=prompt_width,
        cudnn_attention=cudnn_attention,
        flex_attention=flex_attention,
    )
    per_example = [score_math_output(row, prompt, output) for row, prompt, output in zip(rows, prompts, outputs)]
    return per_example, summarize_math(per_example)
