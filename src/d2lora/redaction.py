"""Tokens never written anywhere: the environment variables that hold them, and redaction."""

from __future__ import annotations

import os
from typing import Iterable

# Environment variables whose values are secrets wherever they are set; the config's
# `hf_token_env` adds its own name through D2LORA_SECRET_ENVS (d2lora.runtime.job).
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")


SECRET_ENVS_VAR = "D2LORA_SECRET_ENVS"
REDACTED = "***"


def secret_values() -> list[str]:
    """Values of the environment variables that hold tokens (never written anywhere)."""
    names = set(SECRET_ENVS) | {n for n in os.environ.get(SECRET_ENVS_VAR, "").split(",") if n}
    # Longest first, so a token that contains another is replaced whole.
    return sorted({os.environ[n] for n in names if len(os.environ.get(n, "")) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text
