"""The paper's datasets: field mappings on hand-made rows in each hub schema, the real local
copies in ../shared/data (skipped where absent), validation, config-time sizes, checksums and the
on-policy negatives."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from d2lora import grid
from d2lora.data import onpolicy
from d2lora.data.formats import to_canonical
from d2lora.data.prepare import load_prepared, prepare_role, subset
from d2lora.data.sources import available_rows, load_raw, source_origin
from d2lora.evaluation.math_eval import render_math_prompt, score_math_output
from d2lora.io import DataFileError, sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GSM8K_PROMPT = r"{question} Please reason step by step, and put your final answer within \boxed{}."
TITLES_PROMPT = "Generate a title for the following economics research paper abstract.\n\n{abstract}"


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data not available: {path} is absent (see shared/data/README.md)")
    return path


def _map(rows, fmt, form, template=None):
    return to_canonical(rows, fmt, form, template, "src", "src.jsonl")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- mlabonne/orpo-dpo-mix-40k


def _orpo_row(chosen_reply="Paris.", rejected_reply="Rome.", context=()):
    turns = [*context, {"role": "user", "content": "Capital of France?"}]
    return {
        "source": "truthy-dpo-v0.1",
        "prompt": "Capital of France?",
        "question": "Capital of France?",
        "chosen": [*turns, {"role": "assistant", "content": chosen_reply}],
        "rejected": [*turns, {"role": "assistant", "content": rejected_reply}],
    }


def test_orpo_dpo_mix_single_turn():
    (row,) = _map([_orpo_row()], "orpo_dpo_mix", "pairs")
    assert row == {"id": "src-000000", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}


CONTEXT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


def test_orpo_dpo_mix_gives_multi_turn_prompts_to_the_chat_template_as_messages(tokenizer):
    from d2lora.training.trainers import conversational

    (row,) = _map([_orpo_row(context=CONTEXT)], "orpo_dpo_mix", "pairs")
    assert row["prompt"] == [*CONTEXT, {"role": "user", "content": "Capital of France?"}]
    assert row["chosen"] == "Paris." and row["rejected"] == "Rome."
    (sft,) = conversational([row], "sft")
    assert sft["prompt"] == row["prompt"] and sft["completion"] == [{"role": "assistant", "content": "Paris."}]
    # The chat template renders every turn in its own role markers: no "System: ... User: ..." transcript.
    text = tokenizer.apply_chat_template(sft["prompt"] + sft["completion"], tokenize=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text and "<|im_start|>assistant\nHello!<|im_end|>" in text
    assert "User:" not in text


def test_warmup_prepares_rows_whose_rejected_is_missing_or_odd(tmp_path):
    rows = [
        _orpo_row(),
        {k: v for k, v in _orpo_row().items() if k != "rejected"},
        {**_orpo_row(), "rejected": "not a conversation"},
        {
            **_orpo_row(),
            "rejected": [{"role": "user", "content": "Capital of Spain?"}, {"role": "assistant", "content": "Madrid."}],
        },
        _orpo_row(rejected_reply="  "),
    ]
    path = _write_jsonl(tmp_path / "mix.jsonl", rows)
    manifest = prepare_role(
        "warmup",
        {"train": {"source": "local", "data_files": str(path), "format": "orpo_dpo_mix"}},
        tmp_path / "warmup",
        seed=0,
    )
    prepared = sorted(load_prepared(tmp_path / "warmup", "train"), key=lambda r: r["id"])  # stored in the seeded order
    assert manifest["counts"]["train"] == 5 and [r["chosen"] for r in prepared] == ["Paris."] * 5
    assert [r["rejected"] for r in prepared] == ["Rome.", None, None, None, None]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("chosen"), "row 2: missing field 'chosen'"),
        (lambda r: r.update(chosen="Paris."), "row 2: field 'chosen' must be a non-empty list"),
        (lambda r: r["chosen"].pop(), "row 2: field 'chosen' must end with a user turn and an assistant reply"),
        (lambda r: r["chosen"][-1].update(content=" "), "row 2: field 'chosen' ends with an empty reply"),
    ],
)
def test_orpo_dpo_mix_bad_rows_name_row(mutate, message):
    bad = json.loads(json.dumps(_orpo_row()))  # no dicts shared between chosen and rejected
    mutate(bad)
    with pytest.raises(DataFileError, match=message):
        _map([_orpo_row(), bad], "orpo_dpo_mix", "pairs")


# ----------------------------------------------------------------------------- xinlai/Math-Step-DPO-10K

STEP_ROW = {
    "dataset": "GSM_Rephrased",
    "prompt": "Grace charges 300 dollars per week and is paid every 2 weeks. How many weeks until she earns 1800 dollars?",
    "initial_reason_steps": "Let's think step by step.\nStep 1: In 2 weeks she earns 300*2 = 600 dollars.\n",
    "chosen": "Step 2: 1800 / 600 = 3 periods of 2 weeks.",
    "rejected": "Step 2: 1800 / 300 = 6 periods of 2 weeks.",
    "full_chosen": "Step 2: 1800 / 600 = 3 periods of 2 weeks.\nStep 3: 3 * 2 = 6 weeks.\nThe answer is: \\boxed{6}",
    "full_rejected": "Step 2: 1800 / 300 = 6 periods of 2 weeks.\nStep 3: 6 * 2 = 12 weeks.\nThe answer is: \\boxed{12}",
    "answer": "6",
}


def test_math_step_dpo_pairs_are_whole_solutions_sharing_the_prefix():
    (row,) = _map([STEP_ROW], "math_step_dpo", "pairs", GSM8K_PROMPT)
    prefix = STEP_ROW["initial_reason_steps"]
    assert row["prompt"] == render_math_prompt(GSM8K_PROMPT, STEP_ROW["prompt"])
    assert row["chosen"] == prefix + STEP_ROW["full_chosen"]
    assert row["rejected"] == prefix + STEP_ROW["full_rejected"]
    # The pair agrees up to the first diverging step: DPO's margin sees only what follows.
    common = len(prefix) + len("Step 2: 1800 / ")
    assert row["chosen"][:common] == row["rejected"][:common] and row["chosen"][common] != row["rejected"][common]
    # SFT on `chosen` learns a complete solution ending in the answer the evaluation extracts.
    assert score_math_output({"id": "x", "answer": "6"}, "", row["chosen"])["correct"]


def test_math_step_dpo_step_variant_and_eval_form():
    (row,) = _map([STEP_ROW], "math_step_dpo_step", "pairs", GSM8K_PROMPT)
    assert row["chosen"] == STEP_ROW["initial_reason_steps"] + STEP_ROW["chosen"]
    assert row["rejected"] == STEP_ROW["initial_reason_steps"] + STEP_ROW["rejected"]
    (evaluation,) = _map([STEP_ROW], "math_step_dpo", "math_eval")
    assert evaluation == {"id": "src-000000", "question": STEP_ROW["prompt"], "answer": "6"}


def test_math_step_dpo_empty_prefix_is_allowed_missing_field_is_not():
    first_step_wrong = {**STEP_ROW, "initial_reason_steps": ""}
    (row,) = _map([first_step_wrong], "math_step_dpo", "pairs", GSM8K_PROMPT)
    assert row["chosen"] == STEP_ROW["full_chosen"]
    for field in ("initial_reason_steps", "full_chosen", "full_rejected", "prompt"):
        bad = {k: v for k, v in STEP_ROW.items() if k != field}
        with pytest.raises(DataFileError, match=f"src.jsonl: row 1: missing field '{field}'"):
            _map([bad], "math_step_dpo", "pairs", GSM8K_PROMPT)


@pytest.mark.parametrize("fmt, field", [("math_step_dpo", "full_rejected"), ("math_step_dpo_step", "rejected")])
def test_math_step_dpo_rows_with_an_empty_rejected_are_dropped_and_counted(tmp_path, fmt, field):
    rows = [STEP_ROW, {**STEP_ROW, field: ""}, {**STEP_ROW, field: "  \n"}, {**STEP_ROW, field: None}]
    path = tmp_path / "step.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    role = {"prompt_template": GSM8K_PROMPT, "train": {"source": "local", "data_files": str(path), "format": fmt}}
    out = tmp_path / "math"
    record = prepare_role("math", role, out, seed=0)
    pairs = load_prepared(out, "train")
    # Never a pair whose rejected is the shared prefix alone.
    assert len(pairs) == 1 and pairs[0]["rejected"] != STEP_ROW["initial_reason_steps"]
    assert record["sources"]["train"]["dropped"] == {
        "rows": 3,
        "rule": "rows whose rejected continuation is empty (the pair would be the shared prefix alone)",
    }


# ----------------------------------------------------------------------------- econ titles (Keles & Bayrakli 2024)

ECON_ROW = {
    "title": "Efficiency in Micro-Behaviors and\n  FL Bias",
    "text": "In this paper, we propose a model which simulates odds distributions of\npari-mutuel betting.",
}


def test_econ_titles_pairs_and_eval_from_text_column():
    (pair,) = _map([ECON_ROW], "econ_titles", "pairs", TITLES_PROMPT)
    (evaluation,) = _map([ECON_ROW], "econ_titles", "generation_eval", TITLES_PROMPT)
    assert pair["prompt"].endswith("odds distributions of pari-mutuel betting.")
    assert pair["prompt"].startswith("Generate a title")
    assert pair["chosen"] == "Efficiency in Micro-Behaviors and FL Bias" and pair["rejected"] is None
    assert evaluation["reference"] == pair["chosen"] and evaluation["prompt"] == pair["prompt"]


def test_econ_titles_prefers_abstract_column_and_names_missing_fields():
    (pair,) = _map([{**ECON_ROW, "abstract": "An abstract."}], "econ_titles", "pairs", TITLES_PROMPT)
    assert pair["prompt"].endswith("\n\nAn abstract.")
    with pytest.raises(DataFileError, match="row 1: missing field 'abstract' \\(or 'text'\\)"):
        _map([{"title": "T"}], "econ_titles", "pairs", TITLES_PROMPT)
    with pytest.raises(DataFileError, match="row 1: missing field 'title'"):
        _map([{"text": "An abstract."}], "econ_titles", "pairs", TITLES_PROMPT)


def test_skip_and_limit_carve_disjoint_eval_and_train(tmp_path):
    rows = [{"title": f"Title {i}", "text": f"Abstract {i}."} for i in range(10)]
    (tmp_path / "econ").mkdir()
    path = _write_jsonl(tmp_path / "econ" / "econ_dataset.jsonl", rows)
    cfg = {"source": "local", "data_files": str(path), "format": "econ_titles"}
    role = {"prompt_template": TITLES_PROMPT, "train": {**cfg, "skip": 3}, "eval": {**cfg, "limit": 3}}
    prepare_role("titles", role, tmp_path / "titles", seed=0, max_n=7)
    train, evaluation = load_prepared(tmp_path / "titles", "train"), load_prepared(tmp_path / "titles", "eval")
    assert [r["id"] for r in evaluation] == [f"econ-econ_dataset-{i:06d}" for i in range(3)]
    assert sorted(r["id"] for r in train) == [f"econ-econ_dataset-{i:06d}" for i in range(3, 10)]
    assert available_rows(role["train"]) == 7 and available_rows(role["eval"]) == 3
    bad = _write_jsonl(tmp_path / "bad.jsonl", rows[:4] + [{"title": "no abstract"}])
    with pytest.raises(DataFileError, match=r"bad.jsonl \(rows counted after skipping 3\): row 2: missing field"):
        load_and_map = load_raw({**cfg, "data_files": str(bad), "skip": 3}, 0)[0]
        to_canonical(
            load_and_map,
            "econ_titles",
            "pairs",
            TITLES_PROMPT,
            "bad",
            source_origin({**cfg, "data_files": str(bad), "skip": 3}),
        )


# ----------------------------------------------------------------------------- arXiv econ/q-fin stand-in, seeded held-out draw

ARXIV_ROW = {
    "title": "Managing Persuasion Robustly. (arXiv:2310.10024v1 [econ.TH])",
    "abstract": "arXiv:2310.10024v1 Announce Type: new Abstract: We study a sender-receiver model.",
    "arxiv_id": "2310.10024",
    "clean_title": "Managing Persuasion Robustly",
    "clean_abstract": "We study a  sender-receiver\n model.",
}


def test_arxiv_titles_reads_the_clean_fields_and_keeps_the_arxiv_id():
    (pair,) = _map([ARXIV_ROW], "arxiv_titles", "pairs", TITLES_PROMPT)
    (evaluation,) = _map([ARXIV_ROW], "arxiv_titles", "generation_eval", TITLES_PROMPT)
    assert pair == {
        "id": "arXiv:2310.10024",
        "prompt": TITLES_PROMPT.replace("{abstract}", "We study a sender-receiver model."),
        "chosen": "Managing Persuasion Robustly",
        "rejected": None,
    }
    assert evaluation["reference"] == "Managing Persuasion Robustly" and evaluation["prompt"] == pair["prompt"]
    with pytest.raises(DataFileError, match="row 1: missing field 'clean_abstract'"):
        _map([{"title": "T", "abstract": "A.", "clean_title": "T"}], "arxiv_titles", "pairs", TITLES_PROMPT)


def test_shuffled_source_draws_the_held_out_head_at_random_and_disjoint(tmp_path):
    # Sorted by id, as the real file is: without the shuffle the held-out set is the oldest rows.
    rows = [
        {**ARXIV_ROW, "arxiv_id": f"{2300 + i}.00001", "clean_title": f"T{i}", "clean_abstract": f"A{i}."}
        for i in range(40)
    ]
    path = _write_jsonl(tmp_path / "arxiv.jsonl", rows)
    cfg = {"source": "local", "data_files": str(path), "format": "arxiv_titles", "shuffle": True}
    role = {"prompt_template": TITLES_PROMPT, "train": {**cfg, "skip": 10}, "eval": {**cfg, "limit": 10}}
    prepare_role("titles", role, tmp_path / "titles", seed=0, max_n=30)
    held_out = [r["id"] for r in load_prepared(tmp_path / "titles", "eval")]
    train = {r["id"] for r in load_prepared(tmp_path / "titles", "train")}
    assert len(held_out) == 10 and len(train) == 30 and not train & set(held_out)
    assert held_out != [f"arXiv:{2300 + i}.00001" for i in range(10)]  # not the file's head
    assert train | set(held_out) == {f"arXiv:{2300 + i}.00001" for i in range(40)}

    # The seed decides the draw: the same seed gives the same rows, another seed others.
    def head(seed):
        return [f"arXiv:{row['arxiv_id']}" for row in load_raw({**cfg, "limit": 10}, seed)[0]]

    assert head(0) == held_out and head(1) != held_out
    assert "seeded shuffle order" in source_origin(cfg)


def test_shuffle_gives_rows_without_an_id_their_file_position():
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]
    cfg = {"source": "local", "data_files": "unused.jsonl", "format": "alpaca", "shuffle": True}
    from d2lora.data.sources import apply_shuffle

    shuffled = apply_shuffle(rows, cfg, seed=0)
    assert sorted(r["id"] for r in shuffled) == [f"unused-{i:06d}" for i in range(6)]
    assert [r["id"] for r in shuffled] != sorted(r["id"] for r in shuffled)
    assert all(r["output"] == r["id"][-1] for r in shuffled)  # the id names the row it was in the file


# ----------------------------------------------------------------------------- Stanford Alpaca (warm-up stand-in)


def test_alpaca_prompt_is_instruction_and_input_and_empty_outputs_are_dropped_and_counted(tmp_path):
    rows = [
        {"instruction": "Arrange the following musical notes", "input": "G, B, E", "output": "E, G, B"},
        {"instruction": "Explain cash flow.", "input": "", "output": " Cash flow is ... "},
        {"instruction": "Convert 20 inches to centimetres", "input": "", "output": ""},
    ]
    mapped = _map(rows, "alpaca", "pairs")
    assert [r["prompt"] for r in mapped] == ["Arrange the following musical notes\n\nG, B, E", "Explain cash flow."]
    assert [r["chosen"] for r in mapped] == ["E, G, B", "Cash flow is ..."] and {r["rejected"] for r in mapped} == {
        None
    }
    path = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    manifest = prepare_role(
        "warmup",
        {"train": {"source": "local", "data_files": str(path), "format": "alpaca"}},
        tmp_path / "warmup",
        seed=0,
    )
    record = manifest["sources"]["train"]
    assert manifest["counts"]["train"] == 2 and record["rows_read"] == 3
    assert record["dropped"] == {"rows": 1, "rule": "rows whose output is empty"}
    with pytest.raises(DataFileError, match="row 1: missing field 'output'"):
        _map([{"instruction": "x", "input": ""}], "alpaca", "pairs")


def test_a_format_without_a_drop_rule_may_not_drop_rows():
    from d2lora.data.formats import FORMATS, register_format

    register_format("test_silent_drop", "pairs")(lambda row, index, ctx: None)
    try:
        with pytest.raises(RuntimeError, match="declares no drop rule"):
            _map([{"a": 1}], "test_silent_drop", "pairs")
    finally:
        FORMATS.pop("test_silent_drop")


def test_real_stand_ins_prepare_as_the_mini_preset_reads_them(tmp_path):
    abstracts, alpaca = (
        _shared("econ_titles/econ_qfin_arxiv_abstracts.jsonl"),
        _shared("general_instruct/alpaca_5000.jsonl"),
    )
    cfg = {"source": "local", "data_files": str(abstracts), "format": "arxiv_titles", "shuffle": True}
    titles = prepare_role(
        "titles",
        {"prompt_template": TITLES_PROMPT, "train": {**cfg, "skip": 100}, "eval": {**cfg, "limit": 100}},
        tmp_path / "titles",
        seed=0,
        max_n=4360,
    )
    assert titles["counts"] == {"train": 4360, "eval": 100}
    warmup = prepare_role(
        "warmup",
        {"train": {"source": "local", "data_files": str(alpaca), "format": "alpaca"}},
        tmp_path / "warmup",
        seed=0,
    )
    assert warmup["counts"]["train"] == 4998 and warmup["sources"]["train"]["dropped"]["rows"] == 2


def test_embedded_default_reads_the_shipped_subsets_with_the_gpu_presets_formats(tmp_path):
    default, mini = _config("config.yaml"), _config("mini.yaml")
    cwd = os.getcwd()
    os.chdir(REPO)  # the config's paths are relative to the repository root, where Snakemake runs
    try:
        for role in ("warmup", "titles"):
            assert default["datasets"][role]["train"]["format"] == mini["datasets"][role]["train"]["format"]
            assert default["datasets"][role]["train"]["data_files"].startswith("workflow/resources/data/")
        titles = prepare_role("titles", default["datasets"]["titles"], tmp_path / "titles", seed=0, max_n=16)
        warmup = prepare_role("warmup", default["datasets"]["warmup"], tmp_path / "warmup", seed=0)
    finally:
        os.chdir(cwd)
    # 80 titles: the first 12 of the seeded order held out, the next 68 for training; 32 warm-up rows.
    assert titles["counts"] == {"train": 68, "eval": 12} and warmup["counts"]["train"] == 32
    held_out = {r["id"] for r in load_prepared(tmp_path / "titles", "eval")}
    assert not held_out & {r["id"] for r in load_prepared(tmp_path / "titles", "train")}


def test_shipped_subsets_match_their_source_files_and_are_redrawn_exactly():
    resources = REPO / "workflow" / "resources" / "data"
    for name, rows in (("econ_titles", 80), ("alpaca", 64)):
        folder = resources / name
        subset_file = folder / f"{name}_{rows}.jsonl"
        assert (folder / "LICENSE").is_file() and sha256_file(subset_file) in (folder / "SOURCE.md").read_text()
        assert len(subset_file.read_text(encoding="utf-8").splitlines()) == rows
    _shared("econ_titles/econ_qfin_arxiv_abstracts.jsonl")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_subsets", resources / "make_subsets.py")
    make_subsets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_subsets)
    for name, (relative, sha256, rows, keep) in make_subsets.SUBSETS.items():
        drawn = make_subsets.draw(SHARED_DATA / relative, sha256, rows, keep)
        assert "\n".join(drawn) + "\n" == (resources / name / f"{name}_{rows}.jsonl").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- real GSM8K / ARC-Easy copies


def test_real_gsm8k_loader_counts_and_fields():
    train, files = load_raw({"source": "local", "data_files": str(_shared("gsm8k/train.jsonl")), "format": "gsm8k"}, 0)
    test, _ = load_raw({"source": "local", "data_files": str(_shared("gsm8k/test.jsonl")), "format": "gsm8k"}, 0)
    assert (len(train), len(test)) == (7473, 1319)
    assert set(train[0]) == {"question", "answer"} and "####" in train[0]["answer"]
    pairs = to_canonical(train, "gsm8k", "pairs", GSM8K_PROMPT, "gsm8k-train")
    assert len({p["id"] for p in pairs}) == 7473
    assert all(p["prompt"].endswith("within \\boxed{}.") and p["rejected"] is None for p in pairs)


def test_real_gsm8k_subsets_are_nested_and_fixed_by_seed(tmp_path):
    cfg = {
        "prompt_template": GSM8K_PROMPT,
        "train": {"source": "local", "data_files": str(_shared("gsm8k/train.jsonl")), "format": "gsm8k"},
    }
    prepare_role("math", cfg, tmp_path / "a", seed=0, max_n=1000)
    prepare_role("math", cfg, tmp_path / "b", seed=0, max_n=1000)
    prepare_role("math", cfg, tmp_path / "c", seed=1, max_n=1000)
    a, b, c = (load_prepared(tmp_path / x, "train") for x in "abc")
    assert a == b and a != c
    ids = {n: [r["id"] for r in subset(a, n)] for n in (100, 200, 500, 1000)}
    assert all(ids[small] == ids[big][:small] for small, big in [(100, 200), (200, 500), (500, 1000)])
    assert sorted(r["id"] for r in a) == sorted(r["id"] for r in c)  # same rows, other order


def test_evaluator_scores_real_reference_solutions_correct(tmp_path):
    """Our extractor reads GSM8K's own reference answers ("#### 72") and our boxed SFT targets."""
    train, _ = load_raw({"source": "local", "data_files": str(_shared("gsm8k/train.jsonl")), "format": "gsm8k"}, 0)
    test, _ = load_raw({"source": "local", "data_files": str(_shared("gsm8k/test.jsonl")), "format": "gsm8k"}, 0)
    for raw_rows, name in ((train, "train"), (test, "test")):
        items = to_canonical(raw_rows, "gsm8k", "math_eval", None, name)
        targets = to_canonical(raw_rows, "gsm8k", "pairs", GSM8K_PROMPT, name)
        raw_scored = [score_math_output(item, "", raw["answer"]) for item, raw in zip(items, raw_rows)]
        boxed_scored = [score_math_output(item, "", t["chosen"]) for item, t in zip(items, targets)]
        assert all(s["correct"] for s in raw_scored)
        # 4 train solutions also say "the answer is N" before "#### N"; that phrase is read first.
        assert sum(s["rule"] != "hashes" for s in raw_scored) <= 4
        assert all(s["correct"] and s["rule"] == "boxed" for s in boxed_scored)


