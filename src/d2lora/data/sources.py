"""Loading raw rows from a source config, and mapping raw rows to the canonical forms.

A source config is one of
  {"source": "synthetic", "kind": ..., "rows": int, "split": "train"|"eval"}
  {"source": "hub", "path": "openai/gsm8k", "name": "main", "split": "test", "revision": ..., "format": ...}
  {"source": "local", "data_files": path or [paths], "file_format": ..., "format": ...}
each with an optional "skip" (drop the first k rows) and "limit" (then keep the first k rows),
both applied before mapping: `skip` + `limit` carve a held-out set and a disjoint training set out of
a source that has one split only (the economics titles). A fourth kind, "onpolicy", never reaches
this module: the workflow turns it into a local source over the file its `sample_negatives` rule
writes (see d2lora.data.onpolicy).

A format names the raw schema of a source; FORMATS maps (format, form) to the function that
turns one raw row into one canonical row. New sources add an entry with `register_format`.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from d2lora.data import synthetic
from d2lora.data.schema import FORM_FIELDS, MESSAGE_ROLES, validate_rows
from d2lora.io import DataFileError, read_jsonl

SOURCE_KINDS = ("synthetic", "hub", "local", "onpolicy")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# jsonl and json both go through datasets' "json" builder.
_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
# What each synthetic kind imitates, so a synthetic source needs no explicit "format".
SYNTHETIC_FORMATS = {
    "math": "synthetic_math",
    "arithmetic": "synthetic_math",
    "titles": "synthetic_titles",
    "general": "synthetic_general",
    "science_mc": "arc",
}


# ----------------------------------------------------------------------------- loading


def _require(cfg: dict, key: str) -> Any:
    if key not in cfg:
        raise ValueError(f"source config {cfg!r} needs the key '{key}'")
    return cfg[key]


def local_files(cfg: dict) -> list[Path]:
    """The files of a local source, each checked to exist and hold data."""
    given = _require(cfg, "data_files")
    files = [Path(given)] if isinstance(given, (str, os.PathLike)) else [Path(f) for f in given]
    if not files:
        raise ValueError(f"source config {cfg!r}: 'data_files' is empty")
    for path in files:
        if not path.is_file():
            raise DataFileError(f"{path}: file does not exist")
        if path.stat().st_size == 0:
            raise DataFileError(f"{path}: file is empty")
    return files


def _file_format(cfg: dict, files: list[Path]) -> str:
    if cfg.get("file_format"):
        fmt = cfg["file_format"]
        if fmt not in _BUILDERS:
            raise ValueError(f"unknown file_format {fmt!r}; known: {', '.join(sorted(_BUILDERS))}")
        return fmt
    formats = {FILE_FORMATS.get(path.suffix.lower()) for path in files}
    if None in formats or len(formats) != 1:
        raise ValueError(
            f"cannot tell the file format of {[str(f) for f in files]} from the extensions; "
            f"set 'file_format' to one of {', '.join(sorted(_BUILDERS))}"
        )
    return formats.pop()


def _load_local(cfg: dict) -> tuple[list[dict], list[str]]:
    files = local_files(cfg)
    fmt = _file_format(cfg, files)
    if fmt == "jsonl":
        # read_jsonl names file:line on a malformed line, and keeps a row's absent keys absent;
        # datasets' json builder would fill them with None and hide the gap.
        rows = [row for path in files for row in read_jsonl(path)]
    else:
        rows = _load_with_datasets(_BUILDERS[fmt], files, fmt)
    if not rows:
        raise DataFileError(f"{', '.join(map(str, files))}: no rows")
    return rows, [str(path) for path in files]


def _load_with_datasets(builder: str, files: list[Path], fmt: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as err:  # datasets raises many unrelated types; the file name is what helps
        raise DataFileError(f"{', '.join(map(str, files))}: cannot be read as {fmt}: {err}") from err
    return dataset.to_list()


def _load_hub(cfg: dict) -> tuple[list[dict], list[str]]:
    import datasets

    kwargs = {"split": _require(cfg, "split")}
    if cfg.get("revision"):
        kwargs["revision"] = cfg["revision"]
    dataset = datasets.load_dataset(_require(cfg, "path"), cfg.get("name"), **kwargs)
    cached = [entry["filename"] for entry in getattr(dataset, "cache_files", None) or []]
    return dataset.to_list(), cached


def _load_synthetic(cfg: dict, seed: int) -> tuple[list[dict], list[str]]:
    rows = synthetic.generate(_require(cfg, "kind"), _require(cfg, "rows"), seed, _require(cfg, "split"))
    return rows, []


def load_raw(source_cfg: dict, seed: int) -> tuple[list[dict], list[str]]:
    """Raw rows of a source and the files actually read (empty for synthetic sources)."""
    kind = _require(source_cfg, "source")
    if kind == "synthetic":
        rows, files = _load_synthetic(source_cfg, seed)
    elif kind == "hub":
        rows, files = _load_hub(source_cfg)
    elif kind == "local":
        rows, files = _load_local(source_cfg)
    elif kind == "onpolicy":
        raise ValueError(
            "an 'onpolicy' source is sampled by the workflow's sample_negatives rule and then read as a local "
            "file (d2lora.data.onpolicy); it cannot be loaded directly"
        )
    else:
        raise ValueError(f"unknown source {kind!r}; known sources: {', '.join(SOURCE_KINDS)}")
    return apply_skip_limit(apply_shuffle(rows, source_cfg, seed), source_cfg), files


def apply_shuffle(rows: list[dict], source_cfg: dict, seed: int) -> list[dict]:
    """With `shuffle: true`, the source's rows in one order drawn from the seed, before skip and limit.

    A file sorted by date or id would otherwise hand its oldest rows to the held-out `limit` head.
    Rows without an id of their own first get one from their position in the file, so an id
    still points at the file's row, and the train and held-out parts of one source stay disjoint.
    """
    if not source_cfg.get("shuffle"):
        return rows
    rows = with_position_ids(rows, source_name(source_cfg))
    random.Random(f"source-order-{seed}").shuffle(rows)
    return rows


def with_position_ids(rows: list[dict], name: str, start: int = 0) -> list[dict]:
    """Rows without an id of their own get `<name>-<position in the source>`, counting from `start`."""
    return [row if not isinstance(row, dict) or row.get("id") is not None else {"id": f"{name}-{index:06d}", **row}
            for index, row in enumerate(rows, start=start)]


def _count_arg(source_cfg: dict, key: str) -> int | None:
    value = source_cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"source '{key}' must be a non-negative int, got {value!r}")
    return value


def apply_skip_limit(rows: list[dict], source_cfg: dict) -> list[dict]:
    """Drop the first `skip` rows, then keep the first `limit`.

    Rows without an id of their own get one from their position in the WHOLE source, so the
    ids of a skipped-into training set and of the held-out head never collide or shift.
    """
    skip, limit = _count_arg(source_cfg, "skip"), _count_arg(source_cfg, "limit")
    if skip:
        # Shuffled rows already carry their file position (apply_shuffle) and keep it.
        rows = with_position_ids(rows[skip:], source_name(source_cfg), start=skip)
    if limit is not None:
        rows = rows[:limit]
    return rows


def _count_file_rows(path: Path, fmt: str) -> int | None:
    """Rows in one local file, read as cheaply as the format allows; None where that needs a full parse."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "csv":
        import csv

        with open(path, encoding="utf-8", newline="") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)  # minus the header
    if fmt == "json":
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None  # maybe JSON lines under a .json name; preparation reads it properly
        return len(data) if isinstance(data, list) else None
    return None


