"""Multiple-choice accuracy by continuation log-likelihood, as lm-eval's `multiple_choice` tasks.

Each item's context is the chat-formatted user turn "Question: {question}\\nAnswer:" followed
by the assistant header; each choice text is scored as the assistant's reply. Following
lm-eval 0.4.x with `apply_chat_template=True`:
- the target delimiter is "" (lm-eval drops the usual " " under a chat template, because the
  assistant header already separates question and answer);
- trailing whitespace of the context (the newline after the assistant header) is moved to the
  start of the continuation, so the tokenizer sees it together with the choice text the way
  it would in running text; the whole string is encoded and the continuation tokens are the
  tail after the context's own tokens;
- `accuracy` takes the argmax of the summed log-probs (lm-eval's `acc`), `accuracy_norm` of the
  log-prob per character of the choice text (lm-eval's `acc_norm`).
"""

from __future__ import annotations

import time
from typing import Sequence

from d2lora.evaluation.generation import chat_prompt, log_progress, model_device

TARGET_DELIMITER = ""
# ARC-Easy has ~9.5k (question, choice) pairs; cap the progress log at about this many lines.
PROGRESS_LINES = 50


def mc_context(tokenizer, question: str) -> str:
    return chat_prompt(tokenizer, f"Question: {question}\nAnswer:")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval's `_encode_pair` splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    # The chat template already holds BOS where the model expects one.
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


def build_requests(tokenizer, rows: Sequence[dict]) -> list[tuple[int, int, list[int], list[int]]]:
    """(item index, choice index, context ids, continuation ids) for every choice of every item."""
    requests = []
    for item, row in enumerate(rows):
        if not 0 <= row["answer_index"] < len(row["choices"]):
            raise ValueError(
                f"item {row['id']}: answer_index {row['answer_index']} outside its {len(row['choices'])} choices"
            )
        context = mc_context(tokenizer, row["question"])
        for choice_index, choice in enumerate(row["choices"]):
            if not choice:
                raise ValueError(f"item {row['id']}: choice {choice_index} is empty")
            context_ids, continuation_ids = encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
            if not continuation_ids:
                raise ValueError(f"item {row['id']}: choice {choice_index} encodes to no tokens")
            requests.append((item, choice_index, context_ids, continuation_ids))
    return requests


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device):
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context, continuation)."""
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    # The last token is never an input: nothing after it is scored.
    inputs = [(context + continuation)[:-1] for context, continuation in pairs]
    input_ids, attention_mask = right_pad(inputs, pad_id, model_device(model))
    starts = [len(context) - 1 for context, _ in pairs]  # position whose logits predict the 1st continuation token
    first = min(starts)
    # Only the positions from the earliest continuation on need vocabulary-sized logits.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=input_ids.shape[1] - first).logits
    sums = []
    for row, (start, (_, continuation)) in enumerate(zip(starts, pairs)):
        offset = start - first
        row_logits = logits[row, offset : offset + len(continuation)].float().log_softmax(-1)
        targets = torch.tensor(continuation, device=row_logits.device).unsqueeze(-1)
        sums.append(row_logits.gather(-1, targets).sum().item())
    return sums


def score_requests(model, tokenizer, requests, batch_size: int, partial=None) -> list[float]:
    """Log-likelihood of every request, batched longest first and returned in request order.

    `partial` (d2lora.evaluation.partial.PartialResults, optional): batches of an earlier, killed
    run are taken from it; every new batch is recorded in it.
    """
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][2]) + len(requests[i][3])), i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    every = max(1, len(batches) // PROGRESS_LINES)
    results: list[float] = [0.0] * len(requests)
    model.eval()
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for number, batch in enumerate(batches, start=1):
            if partial is not None and partial.has_all(batch):
                sums = [partial.done[i] for i in batch]
            else:
                sums = continuation_logprobs(model, [(requests[i][2], requests[i][3]) for i in batch], pad_id)
                if partial is not None:
                    partial.record(dict(zip(batch, sums)))
            for index, value in zip(batch, sums):
                results[index] = value
            done += len(batch)
            if number % every == 0 or number == len(batches):
                log_progress("multiple-choice", number, len(batches), done, len(requests), started, unit="pairs")
    return results


def _argmax(values: Sequence[float]) -> int:
    # First maximum, as numpy.argmax in lm-eval.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_item(row: dict, logprobs: list[float], n_tokens: list[int]) -> dict:
    per_char = [lp / len(choice) for lp, choice in zip(logprobs, row["choices"])]
    predicted, predicted_norm = _argmax(logprobs), _argmax(per_char)
    labels = row.get("labels") or []
    return {
        "id": row["id"],
        "choice_logprobs": logprobs,
        "choice_logprobs_per_char": per_char,
        "choice_n_tokens": n_tokens,
        "predicted_index": predicted,
        "predicted_label": labels[predicted] if len(labels) == len(logprobs) else None,
        "predicted_index_norm": predicted_norm,
        "answer_index": row["answer_index"],
        "correct": predicted == row["answer_index"],
        "correct_norm": predicted_norm == row["answer_index"],
    }


def evaluate_multiple_choice(
    model, tokenizer, rows: list[dict], batch_size: int, partial=None
) -> tuple[list[dict], dict]:
    """Per-item log-likelihoods and {"accuracy", "accuracy_norm", "n_items"} (fractions)."""
    if not rows:
        raise ValueError("evaluate_multiple_choice: no evaluation rows")
    requests = build_requests(tokenizer, rows)
    logprobs = score_requests(model, tokenizer, requests, batch_size, partial=partial)
    by_item: list[list[float]] = [[] for _ in rows]
    tokens_by_item: list[list[int]] = [[] for _ in rows]
    for (item, _, _, continuation), value in zip(requests, logprobs):
        by_item[item].append(value)
        tokens_by_item[item].append(len(continuation))
    per_example = [score_item(row, lps, n) for row, lps, n in zip(rows, by_item, tokens_by_item)]
    n_items = len(per_example)
    scores = {
        "accuracy": sum(ex["correct"] for ex in per_example) / n_items,
        "accuracy_norm": sum(ex["correct_norm"] for ex in per_example) / n_items,
        "n_items": n_items,
    }
    return per_example, scores