def test_evaluator_runs_on_real_items(tiny_model, tokenizer, tmp_path):
    from d2lora.evaluation import evaluate_math, evaluate_multiple_choice

    prepare_role(
        "math",
        {
            "prompt_template": GSM8K_PROMPT,
            "eval": {"source": "local", "data_files": str(_shared("gsm8k/test.jsonl")), "format": "gsm8k", "limit": 3},
        },
        tmp_path / "math",
        seed=0,
    )
    prepare_role(
        "forgetting",
        {"eval": {"source": "local", "data_files": str(_shared("arc_easy/test.jsonl")), "format": "arc", "limit": 4}},
        tmp_path / "forgetting",
        seed=0,
    )
    math_rows = load_prepared(tmp_path / "math", "eval")
    per_example, scores = evaluate_math(tiny_model, tokenizer, math_rows, GSM8K_PROMPT, max_new_tokens=4, batch_size=3)
    assert scores["n_items"] == 3 and [p["reference"] for p in per_example] == ["18", "3", "70000"]
    assert per_example[0]["prompt"].startswith("Janet’s ducks lay 16 eggs")
    mc_rows = load_prepared(tmp_path / "forgetting", "eval")
    per_item, mc_scores = evaluate_multiple_choice(tiny_model, tokenizer, mc_rows, batch_size=8)
    assert mc_scores["n_items"] == 4 and all(
        len(p["choice_logprobs"]) == len(r["choices"]) for p, r in zip(per_item, mc_rows)
    )


