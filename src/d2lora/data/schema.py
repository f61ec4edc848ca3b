"""The canonical on-disk forms of prepared data, and their validation.

Every prepared file holds rows of exactly one form; later stages (training, evaluation)
rely on these fields and nothing else, so a row is checked once here instead of at each use.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from d2lora.io import DataFileError

PAIRS_FIELDS = ("id", "prompt", "chosen", "rejected")
MATH_EVAL_FIELDS = ("id", "question", "answer")
GENERATION_EVAL_FIELDS = ("id", "prompt", "reference")
MULTIPLE_CHOICE_FIELDS = ("id", "question", "choices", "labels", "answer_index")

FORM_FIELDS: dict[str, tuple[str, ...]] = {
    "pairs": PAIRS_FIELDS,
    "math_eval": MATH_EVAL_FIELDS,
    "generation_eval": GENERATION_EVAL_FIELDS,
    "multiple_choice": MULTIPLE_CHOICE_FIELDS,
}

# Fields that may be null: a training pair without a rejected answer (SFT-only sources).
NULLABLE = {("pairs", "rejected")}


def _where(path: str | os.PathLike, rownum: int) -> str:
    return f"{path}: row {rownum}"


def _check_text(row: dict, field: str, where: str, nullable: bool) -> None:
    value = row[field]
    if value is None and nullable:
        return
    if not isinstance(value, str):
        kind = "a string or null" if nullable else "a string"
        raise DataFileError(f"{where}: field '{field}' must be {kind}, got {type(value).__name__}")
    # An empty answer or prompt trains or scores nothing; it always means a mapping went wrong.
    if not value.strip():
        raise DataFileError(f"{where}: field '{field}' is empty")


def _check_string_list(row: dict, field: str, where: str) -> list:
    value = row[field]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataFileError(f"{where}: field '{field}' must be a list of strings")
    return value


def _check_multiple_choice(row: dict, where: str) -> None:
    choices = _check_string_list(row, "choices", where)
    labels = _check_string_list(row, "labels", where)
    if len(choices) < 2:
        raise DataFileError(f"{where}: field 'choices' needs at least 2 entries, got {len(choices)}")
    if len(labels) != len(choices):
        raise DataFileError(f"{where}: field 'labels' has {len(labels)} entries but 'choices' has {len(choices)}")
    index = row["answer_index"]
    # bool is an int subclass; True as an answer index is a bug upstream, not index 1.
    if not isinstance(index, int) or isinstance(index, bool):
        raise DataFileError(f"{where}: field 'answer_index' must be an int, got {type(index).__name__}")
    if not 0 <= index < len(choices):
        raise DataFileError(f"{where}: field 'answer_index' = {index} is outside 0..{len(choices) - 1}")


MESSAGE_ROLES = ("system", "user", "assistant")


def prompt_messages(prompt: str | list) -> list[dict]:
    """A pair's prompt as chat messages: one user turn, or the conversation it already is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def _check_conversation(value: list, field: str, where: str) -> None:
    """A multi-turn prompt: {role, content} messages (system, user, assistant) ending with a user turn."""
    for number, message in enumerate(value, start=1):
        ok = (
            isinstance(message, dict)
            and set(message) == {"role", "content"}
            and message["role"] in MESSAGE_ROLES
            and isinstance(message["content"], str)
            and message["content"].strip()
        )
        if not ok:
            raise DataFileError(
                f"{where}: field '{field}' message {number} must be {{role, content}} with a role "
                f"in {MESSAGE_ROLES} and non-empty text"
            )
    if not value or value[-1]["role"] != "user":
        raise DataFileError(f"{where}: field '{field}' must end with a user turn")


def validate_row(row: Any, form: str, where: str) -> None:
    """Check one row against `form`; `where` prefixes any error message.

    A pair's prompt is text (one user turn) or a list of chat messages ending with a user turn
    (a multi-turn conversation, given to the chat template as it is).
    """
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: expected an object, got {type(row).__name__}")
    for field in FORM_FIELDS[form]:
        if field not in row:
            raise DataFileError(f"{where}: missing field '{field}' (form {form})")
    for field in FORM_FIELDS[form]:
        if field in ("choices", "labels", "answer_index"):
            continue
        if form == "pairs" and field == "prompt" and isinstance(row[field], list):
            _check_conversation(row[field], field, where)
            continue
        _check_text(row, field, where, nullable=(form, field) in NULLABLE)
    if form == "multiple_choice":
        _check_multiple_choice(row, where)


def validate_rows(rows: Iterable[Any], form: str, path: str | os.PathLike) -> list:
    """Validate every row of one file of `form`; errors name `path` and the 1-based row number.

    Ids must be unique within a file: results are joined on them later.
    """
    if form not in FORM_FIELDS:
        raise ValueError(f"unknown form {form!r}; known forms: {', '.join(sorted(FORM_FIELDS))}")
    rows = list(rows)
    first_seen: dict[str, int] = {}
    for rownum, row in enumerate(rows, start=1):
        where = _where(path, rownum)
        validate_row(row, form, where)
        if row["id"] in first_seen:
            raise DataFileError(f"{where}: duplicate id '{row['id']}' (first at row {first_seen[row['id']]})")
        first_seen[row["id"]] = rownum
    return rows
