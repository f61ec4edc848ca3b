"""benchmarks/compare_runs.py: two runs' shared cells tested against each other, what differs named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare_runs import main  # noqa: E402


def write_run(root: Path, cells: dict[tuple, list[bool]], config: dict | None = None) -> Path:
    """A results folder: {(method, init, n, seed): per-example correctness} of GSM8K on math."""
    for (method, init, n, seed), correct in cells.items():
        folder = root / "eval" / "gsm8k" / "math" / method / init / f"n{n}" / f"s{seed}"
        folder.mkdir(parents=True)
        rows = [{"id": f"q{i}", "correct": value} for i, value in enumerate(correct)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if config is not None:
        (root / "provenance").mkdir()
        (root / "provenance" / "config_used.yaml").write_text(yaml.safe_dump(config))
    return root


CONFIG = {"training": {"adapt": {"dpo": {"group_by_length": False, "learning_rate": 1e-5}}}, "seed": 0}


def test_the_same_answers_are_the_same_within_noise_and_the_config_difference_is_named(tmp_path):
    answers = [i % 3 == 0 for i in range(60)]
    grouped = {**CONFIG, "training": {"adapt": {"dpo": {"group_by_length": True, "learning_rate": 1e-5}}}}
    plain = write_run(
        tmp_path / "plain", {("dpo", "d2lora", 100, 0): answers, ("orpo", "lora", 100, 0): answers}, CONFIG
    )
    lever = write_run(
        tmp_path / "grouped",
        {("dpo", "d2lora", 100, 0): answers, ("sft", "lora", 100, 0): answers},
        grouped,
    )
    result = main([str(plain), str(lever), "--names", "plain,grouped", "--out", str(tmp_path / "out" / "cmp")])
    assert result["verdict"] == "same within noise" and result["cells_compared"] == 1
    assert result["only_in"] == {
        "plain": ["gsm8k/math/orpo/lora/n100 (gsm8k_accuracy)"],
        "grouped": ["gsm8k/math/sft/lora/n100 (gsm8k_accuracy)"],
    }
    assert result["config_difference"] == {"training.adapt.dpo.group_by_length": [False, True]}
    written = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert written["verdict"] == "same within noise" and written["largest_difference"]["diff"] == 0.0
    report = (tmp_path / "out" / "cmp.md").read_text()
    assert "grouped against plain: same within noise" in report and "group_by_length" in report
    assert (tmp_path / "out" / "cmp.csv").is_file() and "| d2lora@plain | d2lora@grouped |" in report


def test_a_lever_that_changes_answers_is_found_different(tmp_path):
    plain = write_run(tmp_path / "plain", {("dpo", "d2lora", 100, 0): [True] * 50 + [False] * 50})
    lever = write_run(tmp_path / "lever", {("dpo", "d2lora", 100, 0): [True] * 20 + [False] * 80})
    result = main([str(plain), str(lever), "--out", str(tmp_path / "cmp")])
    assert result["verdict"] == "different" and result["significant"] == 1
    row = result["table"].iloc[0]
    assert (row["only_a"], row["only_b"], row["test"]) == (30, 0, "mcnemar")
    assert result["largest_difference"]["diff"] == pytest.approx(-30.0)
    assert result["config_difference"] is None
    assert "config difference: unknown" in (tmp_path / "cmp.md").read_text()


def test_runs_without_a_shared_cell_or_matching_examples_are_refused(tmp_path, capsys):
    plain = write_run(tmp_path / "plain", {("dpo", "d2lora", 100, 0): [True, False]})
    other = write_run(tmp_path / "other", {("orpo", "d2lora", 100, 0): [True, False]})
    with pytest.raises(SystemExit):
        main([str(plain), str(other), "--out", str(tmp_path / "cmp")])
    assert "share no evaluated cell" in capsys.readouterr().err
    fewer = write_run(tmp_path / "fewer", {("dpo", "d2lora", 100, 0): [True]})
    with pytest.raises(SystemExit):
        main([str(plain), str(fewer), "--out", str(tmp_path / "cmp")])
    assert "misaligned example ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(plain), str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main([str(plain), str(empty), "--out", str(tmp_path / "cmp")])
    assert "no eval/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(plain), str(plain), "--names", "same,same", "--out", str(tmp_path / "cmp")])
    assert not (tmp_path / "cmp.md").exists()