# ----------------------------------------------------------------------------- validation and config-time sizes


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "file is empty"),
        ('{"question": "q", "answer": "a #### 1"}\n{"question": \n', r"bad.jsonl:2: malformed JSON"),
        ('{"question": "q"}\n', r"bad.jsonl: row 1: missing field 'answer'"),
        ('{"question": "q", "answer": "no final line"}\n', r"bad.jsonl: row 1: field 'answer' has no '#### <number>'"),
    ],
)
def test_bad_local_files_stop_preparation_naming_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    cfg = {"prompt_template": GSM8K_PROMPT, "eval": {"source": "local", "data_files": str(path), "format": "gsm8k"}}
    with pytest.raises(DataFileError, match=message):
        prepare_role("math", cfg, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_unparseable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(DataFileError, match="broken.parquet: cannot be read as parquet"):
        load_raw({"source": "local", "data_files": str(path), "format": "gsm8k"}, 0)


@pytest.mark.parametrize(
    "fmt, writer",
    [
        ("jsonl", lambda p, rows: p.write_text("".join(json.dumps(r) + "\n\n" for r in rows))),
        ("json", lambda p, rows: p.write_text(json.dumps(rows))),
        (
            "csv",
            lambda p, rows: p.write_text(
                "question,answer\n" + "".join(f'"{r["question"]}","{r["answer"]}"\n' for r in rows)
            ),
        ),
    ],
)
def test_available_rows_counts_local_files(tmp_path, fmt, writer):
    rows = [{"question": f"line one\nline two {i}", "answer": f"x #### {i}"} for i in range(5)]
    path = tmp_path / f"rows.{fmt}"
    writer(path, rows)
    cfg = {"source": "local", "data_files": str(path), "format": "gsm8k"}
    assert available_rows(cfg) == 5
    assert available_rows({**cfg, "skip": 2}) == 3 and available_rows({**cfg, "limit": 4}) == 4
    assert available_rows({"source": "hub", "path": "openai/gsm8k", "split": "test", "format": "gsm8k"}) is None


def _config(preset: str) -> dict:
    return yaml.safe_load((REPO / "config" / preset).read_text(encoding="utf-8"))


def test_n_larger_than_a_local_file_fails_at_config_time(tmp_path):
    path = _write_jsonl(tmp_path / "small.jsonl", [{"question": "q", "answer": f"#### {i}"} for i in range(20)])
    config = _config("config.yaml")  # the grid's largest math n is 16
    source = {"source": "local", "data_files": str(path), "format": "gsm8k"}
    config["datasets"]["math"]["train"] = source
    grid.check(config)  # 20 rows >= 16
    config["datasets"]["math"]["train"] = {**source, "skip": 6}  # 14 left
    with pytest.raises(
        grid.ConfigError,
        match=r"datasets.math.train: the grid asks for n=16 but this source "
        r"provides only 14 rows \(.*small.jsonl \(rows counted after skipping 6\)\)",
    ):
        grid.check(config)


def test_n_larger_than_real_gsm8k_train_fails_at_config_time():
    path = _shared("gsm8k/train.jsonl")
    config = _config("config.yaml")
    config["datasets"]["math"]["train"] = {"source": "local", "data_files": str(path), "format": "gsm8k"}
    config["experiments"]["figure1"]["n"] = [8000]
    with pytest.raises(
        grid.ConfigError, match=r"n=8000 but this source provides only 7473 rows \(.*gsm8k/train.jsonl\)"
    ):
        grid.check(config)


def test_hub_sizes_are_checked_when_prepared(monkeypatch, tmp_path):
    import datasets

    class Fake(list):
        cache_files = []

        def to_list(self):
            return list(self)

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Fake([STEP_ROW] * 3))
    cfg = {
        "prompt_template": GSM8K_PROMPT,
        "train": {"source": "hub", "path": "xinlai/Math-Step-DPO-10K", "split": "train", "format": "math_step_dpo"},
    }
    assert available_rows(cfg["train"]) is None
    with pytest.raises(
        ValueError,
        match=r"grid asks for n=5 but the training data has only 3 rows \(hub:xinlai/Math-Step-DPO-10K/train\)",
    ):
        prepare_role("math", cfg, tmp_path / "math", seed=0, max_n=5)


