"""lm-eval as the second engine: task templates, lm-eval's extractor against ours on real model
outputs, and whole cells scored by both engines with the tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from d2lora.evaluation import lm_eval_backend as backend  # noqa: E402
from d2lora.evaluation.answers import answers_match, extract_with_rule  # noqa: E402
from d2lora.evaluation.math_eval import score_math_output  # noqa: E402
from d2lora.evaluation.run import engine_for, evaluate_cell  # noqa: E402
from d2lora.io import read_json, read_jsonl, write_jsonl  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PAPER_PROMPT = r"{question} Please reason step by step, and put your final answer within \boxed{}."
# 1,319 greedy generations (<= 512 new tokens, bf16, one batch) of the untuned SmolLM2-135M-Instruct
# on the real GSM8K test set with the paper's prompt, made on an H100 by our own generator.
REAL_OUTPUTS = FIXTURES / "gsm8k_test_smollm2_greedy512.jsonl.gz"
DISAGREEMENTS = FIXTURES / "gsm8k_extractor_disagreements.yaml"


# ----------------------------------------------------------------------------- task files


def test_write_task_fills_the_template(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("{}\n")
    settings = {"prompt_template": PAPER_PROMPT, "max_new_tokens": 77}
    task = yaml.safe_load(backend.write_task("gsm8k", data, tmp_path / "tasks", settings).read_text())
    assert task["task"] == "d2lora_gsm8k" and task["dataset_path"] == "json"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    assert task["doc_to_text"] == "{{question}} Please reason step by step, and put your final answer within \\boxed{}."
    assert task["generation_kwargs"]["max_gen_toks"] == 77 and task["generation_kwargs"]["do_sample"] is False
    arc = yaml.safe_load(backend.write_task("arc_easy", data, tmp_path / "tasks", {}).read_text())
    assert arc["doc_to_choice"] == "choices" and arc["doc_to_target"] == "answer_index"


@pytest.mark.parametrize("template", ["No placeholder", "{{question}} doubled", "{question} {% if x %}"])
def test_prompts_that_jinja_would_change_are_refused(template):
    with pytest.raises(ValueError):
        backend.jinja_prompt(template)


def test_titles_always_use_our_engine():
    assert engine_for("titles", "lm_eval") == "pipeline"
    assert engine_for("gsm8k", "lm_eval") == "lm_eval"
    assert engine_for("arc_easy", "pipeline") == "pipeline"
    with pytest.raises(ValueError, match="engine"):
        engine_for("gsm8k", "vllm")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{18}.", "18"),
        ("first \\boxed{5}, then \\boxed{7} dollars", "7"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("She has 3 apples and buys 4 more, 7 in all.", "7"),
        ("It costs $1,234.50 in total.", "1,234.50"),
        ("The temperature is -12 degrees.", "-12"),
        ("No numbers here.", "[invalid]"),
        ("I put the final answer within \\boxed{}. So the answer is 3 + 4 = 7.", "7"),
        ("So, the answer is: $56. Check: 56 - 6 = 50", "56"),
        ("(1/6) * (1/2) = 1/12", "1/12"),
        ("pages 1-36", "36"),
    ],
)
def test_lm_eval_filter_on_hand_made_texts(text, expected):
    assert backend.lm_eval_extract([text]) == [expected]


# ----------------------------------------------------------------------------- the extractors on real outputs


def _real_outputs() -> list[dict]:
    with gzip.open(REAL_OUTPUTS, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _comparison() -> list[dict]:
    rows = _real_outputs()
    theirs = backend.lm_eval_extract([r["output"] for r in rows])
    out = []
    for row, lm_answer in zip(rows, theirs):
        ours, rule = extract_with_rule(row["output"])
        out.append(
            {
                "id": row["id"],
                "ours": ours,
                "rule": rule,
                "lm_eval": lm_answer,
                "agree": backend.extractions_agree(lm_answer, ours),
                "ours_correct": answers_match(ours, row["reference"]),
                "lm_eval_correct": _lm_eval_exact_match(lm_answer, row["reference"]),
            }
        )
    return out


def _lm_eval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match with the task's own settings."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    task = yaml.safe_load(backend.template_path("gsm8k").read_text().replace("@", ""))
    (metric,) = task["metric_list"]
    score = exact_match_hf_evaluate(
        [prediction],
        [reference],
        regexes_to_ignore=metric["regexes_to_ignore"],
        ignore_case=metric["ignore_case"],
        ignore_punctuation=metric["ignore_punctuation"],
    )
    return bool(score["exact_match"])


def test_extractors_agree_on_real_outputs_and_every_disagreement_is_explained():
    comparison = _comparison()
    n = len(comparison)
    assert n == 1319
    disagree = {c["id"]: c for c in comparison if not c["agree"]}
    assert 1 - len(disagree) / n >= 0.99, f"{len(disagree)} of {n} extractions differ"
    explained = yaml.safe_load(DISAGREEMENTS.read_text(encoding="utf-8"))
    assert set(explained) == set(disagree), "tests/fixtures/gsm8k_extractor_disagreements.yaml is out of date"
    for item_id, entry in explained.items():
        assert entry["ours"] == disagree[item_id]["ours"] and entry["lm_eval"] == disagree[item_id]["lm_eval"]
        assert entry["why"].strip()
    # Verdicts (what the accuracy is made of) agree at least as often as the extractions do.
    verdicts = sum(c["ours_correct"] == c["lm_eval_correct"] for c in comparison) / n
    assert verdicts >= 0.99


# Answers a careful grader marks right that lm-eval's regex filter + exact_match marks wrong.
GRADER_CASES = [
    ("So the total is \\boxed{18.00}.", "18"),
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5"),
    ("She keeps \\boxed{5 \\text{ apples}}.", "5"),
    ("It takes \\boxed{6\\text{ weeks}}", "6"),
    ("The rate is \\boxed{18%}", "18"),
    ("The rate is \\boxed{18\\%}", "18"),
    ("He pays \\boxed{\\$18.00}", "18"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{0.50}", "0.5"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{\\textbf{7}}", "7"),
    ("The answer is 1,000.", "1000"),
    ("\\boxed{-3}", "-3"),
    ("\\boxed{12}", "12"),
    ("First 3 + 4 = 7, so \\boxed{7}.", "7"),
]


def _fake_lm_eval_samples(outputs: list[str], references: list[str]) -> list[dict]:
    """Samples as simple_evaluate logs them: lm-eval's own filter and exact_match on each output."""
    filtered = backend.lm_eval_extract(outputs)
    return [
        {
            "doc_id": i,
            "doc": {"id": f"g{i}"},
            "arguments": [[f"<chat>{i}"]],
            "resps": [[output]],
            "filtered_resps": [answer],
            "exact_match": float(_lm_eval_exact_match(answer, reference)),
        }
        for i, (output, answer, reference) in enumerate(zip(outputs, filtered, references))
    ]