def available_rows(source_cfg: dict) -> int | None:
    """How many rows a source yields (after skip and limit), where that is knowable without loading it.

    synthetic: its `rows`. local: the files' rows, counted now (so an n larger than the data fails
    at config time). hub and onpolicy: unknown offline (None) unless `limit` bounds it; asking for more
    rows than they hold fails when the data are prepared. Rows that the mapping would reject still
    count here: preparation stops at them with the file and row.
    """
    kind = source_cfg.get("source")
    skip, limit = source_cfg.get("skip") or 0, source_cfg.get("limit")
    total: int | None = None
    if kind == "synthetic":
        total = source_cfg.get("rows")
    elif kind == "local":
        try:
            files = local_files(source_cfg)
            fmt = _file_format(source_cfg, files)
        except (DataFileError, ValueError):
            return limit  # missing or unreadable files are reported, with their names, by preparation
        counts = [_count_file_rows(path, fmt) for path in files]
        total = None if None in counts else sum(counts)
    if total is None:
        return limit
    total = max(total - skip, 0)
    return total if limit is None else min(total, limit)


def source_format(source_cfg: dict) -> str:
    """The raw format of a source: explicit, or implied by a synthetic kind."""
    if source_cfg.get("format"):
        return source_cfg["format"]
    if source_cfg.get("source") == "synthetic" and source_cfg.get("kind") in SYNTHETIC_FORMATS:
        return SYNTHETIC_FORMATS[source_cfg["kind"]]
    raise ValueError(f"source config {source_cfg!r} needs a 'format' (known: {', '.join(sorted(FORMATS))})")


