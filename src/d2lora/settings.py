"""The config layer: typed, frozen settings built from config blocks, with the schema's defaults.

The workflow validates its config against workflow/schemas/config.schema.yaml, which also fills
the defaults in. Code called with a hand-written block (tests, benchmarks, a script) gets the same
values here, because every default is read from the schema itself: no module restates one. Each
settings class mirrors one schema object, field for field (tests/test_settings.py holds them to it):

- LoraShape: training.lora
- TrainingHparams: $defs/hparams (training.warmup, training.adapt.<method>)
- Decoding: evaluation.gsm8k / titles / arc_easy
- EvaluationSettings: evaluation (its dtype, merge, engine, the three benchmarks' decoding and the
  cell server, EvaluationServer)
- StatisticsSettings: statistics (comparisons resolved by d2lora.grid, which knows the grid)
- Variant (one entry of `variants`, or a built-in init): d2lora.training.variants, next to the
  init and adapter names it checks

`Settings.of(block, key)` refuses a key the schema does not know and a required one left out,
naming the config key; `as_dict()` gives the plain mapping that records and manifests store.
No torch here: the workflow imports this module while it parses the rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class SettingsError(ValueError):
    """A settings block with a key the schema does not know or without a required one."""


@functools.cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def schema_object(path: str) -> dict:
    """The schema object at `path`: '$defs/<name>', or config keys joined by '/' ('training/lora')."""
    node = _schema()
    parts = [part for part in path.split("/") if part]  # "": the config's top level
    if parts and parts[0] == "$defs":
        node, parts = node["$defs"][parts[1]], parts[2:]
    for part in parts:
        node = node["properties"][part]
    return node


def defaults(path: str) -> dict:
    """{key: default} of the properties of the schema object at `path` that declare one."""
    properties = schema_object(path).get("properties", {})
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def with_defaults(path: str, block: Mapping | None) -> dict:
    """A config block (a plain mapping) with the schema's defaults filled in where it leaves keys out."""
    return {**defaults(path), **(block or {})}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of the typed settings: SCHEMA_PATH names the schema object the fields mirror; fields
    without a schema default default to None where the schema does not require them."""

    SCHEMA_PATH: ClassVar[str]
    NESTED: ClassVar[dict[str, type]] = {}

    @classmethod
    def of(cls, block: Settings | Mapping | None, key: str | None = None, schema_path: str | None = None):
        """The settings of a config block (its defaults from the schema); an instance passes through.
        `key` names the block in messages; `schema_path` the schema object, where not SCHEMA_PATH."""
        if isinstance(block, cls):
            return block
        schema_path = schema_path or cls.SCHEMA_PATH
        key = key or schema_path.replace("$defs/", "").replace("/", ".")
        block = dict(block or {})
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(block) - names)
        if unknown:
            raise SettingsError(f"{key}.{unknown[0]}: unknown setting (known: {', '.join(sorted(names))})")
        values = {**defaults(cls.SCHEMA_PATH), **with_defaults(schema_path, block)}
        for name in schema_object(schema_path).get("required", []):
            if name not in values:
                raise SettingsError(f"{key}.{name}: required setting missing")
        for name, nested in cls.NESTED.items():
            if name in values:
                values[name] = nested.of(values[name], f"{key}.{name}", f"{schema_path}/{name}")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraShape(Settings):
    SCHEMA_PATH: ClassVar[str] = "training/lora"

    rank: int
    alpha: float
    dropout: float
    target_modules: str | list[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingHparams(Settings):
    """One phase's training hyperparameters (the warm-up's or one method's)."""

    SCHEMA_PATH: ClassVar[str] = "$defs/hparams"

    learning_rate: float
    epochs: float
    scheduler: str
    batch_size: int
    warmup_ratio: float
    grad_accum: int
    max_length: int
    beta: float | None = None  # DPO and ORPO only; the config check requires it there
    reference: str
    # True/False, or "auto" until resolved for a device (d2lora.training.run)
    bf16: bool | str
    gradient_checkpointing: bool
    group_by_length: bool
    base_dtype: str
    padding_free: bool
    pad_to_multiple_of: int | None
    max_micro_batch_tokens: int | None
    no_checkpointing_up_to_tokens: int | None
    split_micro_batches: bool
    cast_adapter_inputs: bool
    fuse_adapter_add: bool
    compile_layers: bool
    compile_layers_min_steps: int
    flex_attention: bool
    precompute_reference: bool
    keep_dropout: bool

    def optimizer_steps(self, rows: int) -> int:
        """Optimizer steps over `rows` training rows (the last micro-batch and step may be short)."""
        per_epoch = max(1, math.ceil(math.ceil(rows / self.batch_size) / self.grad_accum))
        return max(1, math.ceil(per_epoch * self.epochs))

    def compiles_layers(self, steps: int | None) -> bool:
        """Whether a cell of `steps` optimizer steps compiles its decoder layers (None: unknown, no
        step threshold applies)."""
        return self.compile_layers and (steps is None or steps >= self.compile_layers_min_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoding(Settings):
    """One benchmark's evaluation settings (evaluation.<benchmark>): GSM8K's schema object has every
    key; titles and ARC-Easy allow a subset and take GSM8K's defaults for the rest."""

    SCHEMA_PATH: ClassVar[str] = "evaluation/gsm8k"

    batch_size: int
    max_new_tokens: int | None = None  # generation benchmarks (GSM8K, titles)
    cache: str
    compile: bool
    rows_leave_every: int
    packed_gqa: bool
    filled_cache_only: bool
    native_gqa: bool
    prompt_width: str
    cudnn_attention: bool
    flex_attention: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationServer(Settings):
    """Where evaluate jobs run their cell: in their own process, or in the machine's cell server."""

    SCHEMA_PATH: ClassVar[str] = "evaluation/server"

    enabled: bool
    idle_seconds: int
    keep_base_weights: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingServer(Settings):
    """Where warmup and adapt jobs run their cell: in their own process, or in the machine's cell server."""

    SCHEMA_PATH: ClassVar[str] = "training/server"

    enabled: bool
    idle_seconds: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationSettings(Settings):
    SCHEMA_PATH: ClassVar[str] = "evaluation"
    NESTED: ClassVar[dict[str, type]] = {
        "gsm8k": Decoding,
        "titles": Decoding,
        "arc_easy": Decoding,
        "server": EvaluationServer,
    }

    dtype: str
    merge_adapter: bool
    engine: str
    server: EvaluationServer
    gsm8k: Decoding
    titles: Decoding
    arc_easy: Decoding


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatisticsSettings(Settings):
    SCHEMA_PATH: ClassVar[str] = "statistics"

    bootstrap_samples: int
    confidence: float
    seed: int
    comparisons: list[list[str]] | None = None  # None: d2lora.grid.comparisons' default pairs