def test_both_engines_score_every_careful_grader_case_alike():
    outputs, references = [c[0] for c in GRADER_CASES], [c[1] for c in GRADER_CASES]
    rows = [{"id": f"g{i}", "question": "q", "answer": ref} for i, ref in enumerate(references)]
    records = backend.gsm8k_records(_fake_lm_eval_samples(outputs, references), rows, ["q"] * len(rows))
    ours = [score_math_output(row, "q", output) for row, output in zip(rows, outputs)]
    assert [r["correct"] for r in records] == [o["correct"] for o in ours] == [True] * len(GRADER_CASES)
    # What lm-eval's exact_match alone would have scored: the reason its verdict is not the one used.
    assert sum(r["lm_eval_correct"] for r in records) <= len(GRADER_CASES) - 5
    scores = backend.summarize_gsm8k(records)
    assert scores["accuracy"] == 1.0 and scores["lm_eval_accuracy"] < 1.0


@pytest.mark.parametrize("runaway", ["9" * 5000, "9" * 5000 + ".5", "4" + "0" * 400])
def test_a_runaway_number_is_no_match_in_either_engine(runaway):
    # Past Python's int-conversion limit Fraction() raises ValueError; it must read as wrong, not crash.
    assert not answers_match(runaway, "5")
    (record,) = backend.gsm8k_records(
        _fake_lm_eval_samples([f"\\boxed{{{runaway}}}"], ["5"]), [{"id": "g0", "question": "q", "answer": "5"}], ["q"]
    )
    assert record["correct"] is False


