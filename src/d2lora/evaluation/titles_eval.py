"""Title generation scored with ROUGE-1/2/L F-measure (Table 1 of the paper), in percent."""

from __future__ import annotations

import re

from d2lora.evaluation.generation import greedy_generate

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# Chat models dress a title up ("**Title:** ...", "# ...", quotes); the reference is bare,
# and ROUGE would otherwise count the decoration as wrong tokens.
_TITLE_PREFIX = re.compile(r"^(?:#+\s*)?(?:\*\*)?\s*title\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_WRAPPING = " \t\"'`*#\u201c\u201d\u2018\u2019"


def clean_title_line(line: str) -> str:
    line = line.strip().strip(_WRAPPING)
    line = _TITLE_PREFIX.sub("", line)
    return line.strip().strip(_WRAPPING)


def extract_title(output: str) -> str:
    """The first line that still has text after removing a "Title:" prefix and quotes.

    A bare "Title:" line followed by the title on the next line counts as the next line.
    """
    for line in output.splitlines():
        title = clean_title_line(line)
        if title:
            return title
    return ""


def make_scorer():
    # rouge_score: kept out of workflow parsing (the rules import this module)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_title(scorer, row: dict, output: str) -> dict:
    prediction = extract_title(output)
    scores = scorer.score(row["reference"], prediction)  # (target, prediction)
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "output": output,
        "prediction": prediction,
        "reference": row["reference"],
        **{name: scores[name].fmeasure for name in ROUGE_TYPES},
    }


def summarize_titles(per_example: list[dict]) -> dict:
    n_items = len(per_example)
    summary = {name: 100.0 * sum(ex[name] for ex in per_example) / n_items for name in ROUGE_TYPES}
    summary["n_items"] = n_items
    return summary


def evaluate_titles(
    model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int, partial=None
) -> tuple[list[dict], dict]:
    """Per-example F-scores (0..1) and mean F-scores x100 {"rouge1","rouge2","rougeL","n_items"}."""
    if not rows:
        raise ValueError("evaluate_titles: no evaluation rows")
    outputs = greedy_generate(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        max_new_tokens,
        batch_size,
        progress_desc="titles",
        partial=partial,
    )
    scorer = make_scorer()
    per_example = [score_title(scorer, row, output) for row, output in zip(rows, outputs)]
    return per_example, summarize_titles(per_example)
