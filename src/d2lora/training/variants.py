"""Variant specs: what an init names (adapter, peft init, warm start, calibration rows), checked
and completed. Pure data, no torch: the config check reads it before any job (d2lora.grid).

A config spec is a dict (config `variants`, schema-checked)::

    {"adapter": "lora", "init_lora_weights": "default", "warmup": False, "calibration_rows": 256}

Variant.of checks and completes it into a frozen Variant; d2lora.training.inits builds the adapter
it names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

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

VARIANT_KEYS = ("adapter", "init_lora_weights", "warmup", "calibration_rows", "options")


class VariantError(ValueError):
    """A variant spec that names an unknown init, adapter or key; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One variant of the init axis, checked and complete: the adapter type, peft's init, whether it
    continues from its own warm-up, EVA/CorDA's calibration rows, and an adaptive adapter's options
    (d2lora.training.adaptive checks those). Built from a config spec with Variant.of."""

    adapter: str = "lora"
    init_lora_weights: str = "default"
    warmup: bool = False
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, spec: Variant | dict | None, init: str | None = None) -> Variant:
        """The variant a spec names; None means the built-in variant named `init`."""
        if isinstance(spec, cls):
            return spec
        if spec is None:
            if init not in BUILTIN_VARIANTS:
                raise VariantError(
                    f"unknown init '{init}' (built-ins: {', '.join(BUILTIN_VARIANTS)}; any other init "
                    f"needs its variant spec with keys {', '.join(VARIANT_KEYS)})"
                )
            return BUILTIN_VARIANTS[init]
        if not isinstance(spec, dict):
            raise VariantError(f"variant: expected a mapping with keys {', '.join(VARIANT_KEYS)}, got {spec!r}")
        adapter = spec.get("adapter", "lora")
        if adapter not in ADAPTERS:
            raise VariantError(f"adapter: unknown adapter '{adapter}' (known: {', '.join(ADAPTERS)})")
        unknown = sorted(set(spec) - set(VARIANT_KEYS))
        if unknown:
            raise VariantError(f"{unknown[0]}: unknown key of a {adapter} variant (known: {', '.join(VARIANT_KEYS)})")
        if adapter == "lora" and spec.get("options"):
            raise VariantError("options: only adapters adalora and dynamic take options")
        name = spec.get("init_lora_weights", "default")
        if name is True:
            name = "default"
        peft_init_value(name)
        rows = spec.get("calibration_rows", DEFAULT_CALIBRATION_ROWS)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise VariantError(f"calibration_rows: expected a positive integer, got {rows!r}")
        return cls(
            adapter=adapter,
            init_lora_weights=name,
            warmup=bool(spec.get("warmup", False)),
            calibration_rows=rows,
            options=dict(spec.get("options") or {}),
        )

    @property
    def residual(self) -> bool:
        """The init rewrites the base weights (W - s*B0A0): PiSSA, OLoRA, CorDA."""
        return self.adapter == "lora" and is_residual_init(self.init_lora_weights)

    @property
    def needs_calibration(self) -> bool:
        """The init reads training rows' activations: EVA, CorDA."""
        return self.adapter == "lora" and self.init_lora_weights in DATA_INITS

    def replace(self, **changes) -> Variant:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The recorded form (training.json's "variant"): options only where an adapter has them."""
        out = dataclasses.asdict(self)
        if not out["options"]:
            del out["options"]
        return out


BUILTIN_VARIANTS = {"lora": Variant(), "d2lora": Variant(warmup=True)}


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
