"""benchmarks/decode_attention.py: one layer's decoding attention by kernel, run here on the CPU at a
tiny shape (the timing that matters happens on a GPU: benchmarks/device/README.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import decode_attention  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
TINY = ["--rows", "5", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--device", "cpu"]
TINY += ["--warmup", "1", "--repeats", "1"]


def test_every_exact_variant_equals_the_float32_reference(tmp_path):
    summary = decode_attention.main([*TINY, "--width", "150", "--new-tokens", "40", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    cache = 150 + 40
    assert summary["shape"]["cache"] == cache
    assert list(summary["points"]) == ["first_step", "middle", "last_step"]
    for point in summary["points"].values():
        ran = {name: result for name, result in point.items() if name != "filled" and "error" not in result}
        # the CPU has no fused SDPA kernels to force (packed_efficient) and no flash kernel
        assert {
            "sdpa_gqa",
            "packed",
            "packed_filled_128",
            "flex",
            "flex_pipeline",
            "packed_without_cudnn",
            "packed_without_cudnn_compiled",
        } <= set(ran)
        for name, result in ran.items():
            assert result["max_abs_difference"] < 1e-5, (name, result)
            assert result["bitwise_repeatable"], (name, result)
        window = min(cache, math.ceil(point["filled"] / decode_attention.WINDOW) * decode_attention.WINDOW)
        assert ran["packed"]["cache_positions_read"] == cache
        assert ran["packed_filled_128"]["cache_positions_read"] == window
    # 151 filled positions round up to 256, past the 190-long cache: the window is the whole cache
    assert summary["points"]["first_step"]["packed_filled_128"]["cache_positions_read"] == cache


def test_a_wrong_mask_would_be_seen():
    """The reference check has teeth: attending to one padded position changes the output."""
    pads = torch.tensor([3, 0])
    query, key, value = decode_attention.make_inputs(2, 4, 2, 8, 10, "cpu", torch.float32, seed=0)
    mask = decode_attention.padding_mask(pads, filled=8, cache=10, device="cpu")
    assert mask[0, 0, 0].tolist() == [False] * 3 + [True] * 5 + [False] * 2
    leaky = mask.clone()
    leaky[0, 0, 0, 2] = True
    difference = decode_attention.reference(query, key, value, mask) - decode_attention.reference(
        query, key, value, leaky
    )
    assert difference.abs().max() > 1e-3


@pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data")
def test_real_prompt_lengths_set_the_width(tmp_path):
    lengths = decode_attention.real_prompt_lengths(REPO / "config" / "paper_shape.yaml", DATA)
    assert len(lengths) == 1319 and min(lengths) > 0
    summary = decode_attention.main([*TINY, "--data", str(DATA), "--new-tokens", "4", "--out", str(tmp_path)])
    assert summary["shape"]["prompt_width"] == max(lengths)
    assert 0 < summary["padding"]["mean_pad"] < max(lengths)


def test_repeat_drift_sees_a_call_that_varies():
    steady = torch.ones(3)
    assert decode_attention.repeat_drift(lambda: steady, 4) == 0.0
    generator = torch.Generator().manual_seed(0)
    assert decode_attention.repeat_drift(lambda: torch.rand(3, generator=generator), 4) > 0.0


def test_the_kernels_without_cudnn_are_the_evaluators():
    from d2lora.evaluation.packed_gqa import WITHOUT_CUDNN

    assert decode_attention.without_cudnn() == WITHOUT_CUDNN
