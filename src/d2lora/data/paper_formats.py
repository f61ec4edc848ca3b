"""The paper's hub datasets (field names from each dataset's card, docs/datasets.md) and the
embedded default's real stand-ins (arXiv econ/q-fin abstracts, Stanford Alpaca)."""

from __future__ import annotations

from d2lora.data.mapping import (
    MappingContext,
    fill_template,
    register_format,
    require,
    require_text,
    row_id,
    where,
)
from d2lora.data.schema import MESSAGE_ROLES
from d2lora.io import DataFileError

#
# Field names are those of each dataset's card (docs/datasets.md cites them); every mapper is unit
# tested on hand-made rows in that schema (tests/test_real_data.py).


def _messages(row: dict, field: str, index: int, ctx: MappingContext) -> list[dict]:
    value = require(row, field, index, ctx)
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )
    if not ok:
        raise DataFileError(
            f"{where(index, ctx)}: field '{field}' must be a non-empty list of {{role, content}} messages (format {ctx.fmt})"
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
            f"{where(index, ctx)}: field '{field}' must end with a user turn and an assistant reply (format {ctx.fmt})"
        )
    *context, user, reply = messages
    if not context:
        return user["content"], reply["content"]
    unknown = sorted({m["role"] for m in context} - set(MESSAGE_ROLES))
    if unknown:
        raise DataFileError(f"{where(index, ctx)}: field '{field}' has unknown role(s) {unknown} (format {ctx.fmt})")
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
        raise DataFileError(f"{where(index, ctx)}: field 'chosen' ends with an empty reply (format {ctx.fmt})")
    return {
        "id": row_id(row, index, ctx),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": _matching_rejected(row, prompt, index, ctx),
    }


def _matching_rejected(row: dict, prompt, index: int, ctx: MappingContext) -> str | None:
    try:
        rejected_prompt, rejected = _split_conversation(_messages(row, "rejected", index, ctx), "rejected", index, ctx)
    except DataFileError:
        return None
    return rejected if rejected_prompt == prompt and rejected.strip() else None


def _step_dpo_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    question = require_text(row, "prompt", index, ctx)
    # An empty prefix is legal: the first step itself was the wrong one.
    prefix = row.get("initial_reason_steps")
    if prefix is None or not isinstance(prefix, str):
        raise DataFileError(f"{where(index, ctx)}: missing field 'initial_reason_steps' (format {ctx.fmt})")
    return question, prefix


STEP_DPO_DROPS = "rows whose rejected continuation is empty (the pair would be the shared prefix alone)"


def _step_dpo_pair(row: dict, index: int, ctx: MappingContext, chosen_field: str, rejected_field: str) -> dict | None:
    """The question as the user turn; the shared correct prefix in front of both answers.

    A row whose rejected field is empty or null (a derivative's card counts 1,177 such rows with an
    empty `full_rejected`) is dropped: its pair would reject the correct prefix itself. The field
    must still be there; a row without the key is a different file.
    """
    question, prefix = _step_dpo_parts(row, index, ctx)
    if rejected_field in row and (
        row[rejected_field] is None or (isinstance(row[rejected_field], str) and not row[rejected_field].strip())
    ):
        return None
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "question", question),
        "chosen": prefix + require_text(row, chosen_field, index, ctx),
        "rejected": prefix + require_text(row, rejected_field, index, ctx),
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
        "question": require_text(row, "prompt", index, ctx),
        "answer": str(require(row, "answer", index, ctx)).strip(),
    }


# The abstract column: the D2LoRA paper (App. A) prints an instance as "text: ... title: ...";
# an `abstract` column, where a copy has one, is taken first.
ECON_ABSTRACT_FIELDS = ("abstract", "text")


def _econ_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    field = next((f for f in ECON_ABSTRACT_FIELDS if row.get(f) is not None), None)
    if field is None:
        raise DataFileError(
            f"{where(index, ctx)}: missing field 'abstract' (or 'text') with the paper's abstract (format {ctx.fmt})"
        )
    # arXiv metadata wraps long lines; the model should see running text.
    abstract = " ".join(require_text(row, field, index, ctx).split())
    title = " ".join(require_text(row, "title", index, ctx).split())
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
    return {
        "id": _arxiv_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "chosen": title,
        "rejected": None,
    }


@register_format("arxiv_titles", "generation_eval")
def _arxiv_titles_eval(row: dict, index: int, ctx: MappingContext) -> dict:
    abstract, title = _arxiv_parts(row, index, ctx)
    return {
        "id": _arxiv_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "abstract", abstract),
        "reference": title,
    }


def _arxiv_parts(row: dict, index: int, ctx: MappingContext) -> tuple[str, str]:
    # The clean_* fields drop the RSS feed's artefacts ("(arXiv:... [econ.TH])" tags, the
    # "Announce Type" prefix) that the raw title and abstract keep.
    abstract = " ".join(require_text(row, "clean_abstract", index, ctx).split())
    title = " ".join(require_text(row, "clean_title", index, ctx).split())
    return abstract, title


def _arxiv_id(row: dict, index: int, ctx: MappingContext) -> str:
    return f"arXiv:{row['arxiv_id']}" if row.get("arxiv_id") else row_id(row, index, ctx)


@register_format("alpaca", "pairs", drops="rows whose output is empty")
def _alpaca_pair(row: dict, index: int, ctx: MappingContext) -> dict | None:
    """Stanford Alpaca (instruction, input, output): instruction + input as the prompt, output as the
    answer; no rejected answer, so it serves the warm-up (prompt + chosen) and SFT."""
    instruction = require_text(row, "instruction", index, ctx).strip()
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataFileError(f"{where(index, ctx)}: field 'input' must be text (format {ctx.fmt})")
    output = require_text(row, "output", index, ctx).strip()
    if not output:
        return None
    prompt = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
    return {
        "id": row_id(row, index, ctx),
        "prompt": fill_template(ctx.prompt_template, "instruction", prompt),
        "chosen": output,
        "rejected": None,
    }