# ----------------------------------------------------------------------------- checksums


def test_manifest_and_checksum_table_hold_real_file_hashes(tmp_path):
    from d2lora.results.provenance_tables import dataset_checksum_table

    path = _shared("gsm8k/test.jsonl")
    prepare_role(
        "math",
        {"prompt_template": GSM8K_PROMPT, "eval": {"source": "local", "data_files": str(path), "format": "gsm8k"}},
        tmp_path / "math",
        seed=0,
    )
    table = dataset_checksum_table([tmp_path / "math" / "manifest.json"])
    hashes = dict(zip(table["file"].astype(str), table["sha256"]))
    assert hashes[str(path)] == sha256_file(path)
    assert hashes[next(f for f in hashes if f.endswith("eval.jsonl"))] == sha256_file(tmp_path / "math" / "eval.jsonl")


# ----------------------------------------------------------------------------- on-policy negatives

QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]


def test_find_negatives_keeps_first_wrong_sample_and_drops_always_right():
    script = {  # per round: question id -> generated text
        0: {"q0": "\\boxed{1}", "q1": "\\boxed{2}", "q2": "no idea", "q3": "\\boxed{6}"},
        1: {"q1": "\\boxed{2}", "q2": "so 3 + 1 = \\boxed{5}", "q3": "\\boxed{6}"},
        2: {"q1": "\\boxed{9}", "q3": "\\boxed{6}"},
    }
    calls = []

    def generate(prompts, seed):
        round_index = len(calls)
        calls.append((len(prompts), seed))
        pending = [q for q in QUESTIONS if any(p.startswith(q["question"]) for p in prompts)]
        assert all(p.endswith("within \\boxed{}.") for p in prompts)
        return [script[round_index][q["id"]] for q in pending]

    found, stats = onpolicy.find_negatives(QUESTIONS, generate, GSM8K_PROMPT, samples=3, seed=7)
    assert {QUESTIONS[i]["id"]: f["rejected_answer"] for i, f in found.items()} == {"q0": "1", "q2": "5", "q1": "9"}
    assert [f["round"] for _, f in sorted(found.items())] == [0, 2, 1]
    assert stats == {
        "questions": 4,
        "rounds": 3,
        "samples_drawn": 9,
        "correct_samples": 5,
        "unanswered_samples": 1,
        "pairs": 3,
        "dropped_no_wrong_sample": 1,
    }
    assert [s for _, s in calls] == [onpolicy.round_seed(7, r) for r in range(3)]


