"""The config layer (d2lora.settings): typed, frozen settings that mirror the schema, field for field,
with the schema's own defaults; and no module restating one of those defaults."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from d2lora import settings
from d2lora.settings import (
    Decoding,
    EvaluationServer,
    EvaluationSettings,
    LoraShape,
    SettingsError,
    StatisticsSettings,
    TrainingHparams,
    TrainingServer,
    defaults,
    schema_object,
)

ROOT = Path(__file__).resolve().parents[1]
# Where a default could be restated: the package, the rules and their scripts.
SCANNED = [
    *sorted((ROOT / "src" / "d2lora").rglob("*.py")),
    ROOT / "Snakefile",
    *sorted((ROOT / "workflow").rglob("*.smk")),
    *sorted((ROOT / "workflow" / "scripts").glob("*.py")),
]
TABLE2_SFT = {"learning_rate": 1e-6, "epochs": 3, "scheduler": "linear", "batch_size": 8, "grad_accum": 2}
CLASSES = {
    LoraShape: "training/lora",
    TrainingHparams: "$defs/hparams",
    Decoding: "evaluation/gsm8k",
    EvaluationSettings: "evaluation",
    EvaluationServer: "evaluation/server",
    TrainingServer: "training/server",
    StatisticsSettings: "statistics",
}


@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda cls: cls.__name__)
def test_each_settings_class_has_exactly_the_schema_objects_keys(cls):
    fields = {field.name for field in dataclasses.fields(cls)}
    assert fields == set(schema_object(CLASSES[cls])["properties"])


def test_defaults_are_the_schemas():
    hp = TrainingHparams.of(TABLE2_SFT, "training.adapt.sft")
    for key, value in defaults("$defs/hparams").items():
        assert getattr(hp, key) == TABLE2_SFT.get(key, value), key
    assert (hp.max_length, hp.bf16, hp.gradient_checkpointing, hp.beta) == (1024, "auto", False, None)
    assert LoraShape.of({"rank": 16, "alpha": 16}) == LoraShape(
        rank=16, alpha=16, dropout=0.0, target_modules="all-linear"
    )
    stats = StatisticsSettings.of(None)
    assert (stats.bootstrap_samples, stats.confidence, stats.seed, stats.comparisons) == (10000, 0.95, 0, None)


def test_a_variant_has_the_schemas_keys_and_defaults_and_round_trips_its_record():
    from d2lora.training.variants import BUILTIN_VARIANTS, Variant, VariantError

    item = schema_object("variants")["additionalProperties"]["properties"]
    fields = {field.name: field for field in dataclasses.fields(Variant)}
    assert set(fields) == set(item) - {"label"}  # the label names a figure's line, not the training
    for key, spec in item.items():
        if "default" in spec:
            assert fields[key].default == spec["default"], key
    pissa = Variant.of({"init_lora_weights": "pissa_niter_4", "warmup": True})
    assert (pissa.residual, pissa.needs_calibration, pissa.calibration_rows) == (True, False, 256)
    assert Variant.of({"init_lora_weights": "eva", "calibration_rows": 8}).needs_calibration
    dynamic = Variant.of({"adapter": "dynamic", "options": {"initial_rank": 4}})
    assert not dynamic.residual and dynamic.as_dict()["options"] == {"initial_rank": 4}
    for variant in (pissa, dynamic, *BUILTIN_VARIANTS.values()):
        assert Variant.of(variant.as_dict()) == variant and Variant.of(variant) is variant
    assert "options" not in pissa.as_dict()  # records of plain LoRA variants keep their four keys
    with pytest.raises(dataclasses.FrozenInstanceError):
        pissa.warmup = False
    assert pissa.replace(warmup=False).warmup is False and pissa.warmup is True
    with pytest.raises(VariantError, match="unknown init 'x' \\(built-ins: lora, d2lora"):
        Variant.of(None, "x")


def test_benchmark_settings_take_their_own_required_keys_and_gsm8ks_defaults():
    evaluation = EvaluationSettings.of(
        {
            "gsm8k": {"max_new_tokens": 256, "batch_size": 32, "cache": "static"},
            "titles": {"max_new_tokens": 24, "batch_size": 16},
            "arc_easy": {"batch_size": 16},
        }
    )
    assert evaluation.gsm8k.cache == "static" and evaluation.titles.cache == "dynamic"
    assert evaluation.arc_easy.max_new_tokens is None and evaluation.arc_easy.batch_size == 16
    assert (evaluation.dtype, evaluation.engine, evaluation.merge_adapter) == ("auto", "pipeline", False)
    with pytest.raises(SettingsError, match=r"^evaluation\.titles\.max_new_tokens: required setting missing"):
        EvaluationSettings.of(
            {
                "gsm8k": {"max_new_tokens": 1, "batch_size": 1},
                "titles": {"batch_size": 1},
                "arc_easy": {"batch_size": 1},
            }
        )


def test_unknown_and_missing_keys_name_the_config_key():
    with pytest.raises(SettingsError, match=r"^training\.adapt\.dpo\.betta: unknown setting"):
        TrainingHparams.of({**TABLE2_SFT, "betta": 0.1}, "training.adapt.dpo")
    with pytest.raises(SettingsError, match=r"^training\.warmup\.learning_rate: required setting missing"):
        TrainingHparams.of({"epochs": 1, "scheduler": "linear", "batch_size": 8}, "training.warmup")
    with pytest.raises(SettingsError, match=r"^training\.lora\.alpha: required setting missing"):
        LoraShape.of({"rank": 4}, "training.lora")


def test_settings_are_frozen_and_change_only_by_replace():
    hp = TrainingHparams.of(TABLE2_SFT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.max_length = 2048
    longer = hp.replace(max_length=2048)
    assert (hp.max_length, longer.max_length) == (1024, 2048)
    assert TrainingHparams.of(longer) is longer
    assert longer.as_dict()["max_length"] == 2048 and set(longer.as_dict()) == set(defaults("$defs/hparams")) | set(
        TABLE2_SFT
    ) | {"beta"}


@pytest.mark.parametrize("rows, batch, accum, epochs", [(272, 8, 2, 3), (208, 8, 2, 4), (3, 8, 2, 1), (100, 3, 4, 0.5)])
def test_optimizer_steps_count_the_trainers_steps(rows, batch, accum, epochs):
    hp = TrainingHparams.of({**TABLE2_SFT, "batch_size": batch, "grad_accum": accum, "epochs": epochs})
    per_epoch = max(1, math.ceil(math.ceil(rows / batch) / accum))
    assert hp.optimizer_steps(rows) == max(1, math.ceil(per_epoch * epochs))


# Every schema object whose keys have defaults: the top level, the blocks and the settings classes'.
DEFAULTED = ["", "model", "training", *CLASSES.values()]


def _defaulted_keys() -> set[str]:
    keys = set()
    for path in DEFAULTED:
        keys |= set(defaults(path))
    return keys


def _restatement() -> re.Pattern:
    """`.get("<key with a schema default>", ...)`: a default restated where the key is read."""
    return re.compile(r"""\.get\(\s*["'](%s)["']\s*,""" % "|".join(sorted(_defaulted_keys())))


def test_no_module_restates_a_schema_default():
    """`.get("max_length", 1024)` and the like: the default belongs to the schema, read by d2lora.settings."""
    pattern = _restatement()
    found = []
    for path in SCANNED:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_restatement_check_would_see_one():
    pattern = _restatement()
    assert pattern.search('int(hp.get("max_length", 1024))') and pattern.search("lora.get('dropout', 0.0)")
    assert pattern.search('config["training"].get("checkpoint_steps", 0)') and pattern.search(
        'config.get("device", "auto")'
    )
    assert len(SCANNED) > 60 and settings.SCHEMA.is_file()
