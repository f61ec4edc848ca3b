"""LoRA adapters: a fresh one (vanilla LoRA) or the warm-up adapter, loaded trainable (D2LoRA).

Building adapters (every init variant: peft's `init_lora_weights`, gaussian, PiSSA, OLoRA, EVA, CorDA,
and the residual bases some of them need) is d2lora.training.inits; this module holds what it and
the workflow check a saved adapter against: the LoRA config and the shape/base-model checks.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig

from d2lora.models import ModelSourceError, require_safetensors_adapter


class AdapterError(ValueError):
    """A saved adapter that does not fit the configured LoRA shape or the base model."""


def lora_config(lora: dict):
    return LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=lora.get("target_modules", "all-linear"),
        task_type="CAUSAL_LM",
        bias="none",
    )


def check_adapter_matches(adapter_dir: str | Path, lora: dict, base_model_dir: str | Path) -> None:
    """Refuse a warm-up adapter of another rank/alpha, or one trained on another base model."""
    try:
        require_safetensors_adapter(adapter_dir)
    except ModelSourceError as err:
        raise AdapterError(str(err)) from err
    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    check_adapter_config(adapter_cfg, adapter_dir, lora, base_model_dir)


def check_adapter_config(adapter_cfg: dict, where, lora: dict, base_model_dir: str | Path) -> None:
    """Rank, alpha and base model of one adapter_config.json (as a dict) against training.lora."""
    if int(adapter_cfg["r"]) != int(lora["rank"]) or float(adapter_cfg["lora_alpha"]) != float(lora["alpha"]):
        raise AdapterError(
            f"{where}: adapter has rank {adapter_cfg['r']}, alpha {adapter_cfg['lora_alpha']}; "
            f"training.lora asks for rank {lora['rank']}, alpha {lora['alpha']}"
        )
    trained_on = adapter_cfg.get("base_model_name_or_path")
    if trained_on and Path(trained_on).resolve() != Path(base_model_dir).resolve():
        raise AdapterError(f"{where}: adapter was trained on base model {trained_on}, not {base_model_dir}")
