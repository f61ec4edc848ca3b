"""Scoring an adapted model: GSM8K accuracy, title ROUGE and multiple-choice accuracy.

Every entry point takes a plain Hugging Face causal LM or a PeftModel, runs on the model's own
device, and returns (per-example records, summary scores). The tokenizer's padding side does
not matter: generation pads on the left and likelihood scoring on the right, by hand.
"""

from d2lora.evaluation.answers import answers_match, extract_final_answer, extract_with_rule, normalize_answer
from d2lora.evaluation.generation import greedy_generate
from d2lora.evaluation.math_eval import evaluate_math
from d2lora.evaluation.multiple_choice import evaluate_multiple_choice
from d2lora.evaluation.titles_eval import evaluate_titles

__all__ = [
    "answers_match",
    "evaluate_math",
    "evaluate_multiple_choice",
    "evaluate_titles",
    "extract_final_answer",
    "extract_with_rule",
    "greedy_generate",
    "normalize_answer",
]
