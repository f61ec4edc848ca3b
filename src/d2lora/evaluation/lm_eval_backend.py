"""EleutherAI lm-eval as the second evaluation engine (config `evaluation.engine: lm_eval`).

Everything that touches lm-eval's API lives here, so an lm-eval change is one file. The tasks are
YAML templates in workflow/resources/lm_eval/; `write_task` fills in the PREPARED eval file of the
cell (results/data/<role>/eval.jsonl) and the prompt of the config, and writes the task into the
evaluation job's own folder, so lm-eval reads exactly the items and prompt our own evaluator reads.
The model is the cached base folder plus the cell's LoRA adapter (`peft=`), as in our engine.

Per-example records keep the shape of our engine's predictions.jsonl (id, prompt, output,
extracted, reference, correct / choice log-probs, predicted index, ...). lm-eval generates the
GSM8K answers and our extractor scores them (one `answers_match` for both engines); lm-eval's own
regex filter and exact_match verdict on the same text are kept beside it (`lm_eval_*`), so every
lm-eval run is also a cross-check of the two extractors (tests/test_lm_eval.py holds the
agreement on real outputs and explains each disagreement).
"""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import version
from pathlib import Path

import yaml

from d2lora.benchmarks import BENCHMARKS
from d2lora.evaluation.answers import answers_match, extract_with_rule
from d2lora.evaluation.math_eval import render_math_prompt
from d2lora.precision import resolve_dtype

TASK_NAMES = {name: b.lm_eval_task for name, b in BENCHMARKS.items() if b.lm_eval_task}
GSM8K_FILTER = "boxed_else_last_number"
SUPPORTED = tuple(TASK_NAMES)
TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "workflow" / "resources" / "lm_eval"


def template_path(benchmark: str, template_dir: str | os.PathLike | None = None) -> Path:
    if benchmark not in TASK_NAMES:
        raise ValueError(f"lm-eval engine: no task for benchmark '{benchmark}' (it has: {', '.join(SUPPORTED)})")
    path = Path(template_dir or TEMPLATE_DIR) / f"{TASK_NAMES[benchmark]}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task template {path} does not exist")
    return path


def jinja_prompt(prompt_template: str) -> str:
    """Our `{question}` template as lm-eval's Jinja `doc_to_text`.

    Only `{question}` is a placeholder in our templates; anything Jinja would read as syntax
    would change the prompt silently, so it is refused.
    """
    if "{question}" not in prompt_template:
        raise ValueError(f"math prompt_template must contain {{question}}; got {prompt_template!r}")
    for token in ("{{", "}}", "{%", "%}", "{#", "#}"):
        if token in prompt_template:
            raise ValueError(f"math prompt_template {prompt_template!r} holds {token!r}, which Jinja would interpret")
    return prompt_template.replace("{question}", "{{question}}")


def write_task(
    benchmark: str,
    data_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: dict,
    template_dir: str | os.PathLike | None = None,
) -> Path:
    """Fill the benchmark's template and write it to `out_dir`; returns the task file."""
    text = template_path(benchmark, template_dir).read_text(encoding="utf-8")
    values = {"DATA_FILE": json.dumps(str(Path(data_file).resolve()))}
    if benchmark == "gsm8k":
        values["DOC_TO_TEXT"] = json.dumps(jinja_prompt(settings["prompt_template"]))
        values["MAX_GEN_TOKS"] = str(int(settings["max_new_tokens"]))
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise ValueError(f"lm-eval template for {benchmark}: placeholder(s) {left} left unfilled")
    out = Path(out_dir) / f"{TASK_NAMES[benchmark]}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def gsm8k_regex(template_dir: str | os.PathLike | None = None) -> str:
    """The regex of the task's filter, read from the template (tests apply it to fixed texts)."""

    # The @...@ placeholders are not YAML; they sit in values that the filter does not need.
    text = template_path("gsm8k", template_dir).read_text(encoding="utf-8").replace("@", "")
    config = yaml.safe_load(text)
    (entry,) = [f for f in config["filter_list"] if f["name"] == GSM8K_FILTER]
    return entry["filter"][0]["regex_pattern"]


def lm_eval_extract(texts: list[str], template_dir: str | os.PathLike | None = None) -> list[str]:
    """lm-eval's own RegexFilter, configured as in the task, applied to generated texts."""
    # lm-eval (seconds to import) only for jobs whose engine is lm-eval
    from lm_eval.filters.extraction import RegexFilter

    regex_filter = RegexFilter(regex_pattern=gsm8k_regex(template_dir), group_select=0)
    return [out[0] for out in regex_filter.apply([[t] for t in texts], [{} for _ in texts])]


def model_args(model_dir, adapter_dir, dtype: str) -> dict:
    args = {"pretrained": str(model_dir), "dtype": dtype}
    if adapter_dir:
        args["peft"] = str(adapter_dir)
    return args


def run_simple_evaluate(benchmark: str, task_file: Path, model_dir, adapter_dir, settings: dict, device: str) -> dict:
    """One lm-eval run of one task; returns lm-eval's result dict (with logged samples)."""
    # lm-eval (seconds to import) only for jobs whose engine is lm-eval
    import lm_eval

    # lm-eval (seconds to import) only for jobs whose engine is lm-eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(task_file.parent), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args(model_dir, adapter_dir, resolve_dtype(settings.get("dtype"), device).dtype),
        tasks=[TASK_NAMES[benchmark]],
        task_manager=task_manager,
        device=device,
        batch_size=int(settings["batch_size"]),
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
    )


