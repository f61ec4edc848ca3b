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
from d2lora.settings import LoraShape


class AdapterError(ValueError):
    """A saved adapter that does not fit the configured LoRA shape or the base model."""


def lora_config(lora: LoraShape | dict, *, rank: int | None = None) -> LoraConfig:
    """peft's LoraConfig of training.lora; `rank` builds room for more components at the same
    scaling (lora_alpha scaled so that alpha' / rank = alpha / training.lora.rank)."""
    lora = LoraShape.of(lora, "training.lora")
    rank = rank or lora.rank
    return LoraConfig(
        r=rank,
        lora_alpha=float(lora.alpha) if rank == lora.rank else float(lora.alpha) * rank / lora.rank,
        lora_dropout=float(lora.dropout),
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def check_adapter_matches(adapter_dir: str | Path, lora: LoraShape | dict, base_model_dir: str | Path) -> None:
    """Refuse a warm-up adapter of another rank/alpha, or one trained on another base model."""
    try:
        require_safetensors_adapter(adapter_dir)
    except ModelSourceError as err:
        raise AdapterError(str(err)) from err
    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    check_adapter_config(adapter_cfg, adapter_dir, lora, base_model_dir)


def check_adapter_config(adapter_cfg: dict, where, lora: LoraShape | dict, base_model_dir: str | Path) -> None:
    """Rank, alpha and base model of one adapter_config.json (as a dict) against training.lora."""
    lora = LoraShape.of(lora, "training.lora")
    if int(adapter_cfg["r"]) != lora.rank or float(adapter_cfg["lora_alpha"]) != float(lora.alpha):
        raise AdapterError(
            f"{where}: adapter has rank {adapter_cfg['r']}, alpha {adapter_cfg['lora_alpha']}; "
            f"training.lora asks for rank {lora.rank}, alpha {lora.alpha}"
        )
    trained_on = adapter_cfg.get("base_model_name_or_path")
    if trained_on and Path(trained_on).resolve() != Path(base_model_dir).resolve():
        raise AdapterError(f"{where}: adapter was trained on base model {trained_on}, not {base_model_dir}")
