"""The config schema's defaults, read from the schema itself so no module restates them.

The workflow validates its config against workflow/schemas/config.schema.yaml, which fills the
defaults into the config; code called with a hand-written settings dict (tests, benchmarks) gets
the same values through `with_defaults`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def _definitions() -> dict:
    return yaml.safe_load(SCHEMA.read_text())["$defs"]


def defaults(definition: str) -> dict:
    """{key: default} of the schema's `$defs/<definition>` properties that declare one."""
    properties = _definitions()[definition]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def with_defaults(definition: str, values: dict) -> dict:
    return {**defaults(definition), **values}
