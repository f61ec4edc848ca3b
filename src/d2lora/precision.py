"""Precision chosen by the hardware: `auto` means bf16 where the device computes it natively.

A CUDA device that supports bf16 and a CPU with native bf16 instructions (AVX512-BF16 or AMX on
x86, the BF16 extension on Arm) get bfloat16; any other CPU gets float32, because there bf16 is
emulated and autocast runs ~20x slower than float32. An explicit setting (`float32`, `bfloat16`,
`true`, `false`) always wins. Every choice comes with its reason, which the jobs write into their
records and manifests.

`D2LORA_NATIVE_BF16=0` (or `1`) in the environment overrides the detection, for measuring a run
without bf16 on a machine that has it; the reason then says so.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

AUTO = "auto"
OVERRIDE_ENV = "D2LORA_NATIVE_BF16"
# /proc/cpuinfo flags of native bf16 arithmetic: x86 (AVX512-BF16, AMX) and Arm (FEAT_BF16).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """One resolved precision: what the config said, what was chosen, and why."""

    setting: str
    dtype: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def record(self) -> dict:
        return asdict(self)


def _cpuinfo_fields(cpuinfo: str | os.PathLike) -> list[tuple[str, str]]:
    """(lower-case key, value) of every `key : value` line of a cpuinfo file; none where it is absent."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    fields = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.append((key.strip().lower(), value.strip()))
    return fields


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where the file is absent."""
    return {flag for key, value in _cpuinfo_fields(cpuinfo) if key in ("flags", "features") for flag in value.split()}


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (x86 `model name`; else platform's name for the machine). A GPU step
    that waits on kernel launches runs as fast as the host CPU issues them, so timings name it."""
    names = [value for key, value in _cpuinfo_fields(cpuinfo) if key == "model name" and value]
    return names[0] if names else platform.processor() or platform.machine()


def native_bf16(device: str, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether `device` ("cpu" or "cuda[:i]") computes bf16 natively, and why we think so."""
    override = os.environ.get(OVERRIDE_ENV)
    if override in ("0", "1"):
        return override == "1", f"{OVERRIDE_ENV}={override} in the environment"
    if device.startswith("cuda"):
        # torch: kept out of workflow parsing (the rules import this module)
        import torch

        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {name} supports bf16"
        return False, f"CUDA device {name} has no native bf16"
    flags = cpu_flags() if flags is None else flags
    found = sorted(set(CPU_BF16_FLAGS) & flags)
    cpu = platform.processor() or platform.machine()
    if found:
        return True, f"CPU ({cpu}) has native bf16 ({', '.join(found)})"
    if not flags:
        return False, f"CPU ({cpu}): its feature flags cannot be read, so bf16 is taken to be emulated"
    return False, f"CPU ({cpu}) has no native bf16 (no {', '.join(CPU_BF16_FLAGS[:2])}): bf16 would be emulated"


def resolve_dtype(setting: str | None, device: str, flags: set[str] | None = None) -> Precision:
    """A dtype setting (`auto`, `float32`, `bfloat16`, `float16`; None reads as auto) for `device`."""
    setting = setting or AUTO
    if setting != AUTO:
        return Precision(setting, setting, "set in the config")
    native, why = native_bf16(device, flags)
    return Precision(AUTO, "bfloat16" if native else "float32", why)


def resolve_bf16_flag(setting: bool | str | None, device: str, flags: set[str] | None = None) -> Precision:
    """The training `bf16` flag (true, false or `auto`; None reads as auto): bf16 autocast or not."""
    if setting is None or setting == AUTO:
        return resolve_dtype(AUTO, device, flags)
    if isinstance(setting, bool):
        return Precision(str(setting).lower(), "bfloat16" if setting else "float32", "set in the config")
    raise ValueError(f"bf16 must be true, false or 'auto', got {setting!r}")
