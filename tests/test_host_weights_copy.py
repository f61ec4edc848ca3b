"""benchmarks/host_weights_copy.py: a checkpoint's way to the card, from its files or from host memory;
run here on the CPU at a tiny size (only the host reads run without CUDA)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import host_weights_copy  # noqa: E402


def test_a_tiny_checkpoint_is_written_in_whole_layers_and_read_back(tmp_path):
    summary = host_weights_copy.main(
        [
            "--gb",
            "0.002",
            "--scale",
            "0.02",
            "--repeats",
            "1",
            "--cpu",
            "--tmp",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert summary["tensors"] % len(host_weights_copy.LAYER_SHAPES) == 0
    assert 0.001 < summary["gb"] <= 0.002
    assert set(summary["seconds"]) == {"files_to_host"} and summary["seconds"]["files_to_host"] > 0
    assert list(tmp_path.glob("hostweights*")) == [], "the checkpoint is removed"


def test_the_layer_shapes_are_the_8b_models():
    shapes = host_weights_copy.layer_shapes(int(16e9), 1.0)
    per_layer = sum(2 * rows * cols for rows, cols in host_weights_copy.LAYER_SHAPES)
    assert per_layer == 2 * 218_103_808  # one Llama-3.1-8B decoder layer's matrices, bf16
    assert len(shapes) == 7 * (int(16e9) // per_layer)


def test_read_returns_every_tensor_of_every_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(host_weights_copy, "SHARD_BYTES", 10_000)
    shapes = host_weights_copy.layer_shapes(100_000, 0.01)
    written = host_weights_copy.write_checkpoint(tmp_path, shapes)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tensors = host_weights_copy.read(tmp_path, "cpu")
    assert len(tensors) == len(shapes) and sum(t.numel() * 2 for t in tensors.values()) == written
