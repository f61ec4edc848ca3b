"""The machinery every data format uses: the registry of formats, the context a mapper gets, and
the checked field readers whose errors name the file and row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from d2lora.data.schema import FORM_FIELDS
from d2lora.io import DataFileError


@dataclass(frozen=True)
class MappingContext:
    """What a mapping function needs besides the row: naming, errors and the prompt template."""

    fmt: str
    source_name: str
    origin: str
    prompt_template: str | None


Mapper = Callable[[dict, int, MappingContext], "dict | None"]
FORMATS: dict[str, dict[str, Mapper]] = {}
# Formats whose mapper returns None for rows it drops, and the rule it drops them by (for manifests).
DROP_RULES: dict[str, str] = {}


def register_format(fmt: str, *forms: str, drops: str | None = None) -> Callable[[Mapper], Mapper]:
    """Register `fn(raw_row, index, ctx) -> canonical row` as the mapping of `fmt` to `forms`.

    `drops` says which rows the mapper leaves out by returning None (e.g. "rows with an empty
    output"); a format without it must map every row.
    """
    unknown = [form for form in forms if form not in FORM_FIELDS]
    if unknown:
        raise ValueError(f"unknown form(s) {unknown}; known forms: {', '.join(FORM_FIELDS)}")

    def register(fn: Mapper) -> Mapper:
        for form in forms:
            FORMATS.setdefault(fmt, {})[form] = fn
        if drops:
            DROP_RULES[fmt] = drops
        return fn

    return register


def where(index: int, ctx: MappingContext) -> str:
    return f"{ctx.origin}: row {index + 1}"


def require(row: dict, field: str, index: int, ctx: MappingContext) -> Any:
    # None counts as missing: datasets fills a column that a row lacks with None.
    if row.get(field) is None:
        raise DataFileError(f"{where(index, ctx)}: missing field '{field}' (format {ctx.fmt})")
    return row[field]


def require_text(row: dict, field: str, index: int, ctx: MappingContext) -> str:
    value = require(row, field, index, ctx)
    if not isinstance(value, str):
        raise DataFileError(
            f"{where(index, ctx)}: field '{field}' must be text, got {type(value).__name__} (format {ctx.fmt})"
        )
    return value


def require_texts(row: dict, field: str, index: int, ctx: MappingContext) -> list[str]:
    value = require(row, field, index, ctx)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataFileError(f"{where(index, ctx)}: field '{field}' must be a list of strings (format {ctx.fmt})")
    return value


def row_id(row: dict, index: int, ctx: MappingContext) -> str:
    """The source's own id where it has one, else one built from the row's position."""
    if row.get("id") is not None:
        return str(row["id"])
    return f"{ctx.source_name}-{index:06d}"


def fill_template(template: str | None, field: str, value: str) -> str:
    """Put `value` in place of `{field}`.

    Not str.format: the paper's GSM8K prompt holds a literal `\\boxed{}`, which format would
    read as a positional placeholder. No template means the text is the whole user turn.
    """
    if template is None:
        return value
    placeholder = "{" + field + "}"
    if placeholder not in template:
        raise ValueError(f"prompt_template must contain {placeholder}; got {template!r}")
    return template.replace(placeholder, value)


def boxed_solution(steps: str, answer: str) -> str:
    """A worked solution ending the way the evaluation extracts answers (\\boxed{})."""
    return f"{steps.rstrip()}\nThe answer is \\boxed{{{answer}}}."