def test_sample_generate_is_seeded(tiny_model, tokenizer):
    settings = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "batch_size": 2}
    prompts = ["What is 2 + 2?", "Name a colour.", "Count to three."]
    first = onpolicy.sample_generate(tiny_model, tokenizer, prompts, settings, seed=3)
    assert first == onpolicy.sample_generate(tiny_model, tokenizer, prompts, settings, seed=3)
    assert first != onpolicy.sample_generate(tiny_model, tokenizer, prompts, settings, seed=4)


def test_onpolicy_rows_map_to_pairs(tmp_path):
    raw = {
        "id": "gsm8k-train-000001",
        "question": "Q?",
        "answer": "2 + 2 = <<2+2=4>>4\n#### 4",
        "reference_answer": "4",
        "rejected": "2 + 2 = 5, so \\boxed{5}",
        "rejected_answer": "5",
        "round": 0,
    }
    path = _write_jsonl(tmp_path / "negatives.jsonl", [raw])
    role = {"prompt_template": GSM8K_PROMPT, "train": onpolicy.as_local_source({}, path)}
    prepare_role("math", role, tmp_path / "math", seed=0, max_n=1)
    (pair,) = load_prepared(tmp_path / "math", "train")
    assert pair == {
        "id": "gsm8k-train-000001",
        "prompt": "Q? Please reason step by step, and put your final answer within \\boxed{}.",
        "chosen": "2 + 2 = 4\nThe answer is \\boxed{4}.",
        "rejected": raw["rejected"],
    }


