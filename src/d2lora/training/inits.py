"""The init axis: LoRA adapters initialised by peft's own `init_lora_weights` variants.

A variant spec is a dict::

    {"adapter": "lora", "init_lora_weights": "default", "warmup": False, "calibration_rows": 256}

`init_lora_weights` (peft's LoraConfig field; "default" is peft's `True`):

| init | A, B at the start | base weights | needs data |
| --- | --- | --- | --- |
| default | A kaiming-uniform, B = 0 (the paper's vanilla LoRA) | unchanged | no |
| gaussian | A ~ N(0, 1/r), B = 0 | unchanged | no |
| pissa, pissa_niter_K | top-r singular triplets of W (full SVD, or K subspace iterations) | W_res = W - s·B0A0 | no |
| olora | QR of W: B0 = Q[:, :r], A0 = R[:r] | W_res = W - s·B0A0 | no |
| eva | A = top-r right singular vectors of the layer inputs, B = 0 (rho = 1: no rank redistribution) | unchanged | yes |
| corda | context-oriented SVD of W·C (C: input covariance), IPM mode | W_res = W - s·B0A0 | yes |

(s = lora_alpha / r.) The residual inits (pissa*, olora, corda) move s·B0A0 out of the base
weights into the adapter, so the function at initialisation is the base model's. Training then
runs on W_res; the saved adapter folder holds:

- top level: peft's conversion (`save_pretrained(path_initial_model_for_weight_conversion=...)`),
  a rank-2r adapter [A | A0], [B | -B0] (alpha doubled, same scaling) that plain
  `PeftModel.from_pretrained(ORIGINAL_base, folder)` loads to the trained function
  W + s(BA - B0A0) = W_res + sBA. Evaluation and lm-eval load this, unchanged.
- `residual/adapter_config.json`: the rank-r LoRA config (init_lora_weights true);
- `residual/initial.safetensors`: A0, B0 (peft's state-dict keys);
- `residual/trained.safetensors`: the trained A, B, to go on W_res;
- `residual/residual.json`: which init, the scaling, and the formula.
(No `adapter_model.safetensors` under residual/: d2lora.verify takes every folder holding one for a
result that needs its own manifest.)

`warm_started_adapter` rebuilds W_res from the ORIGINAL base and `residual/initial` with the same
float32 expression peft uses (so the residual base is bit-identical to the one the warm-up trained
on) and loads `residual/trained.safetensors` on it: the adaptation continues the warm-up's function on the same
residual base, and its own save converts against the same A0/B0.

EVA and CorDA read calibration data: `calibration_rows` of the training rows (the first ones: the
training file is already in its seeded shuffle order), each the text the trainer sees
(prompt + chosen through the tokenizer's chat template), truncated to max_length.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import torch
from peft import (
    EvaConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    initialize_lora_eva_weights,
    set_peft_model_state_dict,
)
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from d2lora.data.schema import prompt_messages
from d2lora.io import write_json
from d2lora.models import ModelSourceError, require_safetensors_adapter
from d2lora.training.adapters import AdapterError, check_adapter_config, check_adapter_matches, lora_config

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
EVA_RHO = 1.0  # no rank redistribution: every layer keeps rank r, so only the init differs from LoRA
# EVA's incremental SVD is checked for convergence after every batch, cycling over the rows until
# it converges; larger batches converge in fewer forwards (6 rows: batches of 2 took 10 forwards,
# one batch of 6 took 3). No-grad forwards, so memory is that of inference at this batch size.
EVA_BATCH_SIZE = 16
CORDA_METHOD = "ipm"  # instruction-previewed mode: the adapter gets the components the task data uses most

VARIANT_KEYS = ("adapter", "init_lora_weights", "warmup", "calibration_rows")
BUILTIN_VARIANTS = {
    "lora": {
        "adapter": "lora",
        "init_lora_weights": "default",
        "warmup": False,
        "calibration_rows": DEFAULT_CALIBRATION_ROWS,
    },
    "d2lora": {
        "adapter": "lora",
        "init_lora_weights": "default",
        "warmup": True,
        "calibration_rows": DEFAULT_CALIBRATION_ROWS,
    },
}

RESIDUAL_DIR = "residual"
CONFIG_FILE = "adapter_config.json"
INITIAL_FILE = "initial.safetensors"
TRAINED_FILE = "trained.safetensors"
RESIDUAL_RECORD = "residual.json"
# Set on a PeftModel whose base weights are residual: {"init", "config", "state_dict"} of A0/B0 (CPU).
RESIDUAL_ATTR = "_d2lora_residual"


class VariantError(ValueError):
    """A variant spec that names an unknown init, adapter or key; the message names the key."""


def init_names() -> list[str]:
    return list(INITS) + ["pissa_niter_<K>"]


def _peft_init_value(name: str):
    if name in INITS:
        return INITS[name]
    if PISSA_NITER.fullmatch(str(name)):
        return name
    raise VariantError(f"init_lora_weights: unknown init '{name}' (known: {', '.join(init_names())})")


def is_residual_init(name: str) -> bool:
    return name in RESIDUAL_INITS or bool(PISSA_NITER.fullmatch(str(name)))


def normalize_variant(variant: dict | None, init: str | None = None) -> dict:
    """A complete, checked variant spec; None means the built-in variant named `init`."""
    if variant is None:
        if init not in BUILTIN_VARIANTS:
            raise VariantError(
                f"unknown init '{init}' (built-ins: {', '.join(BUILTIN_VARIANTS)}; any other init "
                f"needs its variant spec with keys {', '.join(VARIANT_KEYS)})"
            )
        return dict(BUILTIN_VARIANTS[init])
    if not isinstance(variant, dict):
        raise VariantError(f"variant: expected a mapping with keys {', '.join(VARIANT_KEYS)}, got {variant!r}")
    adapter = variant.get("adapter", "lora")
    if adapter not in ADAPTERS:
        raise VariantError(f"adapter: unknown adapter '{adapter}' (known: {', '.join(ADAPTERS)})")
    out = dict(variant)
    out["adapter"] = adapter
    out["warmup"] = bool(variant.get("warmup", False))
    if adapter != "lora":
        # Built by d2lora.training.adaptive, which owns (and checks) its own keys.
        return out
    unknown = sorted(set(variant) - set(VARIANT_KEYS))
    if unknown:
        raise VariantError(f"{unknown[0]}: unknown key of a lora variant (known: {', '.join(VARIANT_KEYS)})")
    name = variant.get("init_lora_weights", "default")
    if name is True:
        name = "default"
    _peft_init_value(name)
    out["init_lora_weights"] = name
    rows = variant.get("calibration_rows", DEFAULT_CALIBRATION_ROWS)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise VariantError(f"calibration_rows: expected a positive integer, got {rows!r}")
    out["calibration_rows"] = rows
    return out


def is_residual(variant: dict) -> bool:
    return variant.get("adapter", "lora") == "lora" and is_residual_init(variant.get("init_lora_weights", "default"))


def needs_calibration(variant: dict) -> bool:
    return variant.get("adapter", "lora") == "lora" and variant.get("init_lora_weights") in DATA_INITS


# ---- calibration data -------------------------------------------------------------------------


def calibration_rows(rows: list[dict], variant: dict) -> list[dict]:
    """The rows EVA/CorDA read: the first `calibration_rows` training rows (none for other inits)."""
    if not needs_calibration(variant):
        return []
    return list(rows[: int(variant["calibration_rows"])])


def calibration_texts(rows: list[dict], tokenizer) -> list[str]:
    """prompt + chosen as the trainer sees them: one user and one assistant turn through the chat template."""
    texts = []
    for row in rows:
        messages = [*prompt_messages(row["prompt"]), {"role": "assistant", "content": row["chosen"]}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def _encode(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    encoded = [
        tokenizer(t, add_special_tokens=False, truncation=True, max_length=int(max_length))["input_ids"] for t in texts
    ]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"calibration text {empty[0]} is empty after tokenization")
    return encoded


def _device_of(model):
    return next(model.parameters()).device


# ---- fresh adapters ---------------------------------------------------------------------------


def _config(lora: dict, variant: dict):
    config = lora_config(lora)
    config.init_lora_weights = _peft_init_value(variant["init_lora_weights"])
    return config


def fresh_adapter(
    base_model,
    lora: dict,
    variant: dict,
    calibration_texts: list[str] | None = None,
    tokenizer=None,
    *,
    max_length: int = 1024,
    batch_size: int = EVA_BATCH_SIZE,
):
    """A trainable PeftModel (adapter "default") initialised by the variant's init.

    Residual inits rewrite `base_model`'s target weights in place (W_res = W - s·B0A0); the
    model then carries A0/B0 (attribute RESIDUAL_ATTR) for `save_adapter`'s conversion.
    """

    variant = normalize_variant(variant)
    if variant["adapter"] != "lora":
        raise VariantError(f"adapter: '{variant['adapter']}' adapters are built by d2lora.training.adaptive")
    name = variant["init_lora_weights"]
    config = _config(lora, variant)
    if needs_calibration(variant):
        if not calibration_texts:
            raise ValueError(f"init '{name}' needs calibration texts (the training rows) and got none")
        if tokenizer is None:
            raise ValueError(f"init '{name}' needs the tokenizer to encode its calibration texts")
        encoded = _encode(calibration_texts, tokenizer, max_length)
    if name == "eva":
        config.eva_config = EvaConfig(rho=EVA_RHO)
        model = get_peft_model(base_model, config)
        initialize_lora_eva_weights(model, _eva_dataloader(encoded, tokenizer, batch_size), show_progress_bar=False)
    elif name == "corda":
        config.corda_config = CordaConfig(corda_method=CORDA_METHOD)
        # preprocess_corda matches module names itself and does not know the "all-linear" shorthand.
        config = _maybe_include_all_linear_layers(config, base_model)
        config.target_modules = (
            sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        )
        preprocess_corda(base_model, config, run_model=_corda_runner(base_model, encoded))
        model = get_peft_model(base_model, config)
    else:
        model = get_peft_model(base_model, config)
    # Saved configs (and any adapter added later, such as DPO's "ref" copy) must not run the init
    # again: for the residual inits that would subtract a second decomposition from W_res.
    model.peft_config["default"].init_lora_weights = True
    # Their settings are spent; saved, they would only make every later load warn.
    model.peft_config["default"].eva_config = None
    model.peft_config["default"].corda_config = None
    if is_residual(variant):
        _remember_initial(model, name)
    return model


def _eva_dataloader(encoded: list[list[int]], tokenizer, batch_size: int):
    items = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in encoded]

    def collate(batch):
        return dict(tokenizer.pad(batch, return_tensors="pt", padding=True))  # EVA wants a plain dict

    return DataLoader(
        items,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )


def _corda_runner(model, encoded: list[list[int]]):
    def run_model():
        device = _device_of(model)
        for ids in encoded:  # one row per forward: CorDA's hook expects (tokens, features) per call
            model(input_ids=torch.tensor([ids], device=device))

    return run_model


def _remember_initial(model, name: str) -> None:
    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True
    setattr(
        model,
        RESIDUAL_ATTR,
        {
            "init": name,
            "config": config,
            "state_dict": _cpu_state(get_peft_model_state_dict(model, adapter_name="default")),
        },
    )


# ---- the residual base ------------------------------------------------------------------------


def _scaling(config) -> float:
    if (
        getattr(config, "use_rslora", False)
        or getattr(config, "rank_pattern", None)
        or getattr(config, "alpha_pattern", None)
    ):
        raise AdapterError("residual inits are supported with one rank and alpha for all layers, without rslora")
    return config.lora_alpha / config.r


def residualize(base_model, initial_state: dict, scaling: float) -> int:
    """W <- W - scaling·B0A0 for every layer of an initial adapter state dict (peft's keys).

    The same float32 expression as peft's pissa/olora/corda init, so the result is bit-identical
    to the residual base peft built when the init ran. Returns the number of layers changed.
    """

    prefix = "base_model.model."
    layers = 0
    with torch.no_grad():
        for key, a0 in initial_state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = (
                key[len(prefix) : -len(".lora_A.weight")] if key.startswith(prefix) else key[: -len(".lora_A.weight")]
            )
            b0 = initial_state[key.replace(".lora_A.weight", ".lora_B.weight")]
            module = base_model.get_submodule(path)
            weight = module.weight
            dtype = weight.dtype
            w = weight.data.to(torch.float32)
            b0 = b0.to(device=w.device, dtype=torch.float32)
            a0 = a0.to(device=w.device, dtype=torch.float32)
            if getattr(module, "fan_in_fan_out", False) or tuple(w.shape) != (b0.shape[0], a0.shape[1]):
                raise AdapterError(
                    f"{path}: initial adapter of shape {tuple(b0.shape)}x{tuple(a0.shape)} does not fit "
                    f"weight {tuple(w.shape)}"
                )
            weight.data = (w - scaling * b0 @ a0).to(dtype)
            layers += 1
    if layers == 0:
        raise AdapterError("the initial adapter holds no lora_A/lora_B weights")
    return layers


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _write_residual_files(config, initial: dict, folder: Path, trained: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(initial, str(folder / INITIAL_FILE), metadata={"format": "pt"})
    if trained is not None:
        save_file(trained, str(folder / TRAINED_FILE), metadata={"format": "pt"})


def _read_residual_files(folder: Path, which: str) -> tuple[dict, object]:
    for name in (CONFIG_FILE, which):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder}: no {name}; the residual base cannot be rebuilt")
    return load_file(str(folder / which)), LoraConfig.from_pretrained(str(folder))


def _peft_with_state(base_model, config, state: dict):
    """A trainable PeftModel ("default") of `config` holding exactly the A/B of `state`."""

    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.inference_mode = False
    model = get_peft_model(base_model, config)
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise AdapterError(
            f"adapter weights do not fit the model: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
    return model


def residual_from_initial(base_model, folder: str | Path, name: str):
    """The state right after a residual init, rebuilt from the ORIGINAL base and its saved A0/B0
    (`save_initial_adapter`), for resuming a checkpointed run without running the init again."""
    initial, config = _read_residual_files(Path(folder), INITIAL_FILE)
    residualize(base_model, initial, _scaling(config))
    model = _peft_with_state(base_model, config, initial)
    setattr(model, RESIDUAL_ATTR, {"init": name, "config": config, "state_dict": initial})
    return model


def save_initial_adapter(model, folder: str | Path) -> None:
    """A0/B0 (and the config) of a residual model, for `residual_from_initial`."""
    residual = getattr(model, RESIDUAL_ATTR, None)
    if residual is None:
        raise ValueError("this model's base weights are not residual: it has no initial adapter")
    _write_residual_files(residual["config"], residual["state_dict"], Path(folder))


# ---- saving and warm starts -------------------------------------------------------------------


def save_adapter(model, out_dir: str | Path, variant: dict) -> None:
    """Write the trained "default" adapter so that plain PeftModel.from_pretrained(ORIGINAL base,
    out_dir) gives the trained function; residual models also get `residual/` to continue from."""

    out_dir = Path(out_dir)
    residual = getattr(model, RESIDUAL_ATTR, None)
    if residual is None:
        if is_residual(normalize_variant(variant)):
            raise ValueError(
                f"init '{variant['init_lora_weights']}' rewrote the base weights, but the model carries "
                "no initial adapter to convert against"
            )
        model.save_pretrained(str(out_dir), selected_adapters=["default"], safe_serialization=True)
        return
    trained = _cpu_state(get_peft_model_state_dict(model, adapter_name="default"))
    _write_residual_files(residual["config"], residual["state_dict"], out_dir / RESIDUAL_DIR, trained)
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
            "scaling": _scaling(residual["config"]),
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


def check_warmup_matches(adapter_dir: str | Path, lora: dict, variant: dict, base_model_dir: str | Path) -> None:
    """Refuse a warm-up adapter made with another init (or calibration size), rank, alpha or base model."""
    adapter_dir = Path(adapter_dir)
    variant = normalize_variant(variant)
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
    made_with = _warmup_variant(adapter_dir) or BUILTIN_VARIANTS["d2lora"]
    want = variant["init_lora_weights"]
    got = made_with.get("init_lora_weights", "default")
    if got != want:
        raise AdapterError(
            f"{adapter_dir}: the warm-up adapter was initialised with init_lora_weights '{got}'; "
            f"this variant continues one made with '{want}'"
        )
    if want in DATA_INITS and int(made_with.get("calibration_rows", DEFAULT_CALIBRATION_ROWS)) != int(
        variant["calibration_rows"]
    ):
        raise AdapterError(
            f"{adapter_dir}: the warm-up adapter's {want} init read {made_with.get('calibration_rows')} "
            f"calibration rows; this variant asks for calibration_rows={variant['calibration_rows']}"
        )
    if is_residual_init(want) and record is None:
        raise AdapterError(
            f"{adapter_dir}: init '{want}' rewrites the base weights, but the warm-up folder has no "
            f"{RESIDUAL_DIR}/ to rebuild them from"
        )


def warm_started_adapter(
    base_model, adapter_dir: str | Path, lora: dict, variant: dict | None, base_model_dir: str | Path
):
    """A trainable PeftModel whose function is the warm-up's trained function: for residual inits
    on W_res rebuilt from the warm-up's A0/B0, with the warm-up's trained A/B."""

    adapter_dir = Path(adapter_dir)
    variant = normalize_variant(variant if variant is not None else BUILTIN_VARIANTS["d2lora"])
    check_warmup_matches(adapter_dir, lora, variant, base_model_dir)
    record = residual_record(adapter_dir)
    if record is None:
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)
    root = adapter_dir / RESIDUAL_DIR
    initial, config = _read_residual_files(root, INITIAL_FILE)
    trained, _ = _read_residual_files(root, TRAINED_FILE)
    residualize(base_model, initial, _scaling(config))
    model = _peft_with_state(base_model, config, trained)
    setattr(model, RESIDUAL_ATTR, {"init": record["init_lora_weights"], "config": config, "state_dict": initial})
    return model
