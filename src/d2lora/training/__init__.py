"""Warm-up and adaptation training with TRL on LoRA adapters."""
