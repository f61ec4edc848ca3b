"""benchmarks/greedy_margins.py: how close greedy decoding's choices are to ties, in bf16 ulps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import greedy_margins  # noqa: E402


def test_bf16_ulp_is_the_spacing_of_bf16_numbers():
    for value in (1.0, 3.0, -17.5, 0.0078125, 250.0):
        assert float(torch.tensor(value, dtype=torch.bfloat16)) == value  # each is a bf16 number
        ulp = greedy_margins.bf16_ulp(value)
        up = abs(value)
        # one ulp up is the next bf16 number; a quarter of one rounds back
        assert float(torch.tensor(up + ulp, dtype=torch.bfloat16)) == up + ulp
        assert float(torch.tensor(up + ulp / 4, dtype=torch.bfloat16)) == up
    assert greedy_margins.bf16_ulp(1.0) == 2.0**-7
    assert greedy_margins.bf16_ulp(-2.5) == 2.0**-6


def test_margins_are_top_two_gaps_in_ulps_of_the_largest():
    logits = torch.tensor([[1.0, 3.0, 2.5, -4.0], [10.0, 10.0, 0.0, 1.0]])
    # row 0: 3.0 - 2.5 = 0.5, ulp at 3.0 is 2^-6; row 1: an exact tie
    assert greedy_margins.top2_margins_in_ulps(logits) == [0.5 / 2.0**-6, 0.0]


def test_margin_summary_counts_steps_and_rows_below_each_threshold():
    summary = greedy_margins.margin_summary([[0.5, 10.0, 20.0], [30.0, 3.0], [50.0]])
    assert summary["rows"] == 3 and summary["steps"] == 6
    assert summary["share_of_steps_below_1_ulp"] == pytest.approx(1 / 6)
    assert summary["share_of_rows_with_a_step_below_1_ulp"] == pytest.approx(1 / 3)
    assert summary["share_of_steps_below_4_ulp"] == pytest.approx(2 / 6)
    assert summary["share_of_rows_with_a_step_below_4_ulp"] == pytest.approx(2 / 3)
    assert summary["median_margin_ulps"] == 20.0
    with pytest.raises(ValueError, match="no decoding steps"):
        greedy_margins.margin_summary([[]])


def test_a_tiny_model_is_measured_end_to_end(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"#### {2 * i + 1}"} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    summary = greedy_margins.main(
        ["--config", str(REPO / "config" / "tiny.yaml"), "--data", str(data), "--rows", "3", "--new-tokens", "5"]
        + ["--batch-size", "2", "--out", str(out)]
    )
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["models"]) == {"configured", "random_init"}
    for measured in summary["models"].values():
        margins = measured["float32_margins"]
        # each row's steps run to its first stop token or the 5-token limit: 1 to 5 a row
        assert margins["rows"] == 3 and 3 <= margins["steps"] <= 15
        assert margins["median_margin_ulps"] >= 0
        assert measured["bf16_one_row_against_batched"]["rows"] == 3


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        greedy_margins.main(["--rows", "0"])
    with pytest.raises(SystemExit):
        greedy_margins.main(["--data", str(tmp_path / "missing.jsonl")])
