"""LoRA adapters: a fresh one (vanilla LoRA) or the warm-up adapter, loaded trainable (D2LoRA).

The init variants (peft's `init_lora_weights`: gaussian, PiSSA, OLoRA, EVA, CorDA) and the residual
bases some of them need live in d2lora.training.inits; the two functions here are its built-in
cases ("lora": default init; "d2lora": the default-init warm-up), kept for existing callers.
"""
from __future__ import annotations

import json
from pathlib import Path


class AdapterError(ValueError):
    """A saved adapter that does not fit the configured LoRA shape or the base model."""


def lora_config(lora: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=lora.get("target_modules", "all-linear"),
        task_type="CAUSAL_LM",
        bias="none",
    )


def fresh_adapter(base_model, lora: dict, variant: dict | None = None, calibration_texts=None, tokenizer=None, **kwargs):
    from d2lora.training import inits

    variant = variant if variant is not None else inits.BUILTIN_VARIANTS["lora"]
    return inits.fresh_adapter(base_model, lora, variant, calibration_texts, tokenizer, **kwargs)


def check_adapter_matches(adapter_dir: str | Path, lora: dict, base_model_dir: str | Path) -> None:
    """Refuse a warm-up adapter of another rank/alpha, or one trained on another base model."""
    from d2lora.models import ModelSourceError, require_safetensors_adapter

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


def warm_started_adapter(base_model, adapter_dir: str | Path, lora: dict, base_model_dir: str | Path,
                         variant: dict | None = None):
    from d2lora.training import inits

    return inits.warm_started_adapter(base_model, adapter_dir, lora, variant, base_model_dir)