def source_name(source_cfg: dict) -> str:
    """A short, path-free name for a source; ids of rows that have none are built from it."""
    kind = source_cfg.get("source")
    if kind == "synthetic":
        return f"synthetic-{source_cfg.get('kind')}-{source_cfg.get('split')}"
    if kind == "hub":
        parts = [source_cfg.get("path", "hub").replace("/", "__"), source_cfg.get("name"), source_cfg.get("split")]
        return "-".join(str(p) for p in parts if p)
    files = source_cfg.get("data_files")
    first = Path(files if isinstance(files, (str, os.PathLike)) else list(files)[0])
    return f"{first.parent.name}-{first.stem}" if first.parent.name else first.stem


def source_origin(source_cfg: dict) -> str:
    """Where a source's rows come from, for error messages: file paths or the hub id."""
    kind = source_cfg.get("source")
    if kind == "synthetic":
        return f"synthetic:{source_cfg.get('kind')}/{source_cfg.get('split')}"
    if kind == "hub":
        name = f"[{source_cfg['name']}]" if source_cfg.get("name") else ""
        return f"hub:{source_cfg.get('path')}{name}/{source_cfg.get('split')}" + _row_numbering(source_cfg)
    files = source_cfg.get("data_files")
    origin = str(files) if isinstance(files, (str, os.PathLike)) else ", ".join(map(str, files))
    return origin + _row_numbering(source_cfg)


def _row_numbering(source_cfg: dict) -> str:
    # Rows are numbered after shuffle and skip; say so, or "row 3" would point at the wrong line.
    if source_cfg.get("shuffle"):
        return " (rows counted in the seeded shuffle order; a row's id ends in its position in the file)"
    return f" (rows counted after skipping {source_cfg['skip']})" if source_cfg.get("skip") else ""


# ----------------------------------------------------------------------------- mapping


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


def _where(index: int, ctx: MappingContext) -> str:
    return f"{ctx.origin}: row {index + 1}"


def _field(row: dict, field: str, index: int, ctx: MappingContext) -> Any:
    # None counts as missing: datasets fills a column that a row lacks with None.
    if row.get(field) is None:
        raise DataFileError(f"{_where(index, ctx)}: missing field '{field}' (format {ctx.fmt})")
    return row[field]


def _text(row: dict, field: str, index: int, ctx: MappingContext) -> str:
    value = _field(row, field, index, ctx)
    if not isinstance(value, str):
        raise DataFileError(
            f"{_where(index, ctx)}: field '{field}' must be text, got {type(value).__name__} (format {ctx.fmt})"
        )
    return value


def _text_list(row: dict, field: str, index: int, ctx: MappingContext) -> list[str]:
    value = _field(row, field, index, ctx)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataFileError(f"{_where(index, ctx)}: field '{field}' must be a list of strings (format {ctx.fmt})")
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


@register_format("synthetic_math", "pairs")
def _synthetic_math_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    question = _text(row, "question", index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", question),
        "chosen": boxed_solution(
            "\n".join(_text_list(row, "solution_steps", index, ctx)), _text(row, "answer", index, ctx)
        ),
        "rejected": boxed_solution(
            "\n".join(_text_list(row, "wrong_steps", index, ctx)), _text(row, "wrong_answer", index, ctx)
        ),
    }


@register_format("synthetic_math", "math_eval")
def _synthetic_math_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "question": _text(row, "question", index, ctx),
        "answer": _text(row, "answer", index, ctx),
    }


