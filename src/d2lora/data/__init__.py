"""Data preparation: sources (synthetic, hub, local files) → canonical JSONL per role."""
from d2lora.data.prepare import ROLE_FORMS, load_prepared, prepare_role, subset, subset_order
from d2lora.data.schema import FORM_FIELDS, validate_rows
from d2lora.data.sources import FORMATS, load_raw, register_format, to_canonical
from d2lora.data.synthetic import generate

__all__ = [
    "FORMATS",
    "FORM_FIELDS",
    "ROLE_FORMS",
    "generate",
    "load_prepared",
    "load_raw",
    "prepare_role",
    "register_format",
    "subset",
    "subset_order",
    "to_canonical",
    "validate_rows",
]
