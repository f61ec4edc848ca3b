"""benchmarks/batch_padding.py: the share of a padded micro-batch that is real tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from batch_padding import main, non_padding_share  # noqa: E402


def test_non_padding_share_counts_each_batch_padded_to_its_longest_row():
    # One batch of 2: rows of 1 and 3 tokens are padded to 3 each: 4 real of 6.
    assert non_padding_share([1, 3], rows=2, seed=0) == pytest.approx(4 / 6)
    # Batches of 1 carry no padding, whatever the order.
    assert non_padding_share([5, 1, 9, 2], rows=1, seed=3) == 1.0
    # Equal rows: none either; a short last batch is padded to its own longest only.
    assert non_padding_share([4, 4, 4], rows=2, seed=1) == 1.0


def test_the_shuffle_is_seeded():
    lengths = list(range(1, 50))
    assert non_padding_share(lengths, 8, seed=7) == non_padding_share(lengths, 8, seed=7)
    assert non_padding_share(lengths, 8, seed=7) != non_padding_share(lengths, 8, seed=8)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        main(["--rows", "0"])


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared" / "data").is_dir(), reason="needs ../shared/data"
)
def test_the_paper_shape_roles_are_counted(capsys):
    result = main(["--shuffles", "2"])
    assert set(result["roles"]) == {"warmup:chosen", "math:chosen", "math:rejected", "titles:chosen"}
    for role, counted in result["roles"].items():
        assert counted["rows"] > 0 and counted["max_tokens"] >= counted["mean_tokens"] > 0, role
        assert len(counted["non_padding_share"]) == 2
        # Rows of unequal length: every micro-batch of 8 of them carries some padding.
        assert all(0 < share < 1 for share in counted["non_padding_share"]), role
    assert '"math:chosen"' in capsys.readouterr().out