@register_format("synthetic_titles", "pairs")
def _synthetic_titles_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract = _text(row, "abstract", index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "chosen": _text(row, "title", index, ctx),
        "rejected": None,
    }


@register_format("synthetic_titles", "generation_eval")
def _synthetic_titles_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract = _text(row, "abstract", index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "reference": _text(row, "title", index, ctx),
    }


@register_format("synthetic_general", "pairs")
def _synthetic_general_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "prompt": _text(row, "prompt", index, ctx),
        "chosen": _text(row, "chosen", index, ctx),
        "rejected": _text(row, "rejected", index, ctx),
    }


@register_format("arc", "multiple_choice")
def _arc_multiple_choice(row: dict, index: int, ctx: MappingContext) -> dict:
    choices = _field(row, "choices", index, ctx)
    if not isinstance(choices, dict):
        raise DataFileError(f"{_where(index, ctx)}: field 'choices' must be an object with 'text' and 'label'")
    texts = _text_list(choices, "text", index, ctx)
    labels = _text_list(choices, "label", index, ctx)
    key = str(_field(row, "answerKey", index, ctx)).strip()
    # Some ARC rows are labelled 1..4 instead of A..D; their answerKey uses the same labels.
    if key not in labels:
        raise DataFileError(f"{_where(index, ctx)}: answerKey {key!r} is not one of the labels {labels}")
    return {
        "id": row_id(row, index, ctx),
        "question": _text(row, "question", index, ctx),
        "choices": texts,
        "labels": labels,
        "answer_index": labels.index(key),
    }


_GSM8K_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _gsm8k_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    """(reasoning without calculator annotations, final numeric answer without commas)."""
    solution = _text(row, "answer", index, ctx)
    if "####" not in solution:
        raise DataFileError(f"{_where(index, ctx)}: field 'answer' has no '#### <number>' final line")
    reasoning, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not _NUMBER.fullmatch(final):
        raise DataFileError(f"{_where(index, ctx)}: final answer {final!r} after '####' is not a number")
    return _GSM8K_CALC.sub("", reasoning).strip(), final


@register_format("gsm8k", "math_eval")
def _gsm8k_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "question": _text(row, "question", index, ctx),
        "answer": _gsm8k_parts(row, index, ctx)[1],
    }


@register_format("gsm8k", "pairs")
def _gsm8k_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    reasoning, final = _gsm8k_parts(row, index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", _text(row, "question", index, ctx)),
        "chosen": boxed_solution(reasoning, final),
        "rejected": None,
    }


# ----------------------------------------------------------------------------- hub datasets of the paper
#
# Field names are those of each dataset's card (docs/datasets.md cites them); every mapper is unit
# tested on hand-made rows in that schema (tests/test_real_data.py).


def _messages(row: dict, field: str, index: int, ctx: MappingContext) -> list[dict]:
    value = _field(row, field, index, ctx)
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise DataFileError(
            f"{_where(index, ctx)}: field '{field}' must be a non-empty list of {{role, content}} messages (format {ctx.fmt})"
        )
    return value


def _split_conversation(messages: list[dict], field: str, index: int, ctx: MappingContext) -> tuple[str | list, str]:
    """(prompt, final assistant reply) of one chat conversation.

    The prompt is the last user message's text when nothing comes before it; otherwise it is the
    conversation up to and including that message (system prompt, earlier turns), kept as messages
    so the chat template renders every turn as the model was trained to read it.
    """
    if messages[-1]["role"] != "assistant" or len(messages) < 2 or messages[-2]["role"] != "user":
        raise DataFileError(
            f"{_where(index, ctx)}: field '{field}' must end with a user turn and an assistant reply (format {ctx.fmt})"
        )
    *context, user, reply = messages
    if not context:
        return user["content"], reply["content"]
    unknown = sorted({m["role"] for m in context} - set(MESSAGE_ROLES))
    if unknown:
        raise DataFileError(f"{_where(index, ctx)}: field '{field}' has unknown role(s) {unknown} (format {ctx.fmt})")
    return [{"role": m["role"], "content": m["content"]} for m in (*context, user)], reply["content"]


