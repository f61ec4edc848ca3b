"""benchmarks/lora_branch_ops.py: the operator calls a LoRA projection adds to a training step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lora_branch_ops  # noqa: E402


def test_each_variant_removes_the_calls_it_is_named_for():
    results = lora_branch_ops.main(["--variants", "table2,uncast_inputs,dropout0,bf16_adapters,fused_add"])
    table2, uncast, dropout0, bf16, fused = (results[name]["calls_added_per_projection"] for name in results)
    assert results["table2"]["projections"] == 2 * 7  # q, k, v, o, gate, up, down in 2 layers
    assert table2["mm/weight"] >= 4, "a branch is two thin matmuls forward and more backward"
    # peft's input cast to the float32 adapter and autocast's copy back: full activation copies
    assert table2["copy_/activation"] - uncast.get("copy_/activation", 0) >= 2
    # the dropout mask: drawn only with dropout
    assert table2["bernoulli_/activation"] >= 1 and "bernoulli_/activation" not in dropout0
    # float32 adapters under autocast cast A and B to bf16 forward and their gradients back
    assert uncast["copy_/weight"] >= 4 and "copy_/weight" not in bf16
    assert results["bf16_adapters"]["total"] < results["uncast_inputs"]["total"] < results["table2"]["total"]
    # the B matmul adding into the output: one addmm for peft's matmul, multiply by 1.0 and add forward,
    # and no multiply by the scaling backward
    assert fused["addmm/weight"] == 1 and uncast["mm/weight"] - fused["mm/weight"] == 1
    assert uncast["mul/activation"] - fused["mul/activation"] == 2
    assert uncast["add/activation"] - fused["add/activation"] == 1
    assert results["fused_add"]["total"] <= results["uncast_inputs"]["total"] - 3


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        lora_branch_ops.main(["--variants", "table2,fused"])