def test_onpolicy_settings_validate_the_source():
    base = {"source": "local", "data_files": "x.jsonl", "format": "gsm8k"}
    assert onpolicy.onpolicy_settings({"source": "onpolicy", "from": base, "samples": 2})["samples"] == 2
    with pytest.raises(ValueError, match="format gsm8k"):
        onpolicy.onpolicy_settings({"source": "onpolicy", "from": {**base, "format": "arc"}})
    with pytest.raises(ValueError, match="sampled by the workflow"):
        load_raw({"source": "onpolicy", "from": base}, 0)


# ----------------------------------------------------------------------------- presets


def test_paper_preset_uses_the_papers_datasets_and_table2():
    config = _config("paper.yaml")
    data = config["datasets"]
    assert data["warmup"]["train"]["path"] == "mlabonne/orpo-dpo-mix-40k"
    assert data["math"]["train"] == {
        "source": "hub",
        "path": "xinlai/Math-Step-DPO-10K",
        "split": "train",
        "format": "math_step_dpo",
    }
    assert data["math"]["eval"]["path"] == "openai/gsm8k" and data["math"]["eval"]["name"] == "main"
    assert data["titles"]["train"]["path"] == data["titles"]["eval"]["path"] == "onurkeles/econ_paper_abstracts"
    assert data["titles"]["train"]["skip"] == data["titles"]["eval"]["limit"] == 100
    # The held-out 100 are a seeded random draw, not the file's first rows (both splits shuffled alike).
    assert data["titles"]["train"]["shuffle"] is data["titles"]["eval"]["shuffle"] is True
    assert data["forgetting"]["eval"]["name"] == "ARC-Easy"
    training = config["training"]
    assert (training["lora"]["rank"], training["lora"]["alpha"]) == (16, 16)
    assert (training["warmup"]["learning_rate"], training["warmup"]["epochs"]) == (1e-7, 1)
    assert (training["adapt"]["sft"]["learning_rate"], training["adapt"]["sft"]["epochs"]) == (1e-6, 3)
    for method in ("dpo", "orpo"):
        hp = training["adapt"][method]
        assert (hp["learning_rate"], hp["epochs"], hp["beta"]) == (1e-6, 4, 0.1)
    assert {hp["scheduler"] for hp in [training["warmup"], *training["adapt"].values()]} == {"cosine"}
    grid.check(config)