@register_format("orpo_dpo_mix", "pairs")
def _orpo_dpo_mix_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    """mlabonne/orpo-dpo-mix-40k: `chosen` / `rejected` are whole conversations (lists of
    {role, content}) that share every turn but the last; `source` names the sub-dataset.

    The warm-up trains on prompt + chosen, so only `chosen` must be a well-formed conversation with
    a non-empty reply. A missing, malformed or empty `rejected`, or one whose earlier turns differ
    from chosen's, leaves the pair without a rejected answer (null) instead of stopping the
    preparation; a preference method given such a row says so when it trains."""
    prompt, chosen = _split_conversation(_messages(row, "chosen", index, ctx), "chosen", index, ctx)
    if not chosen.strip():
        raise DataFileError(f"{_where(index, ctx)}: field 'chosen' ends with an empty reply (format {ctx.fmt})")
    return {"id": row_id(row, index, ctx), "prompt": prompt, "chosen": chosen,
            "rejected": _matching_rejected(row, prompt, index, ctx)}


def _matching_rejected(row: dict, prompt, index: int, ctx: MappingContext) -> str | None:
    try:
        rejected_prompt, rejected = _split_conversation(_messages(row, "rejected", index, ctx), "rejected", index, ctx)
    except DataFileError:
        return None
    return rejected if rejected_prompt == prompt and rejected.strip() else None


def _step_dpo_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    question = _text(row, "prompt", index, ctx)
    # An empty prefix is legal: the first step itself was the wrong one.
    prefix = row.get("initial_reason_steps")
    if prefix is None or not isinstance(prefix, str):
        raise DataFileError(f"{_where(index, ctx)}: missing field 'initial_reason_steps' (format {ctx.fmt})")
    return question, prefix


STEP_DPO_DROPS = "rows whose rejected continuation is empty (the pair would be the shared prefix alone)"


def _step_dpo_pair(row: dict, index: int, ctx: MappingContext, chosen_field: str,
                   rejected_field: str) -> dict | None:
    """The question as the user turn; the shared correct prefix in front of both answers.

    A row whose rejected field is empty or null (a derivative's card counts 1,177 such rows with an
    empty `full_rejected`) is dropped: its pair would reject the correct prefix itself. The field
    must still be there; a row without the key is a different file.
    """
    question, prefix = _step_dpo_parts(row, index, ctx)
    if rejected_field in row and (row[rejected_field] is None or
                                  (isinstance(row[rejected_field], str) and not row[rejected_field].strip())):
        return None
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", question),
        "chosen": prefix + _text(row, chosen_field, index, ctx),
        "rejected": prefix + _text(row, rejected_field, index, ctx),
    }


@register_format("math_step_dpo", "pairs", drops=STEP_DPO_DROPS)
def _math_step_dpo_pair(row: dict, index: int, ctx: MappingContext) -> dict | None:
    """xinlai/Math-Step-DPO-10K as WHOLE solutions that share the correct prefix.

    chosen   = initial_reason_steps + full_chosen   (correct step, then the rest to the answer)
    rejected = initial_reason_steps + full_rejected (the wrong step, then its continuation)
    The strings are concatenated as they are, the way Step-DPO joins prefix and step. One file
    serves every method: SFT learns complete correct solutions (a lone step would teach it to stop
    mid-solution), and in DPO the shared prefix cancels exactly in the margin
    log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), so the preference acts from the first
    diverging step on. Format math_step_dpo_step keeps Step-DPO's single steps instead.
    """
    return _step_dpo_pair(row, index, ctx, "full_chosen", "full_rejected")


@register_format("math_step_dpo_step", "pairs", drops=STEP_DPO_DROPS)
def _math_step_dpo_step_pair(row: dict, index: int, ctx: MappingContext) -> dict | None:
    """Step-DPO's own pairs: prefix + the one correct step vs prefix + the one wrong step.

    Faithful to Step-DPO for DPO/ORPO, but its 'chosen' stops after one step: do not use it for SFT.
    """
    return _step_dpo_pair(row, index, ctx, "chosen", "rejected")


@register_format("math_step_dpo", "math_eval")
@register_format("math_step_dpo_step", "math_eval")
def _math_step_dpo_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    return {
        "id": row_id(row, index, ctx),
        "question": _text(row, "prompt", index, ctx),
        "answer": str(_field(row, "answer", index, ctx)).strip(),
    }


