"""Saving a trained adapter (a residual init's conversion against the original base included)
and starting the adaptation from the warm-up's adapter on the same (residual) base."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from peft import (
    PeftModel,
    get_peft_model_state_dict,
)
from safetensors.torch import save_file

from d2lora.io import write_json
from d2lora.models import ModelSourceError, require_safetensors_adapter
from d2lora.settings import LoraShape
from d2lora.training.adapters import AdapterError, check_adapter_config, check_adapter_matches
from d2lora.training.inits import (
    CONFIG_FILE,
    INITIAL_FILE,
    RESIDUAL_ATTR,
    RESIDUAL_DIR,
    RESIDUAL_RECORD,
    TRAINED_FILE,
    cpu_state,
    peft_with_state,
    read_residual_files,
    residualize,
    scaling_of,
    write_residual_files,
)
from d2lora.training.variants import (
    BUILTIN_VARIANTS,
    DATA_INITS,
    DEFAULT_CALIBRATION_ROWS,
    Variant,
    is_residual_init,
)


def save_adapter(model, out_dir: str | Path, variant: Variant | dict) -> None:
    """Write the trained "default" adapter so that plain PeftModel.from_pretrained(ORIGINAL base,
    out_dir) gives the trained function; residual models also get `residual/` to continue from."""
    out_dir = Path(out_dir)
    residual = getattr(model, RESIDUAL_ATTR, None)
    if residual is None:
        variant = Variant.of(variant)
        if variant.residual:
            raise ValueError(
                f"init '{variant.init_lora_weights}' rewrote the base weights, but the model carries "
                "no initial adapter to convert against"
            )
        model.save_pretrained(str(out_dir), selected_adapters=["default"], safe_serialization=True)
        return
    trained = cpu_state(get_peft_model_state_dict(model, adapter_name="default"))
    write_residual_files(residual["config"], residual["state_dict"], out_dir / RESIDUAL_DIR, trained)
    with tempfile.TemporaryDirectory() as scratch:
        # peft's conversion reads the initial adapter from an adapter folder: rank-2r [A | A0],
        # [B | -B0], alpha doubled, for the original base weights.
        initial = Path(scratch) / "initial"
        initial.mkdir()
        save_file(residual["state_dict"], str(initial / "adapter_model.safetensors"), metadata={"format": "pt"})
        residual["config"].save_pretrained(str(initial))
        model.save_pretrained(
            str(out_dir),
            selected_adapters=["default"],
            safe_serialization=True,
            path_initial_model_for_weight_conversion=str(initial),
        )
    write_json(
        out_dir / RESIDUAL_DIR / RESIDUAL_RECORD,
        {
            "init_lora_weights": residual["init"],
            "scaling": scaling_of(residual["config"]),
            "rank": residual["config"].r,
            "base": f"W_res = W - scaling * B0 @ A0 in float32, B0/A0 from {INITIAL_FILE}; {TRAINED_FILE} goes on W_res",
            "top_level": "peft's conversion: rank 2r [A|A0], [B|-B0], alpha doubled, on the original base W",
        },
    )


def residual_record(adapter_dir: str | Path) -> dict | None:
    path = Path(adapter_dir) / RESIDUAL_DIR / RESIDUAL_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _warmup_variant(adapter_dir: Path) -> dict | None:
    path = adapter_dir / "training.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("variant")


def check_warmup_matches(
    adapter_dir: str | Path, lora: LoraShape | dict, variant: Variant | dict, base_model_dir: str | Path
) -> None:
    """Refuse a warm-up adapter made with another init (or calibration size), rank, alpha or base model."""
    adapter_dir = Path(adapter_dir)
    variant = Variant.of(variant)
    record = residual_record(adapter_dir)
    if record is None:
        check_adapter_matches(adapter_dir, lora, base_model_dir)
    else:
        try:
            require_safetensors_adapter(adapter_dir)  # the converted top level, which evaluation loads
        except ModelSourceError as err:
            raise AdapterError(str(err)) from err
        residual_cfg = json.loads((adapter_dir / RESIDUAL_DIR / CONFIG_FILE).read_text())
        check_adapter_config(residual_cfg, adapter_dir / RESIDUAL_DIR, lora, base_model_dir)
    # The warm-up's recorded variant, read as recorded (a file, not config); none: the default warm-up.
    made_with = _warmup_variant(adapter_dir) or BUILTIN_VARIANTS["d2lora"].as_dict()
    want = variant.init_lora_weights
    got = made_with.get("init_lora_weights", "default")
    if got != want:
        raise AdapterError(
            f"{adapter_dir}: the warm-up adapter was initialised with init_lora_weights '{got}'; "
            f"this variant continues one made with '{want}'"
        )
    if (
        want in DATA_INITS
        and int(made_with.get("calibration_rows", DEFAULT_CALIBRATION_ROWS)) != variant.calibration_rows
    ):
        raise AdapterError(
            f"{adapter_dir}: the warm-up adapter's {want} init read {made_with.get('calibration_rows')} "
            f"calibration rows; this variant asks for calibration_rows={variant.calibration_rows}"
        )
    if is_residual_init(want) and record is None:
        raise AdapterError(
            f"{adapter_dir}: init '{want}' rewrites the base weights, but the warm-up folder has no "
            f"{RESIDUAL_DIR}/ to rebuild them from"
        )


def warm_started_adapter(
    base_model,
    adapter_dir: str | Path,
    lora: LoraShape | dict,
    variant: Variant | dict | None,
    base_model_dir: str | Path,
):
    """A trainable PeftModel whose function is the warm-up's trained function: for residual inits
    on W_res rebuilt from the warm-up's A0/B0, with the warm-up's trained A/B."""
    adapter_dir = Path(adapter_dir)
    variant = Variant.of(variant, "d2lora")
    check_warmup_matches(adapter_dir, lora, variant, base_model_dir)
    record = residual_record(adapter_dir)
    if record is None:
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)
    root = adapter_dir / RESIDUAL_DIR
    initial, config = read_residual_files(root, INITIAL_FILE)
    trained, _ = read_residual_files(root, TRAINED_FILE)
    residualize(base_model, initial, scaling_of(config))
    model = peft_with_state(base_model, config, trained)
    setattr(model, RESIDUAL_ATTR, {"init": record["init_lora_weights"], "config": config, "state_dict": initial})
    return model