# ----------------------------------------------------------------------------- whole cells, both engines

MATH_ROWS = [
    {"id": "m1", "question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7"},
    {"id": "m2", "question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "24"},
]
MC_ROWS = [
    {
        "id": "a1",
        "question": "Which gas do plants take in to make food?",
        "choices": ["oxygen", "carbon dioxide", "helium", "nitrogen"],
        "labels": ["A", "B", "C", "D"],
        "answer_index": 1,
    },
    {
        "id": "a2",
        "question": "What pulls objects toward Earth?",
        "choices": ["gravity", "friction", "magnetism"],
        "labels": ["1", "2", "3"],
        "answer_index": 0,
    },
]


def _cell(benchmark, tiny_model_dir, tmp_path, rows, engine, settings):
    data = tmp_path / benchmark / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "eval.jsonl", rows)
    out = tmp_path / benchmark / engine
    cell = {"task": "math", "method": "none", "init": "lora", "n": 0, "seed": 0}
    record = evaluate_cell(
        benchmark,
        cell=cell,
        model_dir=tiny_model_dir,
        adapter_dir=None,
        data_dir=data,
        settings={**settings, "engine": engine},
        scores_path=out / "scores.json",
        predictions_path=out / "predictions.jsonl",
        device="cpu",
    )
    return record, read_jsonl(out / "predictions.jsonl")


@pytest.fixture(scope="module")
def both_engines(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    math_settings = {"prompt_template": PAPER_PROMPT, "max_new_tokens": 6, "batch_size": 1, "dtype": "float32"}
    mc_settings = {"batch_size": 4, "dtype": "float32"}
    return {
        (benchmark, engine): _cell(benchmark, tiny_model_dir, tmp, rows, engine, settings)
        for benchmark, rows, settings in (("gsm8k", MATH_ROWS, math_settings), ("arc_easy", MC_ROWS, mc_settings))
        for engine in ("pipeline", "lm_eval")
    }


def test_arc_predictions_are_the_same_in_both_engines(both_engines):
    ours, theirs = both_engines[("arc_easy", "pipeline")][1], both_engines[("arc_easy", "lm_eval")][1]
    assert [p["predicted_index"] for p in ours] == [p["predicted_index"] for p in theirs]
    assert [p["predicted_index_norm"] for p in ours] == [p["predicted_index_norm"] for p in theirs]
    for a, b in zip(ours, theirs):
        assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-4)
        assert set(b) <= set(a) | {"choice_logprobs_per_char"}
    record = both_engines[("arc_easy", "lm_eval")][0]
    assert record["engine"] == "lm_eval" and record["engine_version"]
    assert record["metrics"]["accuracy"] == both_engines[("arc_easy", "pipeline")][0]["metrics"]["accuracy"]


def test_gsm8k_lm_eval_sees_our_prompt_and_generates_our_text(both_engines, tokenizer):
    from d2lora.evaluation.generation import chat_prompt

    ours, theirs = both_engines[("gsm8k", "pipeline")][1], both_engines[("gsm8k", "lm_eval")][1]
    for a, b in zip(ours, theirs):
        assert b["prompt"] == a["prompt"]
        assert b["context"] == chat_prompt(tokenizer, a["prompt"])  # chat template, no few-shot, nothing added
        assert b["output"] == a["output"]
        # One extractor and one answers_match score both engines' generations.
        assert (b["extracted"], b["rule"], b["correct"]) == (a["extracted"], a["rule"], a["correct"])
    record = both_engines[("gsm8k", "lm_eval")][0]
    assert set(record["metrics"]) >= {"accuracy", "lm_eval_accuracy", "extractor_agreement"}
    assert record["metrics"]["accuracy"] == both_engines[("gsm8k", "pipeline")][0]["metrics"]["accuracy"]
    assert read_json(Path(record["predictions"]).parent / "scores.json")["engine"] == "lm_eval"
    assert (Path(record["predictions"]).parent / "lm_eval" / "d2lora_gsm8k.yaml").is_file()