def test_mini_preset_has_the_papers_grid_shape_on_real_local_data():
    _shared("gsm8k/test.jsonl")
    mini, paper = _config("mini.yaml"), _config("paper.yaml")
    for name, experiment in paper["experiments"].items():
        shape = {k: v for k, v in experiment.items() if k != "n"}
        assert {k: v for k, v in mini["experiments"][name].items() if k != "n"} == shape
        mini_n = mini["experiments"][name]["n"]
        # One middle point may be cut for time (the header says which); n = 0 and the largest stay.
        assert len(experiment["n"]) - 1 <= len(mini_n) <= len(experiment["n"]), name
        assert (mini_n[0] == 0) == (experiment["n"][0] == 0) and mini_n == sorted(mini_n), name
    for role in ("warmup", "titles"):
        assert mini["datasets"][role]["train"]["data_files"].startswith("../shared/data/"), role
    assert mini["datasets"]["math"]["eval"]["data_files"].startswith("../shared/data/")
    # Relative paths resolve against the repository root, where Snakemake runs.
    import os

    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        assert available_rows(mini["datasets"]["math"]["eval"]) == 1319
        assert available_rows(mini["datasets"]["forgetting"]["eval"]) == 2376
        assert available_rows(mini["datasets"]["math"]["train"]["from"]) == 1500
        # Table 1's last point is every titles training row, as the paper's 6,970 is.
        assert mini["experiments"]["table1"]["n"][-1] == available_rows(mini["datasets"]["titles"]["train"]) == 4360
        grid.check(copy.deepcopy(mini))
    finally:
        os.chdir(cwd)


