"""benchmarks/preference_padding.py: a preference cell's padded positions, random against length-grouped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from preference_padding import cell_rows, main  # noqa: E402


def test_a_cell_past_the_prepared_pairs_draws_them_again_seeded():
    pairs = [{"id": f"p{i}", "prompt": str(i)} for i in range(5)]
    assert cell_rows(pairs, 3, 0) == (pairs[:3], False)
    drawn, was_drawn = cell_rows(pairs, 12, 0)
    assert was_drawn and len(drawn) == 12 and len({r["id"] for r in drawn}) == 12
    assert {r["prompt"] for r in drawn} <= {p["prompt"] for p in pairs}
    assert drawn == cell_rows(pairs, 12, 0)[0] and drawn != cell_rows(pairs, 12, 1)[0]


def test_bad_arguments_are_refused():
    for bad in (["--methods", "sft"], ["--n", "ten"], ["--n", "0"]):
        with pytest.raises(SystemExit):
            main(bad)


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared" / "data").is_dir(), reason="needs ../shared/data"
)
def test_grouped_pairs_compute_fewer_positions_for_the_same_real_tokens():
    """The paper shape's DPO pairs through the pipeline's trainer: grouping leaves every epoch's
    pairs (the same real tokens) and pads less, the more so in a cell large enough for mega-batches."""
    result = main(["--methods", "dpo", "--n", "100,400"])
    small, large = result["methods"]["dpo"]
    assert result["prepared_pairs"] < 400 and large["drawn_with_replacement"] and not small["drawn_with_replacement"]
    for cell in (small, large):
        random_order, grouped = cell["random"], cell["length_grouped"]
        assert random_order["real_tokens"] == grouped["real_tokens"] > 0
        assert (
            random_order["micro_batches"] == grouped["micro_batches"] == cell["epochs"] * -(-cell["n"] // 8)
        )  # the last one short
        assert grouped["computed_tokens"] < random_order["computed_tokens"]
    assert large["computed_random_over_grouped"] > small["computed_random_over_grouped"] > 1
