"""Deterministic synthetic stand-ins for the real data sets, in their sources' raw schemas.

They let the whole pipeline run (and be tested) with no download: each kind yields rows shaped
like the data set it stands in for, so the same raw → canonical mapping code runs on both.

Train and eval are disjoint by construction: a row's key text (question, abstract or prompt)
is hashed, and the hash alone decides which split may hold it. That holds for any seed and any
row count, so no split has to be generated to filter the other.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from d2lora.data.synthetic import general, science, titles, word_problems

SPLITS = ("train", "eval")
EVAL_SHARE = 5  # one key text in EVAL_SHARE belongs to eval, the rest to train


def split_of(text: str) -> str:
    """The split a key text belongs to; hashlib, not hash(), so it is stable across processes."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % EVAL_SHARE
    return "eval" if bucket == 0 else "train"


# ----------------------------------------------------------------------------- entry point

# kind → (row maker, the field whose text must be unique and decides the split)
GENERATORS: dict[str, tuple[Callable[[random.Random], dict], str]] = {
    "math": (word_problems.make_math, "question"),
    "arithmetic": (word_problems.make_arithmetic, "question"),
    "titles": (titles.make_titles, "abstract"),
    "science_mc": (science.make_science_mc, "question"),
    "general": (general.make_general, "prompt"),
}
KINDS = tuple(GENERATORS)


def generate(kind: str, rows: int, seed: int, split: str) -> list[dict]:
    """`rows` distinct rows of `kind` for `split`, identical for identical arguments."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"synthetic rows must be a non-negative int, got {rows!r}")
    make, key = GENERATORS[kind]
    rng = random.Random(f"{seed}-{kind}-{split}")
    out: list[dict] = []
    seen: set[str] = set()
    # Candidates that are duplicates or belong to the other split are drawn and dropped; the
    # budget turns an impossible request into an error instead of an endless loop.
    for _ in range(50 * rows + 1000):
        if len(out) == rows:
            break
        row = make(rng)
        text = row[key]
        if text not in seen and split_of(text) == split:
            seen.add(text)
            out.append(row)
    if len(out) < rows:
        raise ValueError(f"synthetic {kind}: could make only {len(out)} distinct {split} rows, {rows} asked")
    return out
