"""The init axis: LoRA adapters initialised by peft's own `init_lora_weights` variants (the spec that
names one: d2lora.training.variants; saving and warm starts: d2lora.training.warm_start).

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
from pathlib import Path

import torch
from peft import (
    EvaConfig,
    LoraConfig,
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
from d2lora.settings import LoraShape
from d2lora.training.adapters import AdapterError, lora_config
from d2lora.training.variants import Variant, VariantError, peft_init_value

EVA_RHO = 1.0  # no rank redistribution: every layer keeps rank r, so only the init differs from LoRA
# EVA's incremental SVD is checked for convergence after every batch, cycling over the rows until
# it converges; larger batches converge in fewer forwards (6 rows: batches of 2 took 10 forwards,
# one batch of 6 took 3). No-grad forwards, so memory is that of inference at this batch size.
EVA_BATCH_SIZE = 16
CORDA_METHOD = "ipm"  # instruction-previewed mode: the adapter gets the components the task data uses most

RESIDUAL_DIR = "residual"
CONFIG_FILE = "adapter_config.json"
INITIAL_FILE = "initial.safetensors"
TRAINED_FILE = "trained.safetensors"
RESIDUAL_RECORD = "residual.json"
# Set on a PeftModel whose base weights are residual: {"init", "config", "state_dict"} of A0/B0 (CPU).
RESIDUAL_ATTR = "_d2lora_residual"


# ---- calibration data -------------------------------------------------------------------------


def calibration_rows(rows: list[dict], variant: Variant) -> list[dict]:
    """The rows EVA/CorDA read: the first `calibration_rows` training rows (none for other inits)."""
    if not variant.needs_calibration:
        return []
    return list(rows[: variant.calibration_rows])


def calibration_texts(rows: list[dict], tokenizer) -> list[str]:
    """prompt + chosen as the trainer sees them: one user and one assistant turn through the chat template."""
    texts = []
    for row in rows:
        messages = [*prompt_messages(row["prompt"]), {"role": "assistant", "content": row["chosen"]}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def calibration_for(
    rows: list[dict], variant: Variant, tokenizer, phase: str, max_length: int
) -> tuple[list[str], dict | None]:
    """(texts, record) of the rows an EVA/CorDA init reads; ([], None) for inits that read none."""
    chosen = calibration_rows(rows, variant)
    if not chosen:
        return [], None
    record = {
        "phase": phase,
        "rows": len(chosen),
        "calibration_rows": variant.calibration_rows,
        "ids": [r["id"] for r in chosen],
        "max_length": max_length,
        "format": "prompt + chosen through the tokenizer's chat template (user, assistant)",
    }
    if variant.init_lora_weights == "eva":
        record["batch_size"] = EVA_BATCH_SIZE
    return calibration_texts(chosen, tokenizer), record


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


def _config(lora: LoraShape | dict, variant: Variant):
    config = lora_config(lora)
    config.init_lora_weights = peft_init_value(variant.init_lora_weights)
    return config


def fresh_adapter(
    base_model,
    lora: LoraShape | dict,
    variant: Variant | dict,
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
    variant = Variant.of(variant)
    if variant.adapter != "lora":
        raise VariantError(f"adapter: '{variant.adapter}' adapters are built by d2lora.training.adaptive")
    name = variant.init_lora_weights
    config = _config(lora, variant)
    if variant.needs_calibration:
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
    if variant.residual:
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
            "state_dict": cpu_state(get_peft_model_state_dict(model, adapter_name="default")),
        },
    )


# ---- the residual base ------------------------------------------------------------------------


def scaling_of(config) -> float:
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


def cpu_state(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def write_residual_files(config, initial: dict, folder: Path, trained: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(initial, str(folder / INITIAL_FILE), metadata={"format": "pt"})
    if trained is not None:
        save_file(trained, str(folder / TRAINED_FILE), metadata={"format": "pt"})


def read_residual_files(folder: Path, which: str) -> tuple[dict, object]:
    for name in (CONFIG_FILE, which):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder}: no {name}; the residual base cannot be rebuilt")
    return load_file(str(folder / which)), LoraConfig.from_pretrained(str(folder))


def peft_with_state(base_model, config, state: dict):
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
    initial, config = read_residual_files(Path(folder), INITIAL_FILE)
    residualize(base_model, initial, scaling_of(config))
    model = peft_with_state(base_model, config, initial)
    setattr(model, RESIDUAL_ATTR, {"init": name, "config": config, "state_dict": initial})
    return model


def save_initial_adapter(model, folder: str | Path) -> None:
    """A0/B0 (and the config) of a residual model, for `residual_from_initial`."""
    residual = getattr(model, RESIDUAL_ATTR, None)
    if residual is None:
        raise ValueError("this model's base weights are not residual: it has no initial adapter")
    write_residual_files(residual["config"], residual["state_dict"], Path(folder))
