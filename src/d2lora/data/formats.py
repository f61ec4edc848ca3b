"""The data formats: each maps one raw row of a source's schema to one canonical row of a form
(d2lora.data.schema). This module holds the synthetic generators' formats, GSM8K and ARC, and the
entry points (`to_canonical`, `map_rows`); the paper's hub datasets and the embedded default's
real stand-ins are in d2lora.data.paper_formats. docs/datasets.md: adding a format.
"""

from __future__ import annotations

import re

from d2lora.data import paper_formats  # noqa: F401  (its formats register themselves on import)
from d2lora.data.mapping import (
    DROP_RULES,
    FORMATS,
    Mapper,
    MappingContext,
    boxed_solution,
    fill_template,
    register_format,
    require,
    require_text,
    require_texts,
    row_id,
    where,
)
from d2lora.data.schema import FORM_FIELDS, validate_rows
from d2lora.io import DataFileError


@register_format("synthetic_math", "pairs")
def _synthetic_math_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    question = require_text(row, "question", index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", question),
        "chosen": boxed_solution(
            "\n".join(require_texts(row, "solution_steps", index, ctx)), require_text(row, "answer", index, ctx)
        ),
        "rejected": boxed_solution(
            "\n".join(require_texts(row, "wrong_steps", index, ctx)), require_text(row, "wrong_answer", index, ctx)
        ),
    }


@register_format("synthetic_math", "math_eval")
def _synthetic_math_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "question": require_text(row, "question", index, ctx),
        "answer": require_text(row, "answer", index, ctx),
    }


@register_format("synthetic_titles", "pairs")
def _synthetic_titles_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract = require_text(row, "abstract", index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "chosen": require_text(row, "title", index, ctx),
        "rejected": None,
    }


@register_format("synthetic_titles", "generation_eval")
def _synthetic_titles_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract = require_text(row, "abstract", index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "reference": require_text(row, "title", index, ctx),
    }


@register_format("synthetic_general", "pairs")
def _synthetic_general_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "prompt": require_text(row, "prompt", index, ctx),
        "chosen": require_text(row, "chosen", index, ctx),
        "rejected": require_text(row, "rejected", index, ctx),
    }


@register_format("arc", "multiple_choice")
def _arc_multiple_choice(row: dict, index: int, ctx: MappingContext) -> dict:
    choices = require(row, "choices", index, ctx)
    if not isinstance(choices, dict):
        raise DataFileError(f"{where(index, ctx)}: field 'choices' must be an object with 'text' and 'label'")
    texts = require_texts(choices, "text", index, ctx)
    labels = require_texts(choices, "label", index, ctx)
    key = str(require(row, "answerKey", index, ctx)).strip()
    # Some ARC rows are labelled 1..4 instead of A..D; their answerKey uses the same labels.
    if key not in labels:
        raise DataFileError(f"{where(index, ctx)}: answerKey {key!r} is not one of the labels {labels}")
    return {
        "id": row_id(row, index, ctx),
        "question": require_text(row, "question", index, ctx),
        "choices": texts,
        "labels": labels,
        "answer_index": labels.index(key),
    }


_GSM8K_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _gsm8k_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    """(reasoning without calculator annotations, final numeric answer without commas)."""
    solution = require_text(row, "answer", index, ctx)
    if "####" not in solution:
        raise DataFileError(f"{where(index, ctx)}: field 'answer' has no '#### <number>' final line")
    reasoning, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not _NUMBER.fullmatch(final):
        raise DataFileError(f"{where(index, ctx)}: final answer {final!r} after '####' is not a number")
    return _GSM8K_CALC.sub("", reasoning).strip(), final


@register_format("gsm8k", "math_eval")
def _gsm8k_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "question": require_text(row, "question", index, ctx),
        "answer": _gsm8k_parts(row, index, ctx)[1],
    }


@register_format("gsm8k", "pairs")
def _gsm8k_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    reasoning, final = _gsm8k_parts(row, index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", require_text(row, "question", index, ctx)),
        "chosen": boxed_solution(reasoning, final),
        "rejected": None,
    }


@register_format("gsm8k_onpolicy", "pairs")
def _gsm8k_onpolicy_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    """GSM8K train question; chosen = its reference solution (boxed), rejected = the base model's
    own sampled solution whose final answer is wrong (written by d2lora.data.onpolicy)."""
    reasoning, final = _gsm8k_parts(row, index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", require_text(row, "question", index, ctx)),
        "chosen": boxed_solution(reasoning, final),
        "rejected": require_text(row, "rejected", index, ctx),
    }


def _canonical_mapper(form: str) -> Mapper:
    def mapper(row: dict, index: int, ctx: MappingContext) -> dict:
        # Only the form's fields are kept; absent ones stay absent for validation to report.
        kept = {k: row[k] for k in FORM_FIELDS[form] if k in row and k != "id"}
        return {"id": row_id(row, index, ctx), **kept}

    return mapper


for _form in FORM_FIELDS:
    register_format("canonical", _form)(_canonical_mapper(_form))


def _mapper(fmt: str, form: str) -> Mapper:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")
    if form not in FORMATS[fmt]:
        raise ValueError(f"format {fmt!r} cannot produce form {form!r}; it produces: {', '.join(sorted(FORMATS[fmt]))}")
    return FORMATS[fmt][form]


def to_canonical(
    raw_rows: list[dict],
    fmt: str,
    form: str,
    prompt_template: str | None,
    source_name: str,
    origin: str | None = None,
) -> list[dict]:
    """Map raw rows of `fmt` to validated rows of `form`.

    `source_name` builds ids for rows that have none; `origin` (default: source_name) is what
    error messages call the source, e.g. a file path or hub id.
    """
    return map_rows(raw_rows, fmt, form, prompt_template, source_name, origin)[0]


def map_rows(
    raw_rows: list[dict],
    fmt: str,
    form: str,
    prompt_template: str | None,
    source_name: str,
    origin: str | None = None,
) -> tuple[list[dict], int]:
    """Like to_canonical, and also how many rows the format's drop rule (DROP_RULES) left out."""
    mapper = _mapper(fmt, form)
    ctx = MappingContext(fmt, source_name, origin or source_name, prompt_template)
    rows, dropped = [], 0
    for index, raw in enumerate(raw_rows):
        if not isinstance(raw, dict):
            raise DataFileError(f"{where(index, ctx)}: expected an object, got {type(raw).__name__}")
        mapped = mapper(raw, index, ctx)
        if mapped is None:
            if fmt not in DROP_RULES:
                raise RuntimeError(f"format {fmt!r} returned no row for {where(index, ctx)} but declares no drop rule")
            dropped += 1
            continue
        rows.append(mapped)
    return validate_rows(rows, form, ctx.origin), dropped