# The abstract column: the D2LoRA paper (App. A) prints an instance as "text: ... title: ...";
# an `abstract` column, where a copy has one, is taken first.
ECON_ABSTRACT_FIELDS = ("abstract", "text")


def _econ_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    field = next((f for f in ECON_ABSTRACT_FIELDS if row.get(f) is not None), None)
    if field is None:
        raise DataFileError(
            f"{_where(index, ctx)}: missing field 'abstract' (or 'text') with the paper's abstract (format {ctx.fmt})"
        )
    # arXiv metadata wraps long lines; the model should see running text.
    abstract = " ".join(_text(row, field, index, ctx).split())
    title = " ".join(_text(row, "title", index, ctx).split())
    return abstract, title


@register_format("econ_titles", "pairs")
def _econ_titles_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    """onurkeles/econ_paper_abstracts (Keles & Bayrakli 2024): abstract -> title; SFT only (no rejected)."""
    abstract, title = _econ_parts(row, index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "chosen": title,
        "rejected": None,
    }


@register_format("econ_titles", "generation_eval")
def _econ_titles_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract, title = _econ_parts(row, index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "reference": title,
    }


@register_format("arxiv_titles", "pairs")
def _arxiv_titles_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    """arXiv listing metadata (../shared/data/econ_titles): clean_abstract -> clean_title; SFT only."""
    abstract, title = _arxiv_parts(row, index, ctx)
    return {"id": _arxiv_id(row, index, ctx), "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
            "chosen": title, "rejected": None}


@register_format("arxiv_titles", "generation_eval")
def _arxiv_titles_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract, title = _arxiv_parts(row, index, ctx)
    return {"id": _arxiv_id(row, index, ctx), "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
            "reference": title}


def _arxiv_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    # The clean_* fields drop the RSS feed's artefacts ("(arXiv:... [econ.TH])" tags, the
    # "Announce Type" prefix) that the raw title and abstract keep.
    abstract = " ".join(_text(row, "clean_abstract", index, ctx).split())
    title = " ".join(_text(row, "clean_title", index, ctx).split())
    return abstract, title


def _arxiv_id(row: dict, index: int, ctx: MappingContext) -> str:
    return f"arXiv:{row['arxiv_id']}" if row.get("arxiv_id") else row_id(row, index, ctx)


@register_format("alpaca", "pairs", drops="rows whose output is empty")
def _alpaca_pair(row: dict, index: int, ctx: MappingContext) -> dict | None:
    """Stanford Alpaca (instruction, input, output): instruction + input as the prompt, output as the
    answer; no rejected answer, so it serves the warm-up (prompt + chosen) and SFT."""
    instruction = _text(row, "instruction", index, ctx).strip()
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataFileError(f"{_where(index, ctx)}: field 'input' must be text (format {ctx.fmt})")
    output = _text(row, "output", index, ctx).strip()
    if not output:
        return None
    prompt = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
    return {"id": row_id(row, index, ctx), "prompt": fill_template(ctx.prompt_template, "instruction", prompt),
            "chosen": output, "rejected": None}


@register_format("gsm8k_onpolicy", "pairs")
def _gsm8k_onpolicy_pair(row: dict, index: int, ctx: MappingContext) -> dict:
    """GSM8K train question; chosen = its reference solution (boxed), rejected = the base model's
    own sampled solution whose final answer is wrong (written by d2lora.data.onpolicy)."""
    reasoning, final = _gsm8k_parts(row, index, ctx)
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", _text(row, "question", index, ctx)),
        "chosen": boxed_solution(reasoning, final),
        "rejected": _text(row, "rejected", index, ctx),
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
        raise ValueError(
            f"format {fmt!r} cannot produce form {form!r}; it produces: {', '.join(sorted(FORMATS[fmt]))}"
        )
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
            raise DataFileError(f"{_where(index, ctx)}: expected an object, got {type(raw).__name__}")
        mapped = mapper(raw, index, ctx)
        if mapped is None:
            if fmt not in DROP_RULES:
                raise RuntimeError(f"format {fmt!r} returned no row for {_where(index, ctx)} but declares no drop rule")
            dropped += 1
            continue
        rows.append(mapped)
    return validate_rows(rows, form, ctx.origin), dropped
