"""Training entry points called by the workflow's warm-up and adaptation rules.

Both write into a staging folder beside the destination and rename it at the end, so a killed
job never leaves an adapter folder that a later rule would take as finished.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from d2lora.data.prepare import subset
from d2lora.io import read_jsonl, sha256_file, write_json
from d2lora.models import load_model, load_tokenizer
from d2lora.training.adapters import fresh_adapter, warm_started_adapter
from d2lora.training.trainers import build_trainer

PREFERENCE_METHODS = ("dpo", "orpo")


def conversational(rows: list[dict], method: str) -> list[dict]:
    """Canonical pairs → TRL's conversational prompt/completion or prompt/chosen/rejected rows."""
    out = []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        if method in PREFERENCE_METHODS:
            if row.get("rejected") is None:
                raise ValueError(f"row {row['id']}: method '{method}' needs a rejected answer and this row has none")
            out.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            })
        else:
            out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": row["chosen"]}]})
    return out


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def _train_and_save(trainer, model, out_dir: Path, record: dict) -> dict:
    start = time.perf_counter()
    result = trainer.train()
    record["train_seconds"] = round(time.perf_counter() - start, 3)
    record["train_loss"] = float(result.training_loss)
    record["global_steps"] = int(result.global_step)
    record["log_history"] = trainer.state.log_history
    # TRL logs a running token count for SFT and DPO (not ORPO); 0 means "not reported".
    record["train_tokens"] = int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(staging, 0o755)
    try:
        model.save_pretrained(str(staging), selected_adapters=["default"], safe_serialization=True)
        record["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        write_json(staging / "training.json", record)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return record


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _dataset(rows: list[dict], method: str):
    from datasets import Dataset

    return Dataset.from_list(conversational(rows, method))


def run_warmup(model_dir, train_path, lora: dict, hp: dict, out_dir, seed: int, device: str = "auto") -> dict:
    """Phase 1 of D2LoRA: SFT a fresh LoRA adapter on prompt + chosen of the general set."""
    set_seed(seed)
    device = _device(device)
    rows = read_jsonl(train_path)
    tokenizer = load_tokenizer(model_dir)
    model = fresh_adapter(load_model(model_dir, device=device), lora)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer("sft", model, tokenizer, _dataset(rows, "sft"), hp, scratch, seed, device == "cpu")
        record = {"phase": "warmup", "method": "sft", "rows": len(rows), "seed": seed, "hparams": hp, "lora": lora,
                  "train_data_sha256": sha256_file(train_path), "device": device}
        return _train_and_save(trainer, model, Path(out_dir), record)


def run_adaptation(model_dir, train_path, method: str, init: str, n: int, lora: dict, hp: dict, out_dir, seed: int,
                   warmup_dir=None, device: str = "auto") -> dict:
    """Phase 2: train on the first n task rows, from a fresh adapter (lora) or the warm-up adapter (d2lora)."""
    if n <= 0:
        raise ValueError(f"adaptation with n={n}: n = 0 cells train nothing and are evaluated directly")
    set_seed(seed)
    device = _device(device)
    rows = subset(read_jsonl(train_path), n)
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, device=device)
    if init == "d2lora":
        if warmup_dir is None:
            raise ValueError("init 'd2lora' needs the warm-up adapter")
        model = warm_started_adapter(base, warmup_dir, lora, model_dir)
    elif init == "lora":
        model = fresh_adapter(base, lora)
    else:
        raise ValueError(f"unknown init '{init}' (known: lora, d2lora)")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(method, model, tokenizer, _dataset(rows, method), hp, scratch, seed, device == "cpu")
        record = {"phase": "adapt", "method": method, "init": init, "n": n, "seed": seed, "hparams": hp, "lora": lora,
                  "train_ids": [r["id"] for r in rows], "train_data_sha256": sha256_file(train_path), "device": device}
        print(f"adapt: {method}/{init} n={n} seed={seed} on {device}", file=sys.stderr)
        return _train_and_save(trainer, model, Path(out_dir), record)
