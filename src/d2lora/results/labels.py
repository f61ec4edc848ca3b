"""Display names of the init axis (adapter variants) in figures and tables.

A variant's label is `config["variants"][name]["label"]` when the config gives one; otherwise
the paper's spelling for its two (lora -> LoRA, d2lora -> D2LoRA) and the bare name for any
other variant. No per-variant code: a new variant gets a label from config, or its name.
"""

from __future__ import annotations

from typing import Mapping

DEFAULT_INIT_LABELS = {"lora": "LoRA", "d2lora": "D2LoRA"}


def default_label(init: str) -> str:
    return DEFAULT_INIT_LABELS.get(init, init)


def init_label(init: str, labels: Mapping[str, str] | None = None) -> str:
    """The label of one init: from `labels` (see init_labels), else the default."""
    return (labels or {}).get(init) or default_label(init)


def init_labels(config: Mapping) -> dict[str, str]:
    """init name -> label, for every init named by an experiment or under `variants`.

    Raises ValueError when two inits would share a label: their columns and legend entries
    would be indistinguishable.
    """
    variants = config.get("variants") or {}
    names = [init for spec in (config.get("experiments") or {}).values() for init in spec.get("inits", [])]
    names += list(variants)
    labels: dict[str, str] = {}
    for name in dict.fromkeys(names):
        spec = variants.get(name) or {}
        labels[name] = str(spec.get("label") or default_label(name))
    seen: dict[str, str] = {}
    for name, label in labels.items():
        if label in seen:
            raise ValueError(
                f"variants: inits '{seen[label]}' and '{name}' have the same label {label!r}; "
                "give one of them another `label`"
            )
        seen[label] = name
    return labels
