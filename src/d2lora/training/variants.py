"""Variant specs: what an init names (adapter, peft init, warm start, calibration rows), checked
and completed. Pure data, no torch: the config check reads it before any job (d2lora.grid).

A variant spec is a dict::

    {"adapter": "lora", "init_lora_weights": "default", "warmup": False, "calibration_rows": 256}

d2lora.training.inits builds the adapter a spec names.
"""

from __future__ import annotations

import re

# init name -> peft's init_lora_weights value
INITS = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "eva": "eva",
    "corda": "corda",
}
PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
RESIDUAL_INITS = ("pissa", "olora", "corda")  # plus every pissa_niter_K
DATA_INITS = ("eva", "corda")
ADAPTERS = ("lora", "adalora", "dynamic")
DEFAULT_CALIBRATION_ROWS = 256

VARIANT_KEYS = ("adapter", "init_lora_weights", "warmup", "calibration_rows")
BUILTIN_VARIANTS = {
    "lora": {
        "adapter": "lora",
        "init_lora_weights": "default",
        "warmup": False,
        "calibration_rows": DEFAULT_CALIBRATION_ROWS,
    },
    "d2lora": {
        "adapter": "lora",
        "init_lora_weights": "default",
        "warmup": True,
        "calibration_rows": DEFAULT_CALIBRATION_ROWS,
    },
}


class VariantError(ValueError):
    """A variant spec that names an unknown init, adapter or key; the message names the key."""


def init_names() -> list[str]:
    return list(INITS) + ["pissa_niter_<K>"]


def peft_init_value(name: str):
    if name in INITS:
        return INITS[name]
    if PISSA_NITER.fullmatch(str(name)):
        return name
    raise VariantError(f"init_lora_weights: unknown init '{name}' (known: {', '.join(init_names())})")


def is_residual_init(name: str) -> bool:
    return name in RESIDUAL_INITS or bool(PISSA_NITER.fullmatch(str(name)))


def normalize_variant(variant: dict | None, init: str | None = None) -> dict:
    """A complete, checked variant spec; None means the built-in variant named `init`."""
    if variant is None:
        if init not in BUILTIN_VARIANTS:
            raise VariantError(
                f"unknown init '{init}' (built-ins: {', '.join(BUILTIN_VARIANTS)}; any other init "
                f"needs its variant spec with keys {', '.join(VARIANT_KEYS)})"
            )
        return dict(BUILTIN_VARIANTS[init])
    if not isinstance(variant, dict):
        raise VariantError(f"variant: expected a mapping with keys {', '.join(VARIANT_KEYS)}, got {variant!r}")
    adapter = variant.get("adapter", "lora")
    if adapter not in ADAPTERS:
        raise VariantError(f"adapter: unknown adapter '{adapter}' (known: {', '.join(ADAPTERS)})")
    out = dict(variant)
    out["adapter"] = adapter
    out["warmup"] = bool(variant.get("warmup", False))
    if adapter != "lora":
        # Built by d2lora.training.adaptive, which owns (and checks) its own keys.
        return out
    unknown = sorted(set(variant) - set(VARIANT_KEYS))
    if unknown:
        raise VariantError(f"{unknown[0]}: unknown key of a lora variant (known: {', '.join(VARIANT_KEYS)})")
    name = variant.get("init_lora_weights", "default")
    if name is True:
        name = "default"
    peft_init_value(name)
    out["init_lora_weights"] = name
    rows = variant.get("calibration_rows", DEFAULT_CALIBRATION_ROWS)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise VariantError(f"calibration_rows: expected a positive integer, got {rows!r}")
    out["calibration_rows"] = rows
    return out


def is_residual(variant: dict) -> bool:
    return variant.get("adapter", "lora") == "lora" and is_residual_init(variant.get("init_lora_weights", "default"))


def needs_calibration(variant: dict) -> bool:
    return variant.get("adapter", "lora") == "lora" and variant.get("init_lora_weights") in DATA_INITS