def _task_samples(results: dict, benchmark: str, n_rows: int) -> list[dict]:
    samples = sorted(results["samples"][TASK_NAMES[benchmark]], key=lambda s: s["doc_id"])
    if [s["doc_id"] for s in samples] != list(range(n_rows)):
        raise RuntimeError(f"lm-eval returned {len(samples)} samples for {n_rows} items of {benchmark}")
    return samples


def gsm8k_records(samples: list[dict], rows: list[dict], prompts: list[str]) -> list[dict]:
    """Per-example records of lm-eval's generations, scored by OUR extractor and answers_match.

    lm-eval's regex filter plus exact_match marks `\\boxed{18.00}`, `\\boxed{\\frac{1}{2}}` or
    `\\boxed{5 \\text{ apples}}` wrong (gold 18, 0.5, 5), so the verdict (`correct`) is ours and both
    engines score alike; lm-eval's own answer and verdict are kept beside it (`lm_eval_*`).
    """
    records = []
    for sample, row, prompt in zip(samples, rows, prompts):
        if sample["doc"]["id"] != row["id"]:
            raise RuntimeError(f"lm-eval sample {sample['doc_id']} is item {sample['doc']['id']}, expected {row['id']}")
        output = sample["resps"][0][0]
        ours, rule = extract_with_rule(output)
        records.append(
            {
                "id": row["id"],
                "prompt": prompt,
                "context": sample["arguments"][0][0],
                "output": output,
                "extracted": ours,
                "rule": rule,
                "reference": row["answer"],
                "correct": answers_match(ours, row["answer"]),
                "lm_eval_extracted": sample["filtered_resps"][0],
                "lm_eval_filter": GSM8K_FILTER,
                "lm_eval_correct": bool(sample["exact_match"]),
            }
        )
    return records


def summarize_gsm8k(records: list[dict]) -> dict:
    n = len(records)
    return {
        "accuracy": sum(r["correct"] for r in records) / n,
        "n_items": n,
        "n_boxed": sum(r["rule"] == "boxed" for r in records),
        # lm-eval's own filter and exact_match on the same generations, for comparison.
        "lm_eval_accuracy": sum(r["lm_eval_correct"] for r in records) / n,
        "extractor_agreement": sum(extractions_agree(r["lm_eval_extracted"], r["extracted"]) for r in records) / n,
    }


def extractions_agree(lm_eval_answer: str | None, pipeline_answer: str | None) -> bool:
    """Did both extractors pick the same final answer? Both empty counts as agreeing."""
    lm_missing = lm_eval_answer in (None, "", "[invalid]")
    if lm_missing or pipeline_answer is None:
        return lm_missing and pipeline_answer is None
    if lm_eval_answer.replace(",", "") == pipeline_answer:  # also for numbers too long for a float
        return True
    return answers_match(lm_eval_answer, pipeline_answer)


def arc_records(samples: list[dict], rows: list[dict]) -> list[dict]:
    records = []
    for sample, row in zip(samples, rows):
        if sample["doc"]["id"] != row["id"]:
            raise RuntimeError(f"lm-eval sample {sample['doc_id']} is item {sample['doc']['id']}, expected {row['id']}")
        logprobs = [float(resp[0]) for resp in sample["filtered_resps"]]
        per_char = [lp / len(choice) for lp, choice in zip(logprobs, row["choices"])]
        predicted = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
        predicted_norm = max(range(len(per_char)), key=lambda i: (per_char[i], -i))
        records.append(
            {
                "id": row["id"],
                "choice_logprobs": logprobs,
                "choice_logprobs_per_char": per_char,
                "predicted_index": predicted,
                "predicted_label": row["labels"][predicted],
                "predicted_index_norm": predicted_norm,
                "answer_index": row["answer_index"],
                "correct": bool(sample["acc"]),
                "correct_norm": bool(sample["acc_norm"]),
            }
        )
    return records


def summarize_arc(records: list[dict]) -> dict:
    n = len(records)
    return {
        "accuracy": sum(r["correct"] for r in records) / n,
        "accuracy_norm": sum(r["correct_norm"] for r in records) / n,
        "n_items": n,
    }


def evaluate_with_lm_eval(
    benchmark: str, model_dir, adapter_dir, data_file, rows: list[dict], settings: dict, work_dir, device: str
) -> tuple[list[dict], dict]:
    """(per-example records, scores) of one cell on one benchmark, scored by lm-eval."""
    if not rows:
        raise ValueError(f"lm-eval engine: no evaluation rows for {benchmark}")
    task_file = write_task(benchmark, data_file, Path(work_dir), settings, settings.get("lm_eval_templates"))
    results = run_simple_evaluate(benchmark, task_file, model_dir, adapter_dir, settings, device)
    samples = _task_samples(results, benchmark, len(rows))
    if benchmark == "gsm8k":
        prompts = [render_math_prompt(settings["prompt_template"], row["question"]) for row in rows]
        records = gsm8k_records(samples, rows, prompts)
        scores = summarize_gsm8k(records)
        reported, recounted = (
            results["results"][TASK_NAMES[benchmark]][f"exact_match,{GSM8K_FILTER}"],
            scores["lm_eval_accuracy"],
        )
    else:
        records = arc_records(samples, rows)
        scores = summarize_arc(records)
        reported, recounted = results["results"][TASK_NAMES[benchmark]]["acc,none"], scores["accuracy"]
    # lm-eval's own aggregate must be what its per-example verdicts add up to.
    if abs(reported - recounted) > 1e-9:
        raise RuntimeError(f"lm-eval reports {reported} for {benchmark} but its samples give {recounted}")
    return records, scores


def lm_eval_version() -> str:
    return version("lm_eval")
