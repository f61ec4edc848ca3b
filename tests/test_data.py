"""Data preparation: synthetic generators, source loading, format mappings, role folders."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from d2lora.data import formats, schema, sources, synthetic
from d2lora.data.formats import to_canonical
from d2lora.data.prepare import load_prepared, prepare_role, subset
from d2lora.data.schema import validate_rows
from d2lora.data.sources import load_raw
from d2lora.data.synthetic import generate
from d2lora.io import DataFileError, read_json, read_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_PROMPT = r"{question} Please reason step by step, and put your final answer within \boxed{}."
TITLES_PROMPT = "Write a title for this economics abstract.\n\n{abstract}"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

KEY_FIELD = {kind: key for kind, (_, key) in synthetic.GENERATORS.items()}
# kind → (format it implies, forms it maps to)
KIND_FORMS = {
    "math": ("synthetic_math", ("pairs", "math_eval")),
    "arithmetic": ("synthetic_math", ("pairs", "math_eval")),
    "titles": ("synthetic_titles", ("pairs", "generation_eval")),
    "science_mc": ("arc", ("multiple_choice",)),
    "general": ("synthetic_general", ("pairs",)),
}
TEMPLATES = {"synthetic_math": GSM8K_PROMPT, "synthetic_titles": TITLES_PROMPT}


def _synthetic(kind: str, rows: int, split: str = "train") -> dict:
    return {"source": "synthetic", "kind": kind, "rows": rows, "split": split}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_generate_is_deterministic_and_seeded(kind):
    first = json.dumps(generate(kind, 200, 7, "train"))
    assert first == json.dumps(generate(kind, 200, 7, "train"))
    assert first != json.dumps(generate(kind, 200, 8, "train"))
    assert first != json.dumps(generate(kind, 200, 7, "eval"))


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_generate_splits_are_disjoint_and_unique(kind):
    key = KEY_FIELD[kind]
    train = [r[key] for r in generate(kind, 500, 0, "train")]
    evals = [r[key] for seed in (0, 1) for r in generate(kind, 150, seed, "eval")]
    assert len(set(train)) == len(train)
    assert len(set(evals[:150])) == 150
    # Disjoint by construction: even another seed's eval split shares nothing with train.
    assert not set(train) & set(evals)


@pytest.mark.parametrize(
    "kind, rows", [("math", 2000), ("arithmetic", 1000), ("titles", 2000), ("science_mc", 500), ("general", 500)]
)
def test_generate_capacity_and_speed(kind, rows):
    start = time.perf_counter()
    out = generate(kind, rows, 0, "train")
    assert time.perf_counter() - start < 1.0
    assert len({r[KEY_FIELD[kind]] for r in out}) == rows


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="known kinds"):
        generate("poetry", 3, 0, "train")
    with pytest.raises(ValueError, match="split"):
        generate("math", 3, 0, "test")
    assert generate("math", 0, 0, "train") == []


def test_math_rejected_solution_has_a_wrong_answer():
    for row in generate("math", 300, 0, "train"):
        assert row["wrong_answer"] != row["answer"]
        assert 2 <= len(row["solution_steps"]) <= 4
        assert len(row["wrong_steps"]) == len(row["solution_steps"])
        assert re.search(r"= (\d+)", row["solution_steps"][-1]).group(1) == row["answer"]
        assert re.search(r"= (\d+)", row["wrong_steps"][-1]).group(1) == row["wrong_answer"]
        assert sum(a != b for a, b in zip(row["solution_steps"], row["wrong_steps"])) >= 1
    pairs = to_canonical(generate("math", 50, 0, "train"), "synthetic_math", "pairs", GSM8K_PROMPT, "m")
    for pair in pairs:
        chosen = re.search(r"\\boxed\{(.+?)\}", pair["chosen"]).group(1)
        rejected = re.search(r"\\boxed\{(.+?)\}", pair["rejected"]).group(1)
        assert chosen != rejected
        assert pair["prompt"].endswith(r"within \boxed{}.")


def test_arithmetic_levels_are_graded_and_solutions_correct():
    # Level 1 holds 243 distinct questions (a fifth of them eval), so 300 rows keep the levels even.
    rows = generate("arithmetic", 300, 0, "train")
    by_level = {level: [r for r in rows if r["level"] == level] for level in (1, 2, 3)}
    # Every level is drawn about equally often, and each has its number of steps.
    assert all(70 <= len(group) <= 130 for group in by_level.values()), {k: len(v) for k, v in by_level.items()}
    assert {len(r["solution_steps"]) for r in by_level[1] + by_level[2]} == {1}
    assert {len(r["solution_steps"]) for r in by_level[3]} == {2}
    assert all(r["question"].startswith("What is ") for r in by_level[1])
    assert max(int(n) for r in by_level[1] for n in re.findall(r"\d+", r["solution_steps"][0])[1:3]) <= 18
    for row in rows:
        a, op, b, result = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", row["solution_steps"][-1]).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
        assert result == row["answer"] and int(row["answer"]) > 0
        assert row["wrong_answer"] != row["answer"]
    # Small numbers are the point: the largest answer is 20 + 20 or 9 * 9.
    assert max(int(r["answer"]) for r in rows) <= 81
    assert {op for r in rows for op in re.findall(r" ([-+*]) ", r["solution_steps"][0])} == {"+", "-", "*"}


def test_science_answer_position_varies():
    keys = {r["answerKey"] for r in generate("science_mc", 200, 0, "train")}
    assert keys == {"A", "B", "C", "D"}


def test_number_words():
    assert synthetic.general.number_words(0) == "zero"
    assert synthetic.general.number_words(45) == "forty-five"
    assert synthetic.general.number_words(5045) == "five thousand forty-five"
    assert synthetic.general.number_words(9999) == "nine thousand nine hundred ninety-nine"


# ----------------------------------------------------------------------------- mappings


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_every_synthetic_kind_maps_to_a_valid_form(kind):
    fmt, forms = KIND_FORMS[kind]
    assert sources.source_format(_synthetic(kind, 1)) == fmt
    for split in ("train", "eval"):
        raw = generate(kind, 40, 0, split)
        for form in forms:
            rows = to_canonical(raw, fmt, form, TEMPLATES.get(fmt), f"syn-{kind}")
            assert len(rows) == 40
            assert all(set(r) == set(schema.FORM_FIELDS[form]) for r in rows)
            assert rows[3]["id"] == f"syn-{kind}-000003"


def test_titles_prompt_holds_abstract_and_no_rejected():
    raw = generate("titles", 5, 0, "train")
    pairs = to_canonical(raw, "synthetic_titles", "pairs", TITLES_PROMPT, "t")
    assert pairs[0]["prompt"] == TITLES_PROMPT.replace("{abstract}", raw[0]["abstract"])
    assert pairs[0]["chosen"] == raw[0]["title"] and pairs[0]["rejected"] is None
    evals = to_canonical(raw, "synthetic_titles", "generation_eval", TITLES_PROMPT, "t")
    assert evals[0]["reference"] == raw[0]["title"]


def test_prompt_template_without_placeholder_errors():
    with pytest.raises(ValueError, match=r"\{question\}"):
        to_canonical(generate("math", 2, 0, "train"), "synthetic_math", "pairs", "Solve it.", "m")


def test_gsm8k_mapping_strips_annotations_and_commas():
    raw = [{"question": "How much?", "answer": "He pays 2*600=<<2*600=1200>>1,200.\n#### 1,200"}]
    (evaluation,) = to_canonical(raw, "gsm8k", "math_eval", None, "g")
    assert evaluation == {"id": "g-000000", "question": "How much?", "answer": "1200"}
    (pair,) = to_canonical(raw, "gsm8k", "pairs", GSM8K_PROMPT, "g")
    assert pair["chosen"] == "He pays 2*600=1,200.\nThe answer is \\boxed{1200}."
    assert pair["rejected"] is None
    assert pair["prompt"] == "How much? Please reason step by step, and put your final answer within \\boxed{}."


def test_gsm8k_without_final_line_names_row():
    raw = [{"question": "q", "answer": "1 #### 2"}, {"question": "q2", "answer": "no final line"}]
    with pytest.raises(DataFileError, match=r"gsm\.jsonl: row 2: .*####"):
        to_canonical(raw, "gsm8k", "math_eval", None, "g", origin="gsm.jsonl")


def test_arc_numeric_labels_map_through_labels():
    raw = [
        {
            "id": "q1",
            "question": "Which?",
            "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
            "answerKey": "3",
        }
    ]
    (row,) = to_canonical(raw, "arc", "multiple_choice", None, "arc")
    assert row["answer_index"] == 2 and row["labels"] == ["1", "2", "3", "4"] and row["id"] == "q1"
    raw[0]["answerKey"] = "E"
    with pytest.raises(DataFileError, match="row 1: answerKey 'E'"):
        to_canonical(raw, "arc", "multiple_choice", None, "arc")


def test_canonical_format_keeps_form_fields_only():
    raw = [{"id": "a", "question": "q", "answer": "3", "extra": 1}, {"question": "r", "answer": "4"}]
    rows = to_canonical(raw, "canonical", "math_eval", None, "c")
    assert rows == [{"id": "a", "question": "q", "answer": "3"}, {"id": "c-000001", "question": "r", "answer": "4"}]


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError, match="unknown format 'nope'.*gsm8k"):
        to_canonical([], "nope", "pairs", None, "x")
    with pytest.raises(ValueError, match="cannot produce form 'pairs'"):
        to_canonical([], "arc", "pairs", None, "x")


def test_register_format_extends_the_registry():
    name = "test_only_qa"

    @formats.register_format(name, "math_eval")
    def _qa(row, index, ctx):
        return {"id": formats.row_id(row, index, ctx), "question": row["q"], "answer": row["a"]}

    try:
        assert to_canonical([{"q": "1+1?", "a": "2"}], name, "math_eval", None, "qa")[0]["answer"] == "2"
    finally:
        formats.FORMATS.pop(name)


# ----------------------------------------------------------------------------- validation and file errors


def test_validate_rows_names_file_row_and_field():
    rows = [{"id": "1", "prompt": "p", "chosen": "c", "rejected": None}, {"id": "2", "prompt": "p", "rejected": "r"}]
    with pytest.raises(DataFileError, match=r"train\.jsonl: row 2: missing field 'chosen'"):
        validate_rows(rows, "pairs", "train.jsonl")
    rows[1]["chosen"] = 5
    with pytest.raises(DataFileError, match=r"row 2: field 'chosen' must be a string"):
        validate_rows(rows, "pairs", "train.jsonl")


def test_validate_multiple_choice_and_duplicate_ids():
    good = {"id": "1", "question": "q", "choices": ["a", "b"], "labels": ["A", "B"], "answer_index": 1}
    validate_rows([good], "multiple_choice", "f")
    with pytest.raises(DataFileError, match="row 1: field 'answer_index' = 2"):
        validate_rows([{**good, "answer_index": 2}], "multiple_choice", "f")
    with pytest.raises(DataFileError, match="row 1: field 'labels' has 1 entries"):
        validate_rows([{**good, "labels": ["A"]}], "multiple_choice", "f")
    with pytest.raises(DataFileError, match="row 2: duplicate id '1' \\(first at row 1\\)"):
        validate_rows([good, good], "multiple_choice", "f")


def test_local_missing_field_names_file_and_row(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    raw, files = load_raw({"source": "local", "data_files": str(path), "format": "gsm8k"}, 0)
    assert files == [str(path)]
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}: row 2: missing field 'answer'"):
        to_canonical(raw, "gsm8k", "math_eval", None, "gsm", origin=str(path))


def test_local_empty_file_errors(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}: file is empty"):
        load_raw({"source": "local", "data_files": str(path), "format": "gsm8k"}, 0)
    with pytest.raises(DataFileError, match="does not exist"):
        load_raw({"source": "local", "data_files": str(tmp_path / "absent.jsonl"), "format": "gsm8k"}, 0)


def test_local_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}:2: malformed JSON"):
        load_raw({"source": "local", "data_files": str(path), "format": "gsm8k"}, 0)


def test_local_csv_goes_through_datasets(tmp_path):
    path = tmp_path / "gsm.csv"
    path.write_text('question,answer\n"How many?","3+4=<<3+4=7>>7\n#### 7"\n"And now?","#### 1,000"\n')
    raw, files = load_raw({"source": "local", "data_files": [str(path)], "format": "gsm8k", "limit": 1}, 0)
    assert len(raw) == 1 and files == [str(path)]
    assert to_canonical(raw, "gsm8k", "math_eval", None, "csv")[0]["answer"] == "7"


def test_hub_source_calls_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 5"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = {
        "source": "hub",
        "path": "openai/gsm8k",
        "name": "main",
        "split": "test",
        "revision": "abc",
        "format": "gsm8k",
    }
    raw, files = load_raw(cfg, 0)
    assert calls == [("openai/gsm8k", "main", {"split": "test", "revision": "abc"})]
    assert raw == [{"question": "q", "answer": "#### 5"}] and files == []
    assert sources.source_name(cfg) == "openai__gsm8k-main-test"


def test_unknown_source_errors():
    with pytest.raises(ValueError, match="unknown source 'ftp'"):
        load_raw({"source": "ftp"}, 0)


# ----------------------------------------------------------------------------- prepare


def _math_cfg(rows: int = 40) -> dict:
    return {"train": _synthetic("math", rows), "eval": _synthetic("math", 10, "eval"), "prompt_template": GSM8K_PROMPT}


def test_prepare_writes_folder_and_manifest(tmp_path):
    out = tmp_path / "data" / "math"
    manifest = prepare_role("math", _math_cfg(), out, seed=0, max_n=16)
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]
    assert read_json(out / "manifest.json") == manifest
    assert manifest["counts"] == {"train": 40, "eval": 10}
    assert manifest["forms"] == {"train": "pairs", "eval": "math_eval"}
    assert manifest["sources"]["train"]["generator"]["kind"] == "math"
    assert set(manifest["files"]) == {"train.jsonl", "eval.jsonl"}
    assert len(load_prepared(out, "train")) == 40
    # eval keeps source order; train is shuffled once.
    assert [r["id"] for r in load_prepared(out, "eval")] == [f"synthetic-math-eval-{i:06d}" for i in range(10)]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_subsets_are_nested_and_fixed_by_seed(tmp_path):
    prepare_role("math", _math_cfg(), tmp_path / "a", seed=3)
    prepare_role("math", _math_cfg(), tmp_path / "b", seed=3)
    prepare_role("math", _math_cfg(), tmp_path / "c", seed=4)
    rows_a, rows_b = load_prepared(tmp_path / "a", "train"), load_prepared(tmp_path / "b", "train")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    small, large = {r["id"] for r in subset(rows_a, 8)}, {r["id"] for r in subset(rows_a, 16)}
    assert len(small) == 8 and small < large
    assert subset(rows_b, 8) == subset(rows_a, 8)
    assert subset(load_prepared(tmp_path / "c", "train"), 8) != subset(rows_a, 8)
    assert subset(rows_a, 0) == []


def test_subset_larger_than_data_errors():
    with pytest.raises(ValueError, match="n=5 .* only 4"):
        subset([{}] * 4, 5)


def test_prepare_max_n_larger_than_data_errors(tmp_path):
    with pytest.raises(ValueError, match=r"role math: the grid asks for n=64 but the training data has only 40 rows"):
        prepare_role("math", _math_cfg(40), tmp_path / "math", seed=0, max_n=64)
    assert not (tmp_path / "math").exists()


def test_prepare_failure_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [{"id": "x", "prompt": "p", "chosen": "c", "rejected": None}] * 2)
    cfg = {"train": {"source": "local", "data_files": str(bad), "format": "canonical"}}
    with pytest.raises(DataFileError, match="duplicate id 'x'"):
        prepare_role("warmup", cfg, tmp_path / "out", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_prepare_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "titles"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    cfg = {"train": _synthetic("titles", 20), "eval": _synthetic("titles", 5, "eval"), "prompt_template": TITLES_PROMPT}
    prepare_role("titles", cfg, out, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]
    assert load_prepared(out, "eval")[0]["prompt"].startswith("Write a title")
    assert [p.name for p in tmp_path.iterdir()] == ["titles"]


def test_prepare_rejects_bad_role_configs(tmp_path):
    with pytest.raises(ValueError, match="unknown role"):
        prepare_role("poetry", {"train": _synthetic("general", 5)}, tmp_path / "x", seed=0)
    with pytest.raises(ValueError, match="unexpected key"):
        prepare_role("forgetting", {"train": _synthetic("science_mc", 5)}, tmp_path / "x", seed=0)
    with pytest.raises(ValueError, match="no source configured"):
        prepare_role("warmup", {}, tmp_path / "x", seed=0)


def test_prepare_warmup_and_forgetting_from_synthetic(tmp_path):
    prepare_role("warmup", {"train": _synthetic("general", 30)}, tmp_path / "warmup", seed=0, max_n=30)
    assert all(r["rejected"] for r in load_prepared(tmp_path / "warmup", "train"))
    prepare_role("forgetting", {"eval": _synthetic("science_mc", 30, "eval")}, tmp_path / "forgetting", seed=0)
    assert len(load_prepared(tmp_path / "forgetting", "eval")) == 30
    assert not (tmp_path / "forgetting" / "train.jsonl").exists()


# ----------------------------------------------------------------------------- real data


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data not available: {path} is absent (see shared/data/README.md)")
    return path


def test_real_gsm8k_test_loads_as_math_eval(tmp_path):
    path = _shared("gsm8k/test.jsonl")
    cfg = {
        "eval": {"source": "local", "data_files": str(path), "format": "gsm8k"},
        "train": {"source": "local", "data_files": str(_shared("gsm8k/train.jsonl")), "format": "gsm8k"},
        "prompt_template": GSM8K_PROMPT,
    }
    manifest = prepare_role("math", cfg, tmp_path / "math", seed=0, max_n=4000)
    rows = load_prepared(tmp_path / "math", "eval")
    assert len(rows) == 1319 and manifest["counts"] == {"train": 7473, "eval": 1319}
    assert all(NUMBER.fullmatch(r["answer"]) for r in rows)
    assert rows[0]["answer"] == "18"
    assert manifest["sources"]["eval"]["files"][0]["sha256"].startswith("3730d312")
    assert all(
        "<<" not in r["chosen"] and r["chosen"].endswith("}.") for r in load_prepared(tmp_path / "math", "train")
    )


def test_real_arc_easy_test_loads_as_multiple_choice(tmp_path):
    path = _shared("arc_easy/test.jsonl")
    prepare_role(
        "forgetting",
        {"eval": {"source": "local", "data_files": str(path), "format": "arc"}},
        tmp_path / "forgetting",
        seed=0,
    )
    rows = load_prepared(tmp_path / "forgetting", "eval")
    assert len(rows) == 2376
    assert {len(r["choices"]) for r in rows} <= {3, 4, 5}
    assert rows[0]["id"] == "Mercury_417466" and rows[0]["answer_index"] == 0
    assert len(read_jsonl(tmp_path / "forgetting" / "eval.jsonl")) == 2376