def test_sample_negatives_writes_pairs_and_manifest(tiny_model_dir, tmp_path, monkeypatch):
    rows = [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
        for i in range(1, 4)
    ]
    (tmp_path / "gsm8k").mkdir()
    source = _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    # Sampling itself is tested above. Round 0: q2 wrong, q1 and q3 right; round 1: q1 wrong, q3 right again.
    answers = iter([["\\boxed{2}", "\\boxed{5}", "\\boxed{6}"], ["\\boxed{3}", "\\boxed{6}"]])
    monkeypatch.setattr(
        onpolicy, "sample_generate", lambda model, tok, prompts, settings, seed: next(answers)[: len(prompts)]
    )
    cfg = {
        "source": "onpolicy",
        "from": {"source": "local", "data_files": str(source), "format": "gsm8k"},
        "samples": 2,
    }
    manifest = onpolicy.sample_negatives(
        cfg,
        tiny_model_dir,
        tmp_path / "out" / "negatives.jsonl",
        tmp_path / "out" / "manifest.json",
        GSM8K_PROMPT,
        seed=0,
        device="cpu",
    )
    written = [json.loads(line) for line in (tmp_path / "out" / "negatives.jsonl").read_text().splitlines()]
    assert [(r["id"], r["rejected_answer"], r["round"]) for r in written] == [
        ("gsm8k-train-000000", "3", 1),
        ("gsm8k-train-000001", "5", 0),
    ]
    assert manifest["stats"]["pairs"] == 2 and manifest["stats"]["dropped_no_wrong_sample"] == 1
    assert manifest["source_files"][0]["sha256"] == sha256_file(source)
    assert manifest["output"]["sha256"] == sha256_file(tmp_path / "out" / "negatives.jsonl")
