"""Precision chosen by the hardware (d2lora.precision): both outcomes of `auto` with the
capability faked, the explicit override, and the choice recorded where results are written."""

from __future__ import annotations

import pytest

from d2lora import precision
from d2lora.precision import cpu_flags, cpu_model, resolve_bf16_flag, resolve_dtype

AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma", "avx512f"}
WITH_BF16 = AVX2_ONLY | {"avx512_bf16"}
WITH_AMX = AVX2_ONLY | {"amx_tile", "amx_bf16"}


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)


def test_auto_on_a_cpu_with_native_bf16_is_bfloat16():
    for flags, named in ((WITH_BF16, "avx512_bf16"), (WITH_AMX, "amx_bf16")):
        chosen = resolve_dtype("auto", "cpu", flags)
        assert (chosen.dtype, chosen.setting, chosen.bf16) == ("bfloat16", "auto", True)
        assert "native bf16" in chosen.reason and named in chosen.reason
        assert resolve_bf16_flag("auto", "cpu", flags).bf16 is True


def test_auto_on_a_cpu_without_native_bf16_is_float32():
    chosen = resolve_dtype("auto", "cpu", AVX2_ONLY)
    assert (chosen.dtype, chosen.bf16) == ("float32", False)
    assert "no native bf16" in chosen.reason and "emulated" in chosen.reason
    assert resolve_bf16_flag("auto", "cpu", AVX2_ONLY).bf16 is False
    # Flags that cannot be read are taken as no native bf16: the safe (fast) side.
    assert resolve_dtype(None, "cpu", set()).dtype == "float32"


def test_auto_on_cuda_follows_the_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", "cuda").dtype == "bfloat16"
    assert "Fake GPU supports bf16" in resolve_dtype("auto", "cuda").reason
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_bf16_flag("auto", "cuda:0").bf16 is False


def test_an_explicit_setting_wins_over_the_hardware():
    assert resolve_dtype("bfloat16", "cpu", AVX2_ONLY).dtype == "bfloat16"
    assert resolve_dtype("float32", "cpu", WITH_BF16).dtype == "float32"
    assert resolve_dtype("float32", "cpu", WITH_BF16).reason == "set in the config"
    assert resolve_bf16_flag(True, "cpu", AVX2_ONLY).bf16 is True
    assert resolve_bf16_flag(False, "cpu", WITH_BF16).record() == {
        "setting": "false",
        "dtype": "float32",
        "reason": "set in the config",
    }
    with pytest.raises(ValueError, match="bf16 must be true, false or 'auto'"):
        resolve_bf16_flag("yes", "cpu", WITH_BF16)


def test_the_environment_override_forces_either_outcome_and_says_so(monkeypatch):
    monkeypatch.setenv(precision.OVERRIDE_ENV, "0")
    off = resolve_dtype("auto", "cpu", WITH_BF16)
    assert off.dtype == "float32" and f"{precision.OVERRIDE_ENV}=0" in off.reason
    monkeypatch.setenv(precision.OVERRIDE_ENV, "1")
    assert resolve_dtype("auto", "cpu", AVX2_ONLY).dtype == "bfloat16"
    assert resolve_dtype("float32", "cpu", AVX2_ONLY).dtype == "float32"  # explicit still wins


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(x86)
    assert resolve_dtype("auto", "cpu", cpu_flags(arm)).dtype == "bfloat16"
    assert cpu_flags(tmp_path / "absent") == set()


def test_cpu_model_names_the_host_cpu(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n")
    assert cpu_model(x86) == "Intel(R) Xeon(R) Platinum 8480+"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_model(arm) and cpu_model(arm) == cpu_model(tmp_path / "absent")  # platform's name instead


def test_evaluation_records_the_resolved_dtype_and_its_reason(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from d2lora.evaluation.run import evaluate_cell
    from d2lora.io import write_jsonl

    monkeypatch.setenv(precision.OVERRIDE_ENV, "0")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "eval.jsonl", [{"id": "t1", "prompt": "Abstract.", "reference": "A title"}])
    cell = {"task": "titles", "method": "none", "init": "lora", "n": 0, "seed": 0}
    settings = {"max_new_tokens": 3, "batch_size": 1, "dtype": "auto"}
    out = tmp_path / "eval"
    out.mkdir()
    record = evaluate_cell(
        "titles",
        cell=cell,
        model_dir=tiny_model_dir,
        adapter_dir=None,
        data_dir=data,
        settings=settings,
        scores_path=out / "scores.json",
        predictions_path=out / "predictions.jsonl",
        device="cpu",
    )
    assert record["settings"]["dtype"] == "float32"
    assert record["precision"]["setting"] == "auto" and "D2LORA_NATIVE_BF16=0" in record["precision"]["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["precision"] == record["precision"]
