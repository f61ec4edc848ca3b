"""Training entry points called by the workflow's warm-up and adaptation rules.

Both write into a staging folder beside the destination and rename it at the end, so a killed
job never leaves an adapter folder that a later rule would take as finished.

With `checkpoint_steps` > 0 (config `training.checkpoint_steps`) the Trainer saves a checkpoint
(adapter, optimizer, scheduler, RNG states, step) every that many steps into
`<out_dir>.checkpoints/`, BESIDE the output: Snakemake (`--rerun-incomplete`) deletes a killed
job's declared output, never this folder. A rerun resumes from the newest complete checkpoint
when `run.json` there describes the same run (same data, base model, hyperparameters, seed,
device kind and library versions); otherwise the folder is discarded and training starts over.
The folder is removed once the adapter is in place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from d2lora.data.prepare import subset
from d2lora.io import read_json, read_jsonl, sha256_file, staged_dir, write_json, write_text
from d2lora.provenance import MANIFEST_NAME, build_manifest, package_versions, write_manifest
from d2lora.models import load_model, load_tokenizer, resolve_device
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


CHECKPOINT_SUFFIX = ".checkpoints"
CHECKPOINT_RUN_FILE = "run.json"
# Written by a callback after the Trainer has finished writing a checkpoint folder (the Trainer
# writes in place, trainer_state.json last): a folder without it was cut off mid-write.
COMPLETE_MARKER = "d2lora_checkpoint_complete"
FINGERPRINT_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate")


def checkpoint_dir_for(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + CHECKPOINT_SUFFIX)


def _checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
        return None
    return int(name[len("checkpoint-"):])


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder; incomplete ones (cut off mid-write) are removed."""
    ckpt_dir = Path(ckpt_dir)
    complete = []
    for folder in sorted(ckpt_dir.glob("checkpoint-*")):
        step = _checkpoint_step(folder)
        if step is None or not folder.is_dir():
            continue
        if (folder / COMPLETE_MARKER).is_file():
            complete.append((step, folder))
        else:
            shutil.rmtree(folder)
    return max(complete)[1] if complete else None


def _mark_complete_callback():
    from transformers import TrainerCallback

    class MarkCheckpointComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_text(folder / COMPLETE_MARKER, f"{state.global_step}\n")

    return MarkCheckpointComplete()


def _fingerprint(record: dict, inputs: dict) -> dict:
    """What must match for a checkpoint to be resumed: the run's settings, inputs and libraries."""
    from d2lora.provenance import input_record

    run = {k: record[k] for k in ("phase", "method", "init", "n", "seed", "hparams", "lora", "device") if k in record}
    run["inputs"] = {name: input_record(path) for name, path in sorted(inputs.items()) if path is not None}
    versions = package_versions(FINGERPRINT_PACKAGES)
    run["versions"] = {name: versions[name] for name in FINGERPRINT_PACKAGES}
    text = json.dumps(run, sort_keys=True, default=str)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "run": json.loads(text)}


@contextlib.contextmanager
def _trainer_dir(out_dir: Path, checkpoint_steps: int, fingerprint: dict):
    """(Trainer output_dir, checkpoint to resume from or None); the checkpoint folder goes on success."""
    ckpt_dir = checkpoint_dir_for(out_dir)
    if checkpoint_steps <= 0:
        with tempfile.TemporaryDirectory() as scratch:
            yield scratch, None
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return
    run_file = ckpt_dir / CHECKPOINT_RUN_FILE
    if ckpt_dir.exists():
        try:
            same = read_json(run_file).get("sha256") == fingerprint["sha256"]
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"train: discarding {ckpt_dir}: its checkpoints belong to another run", file=sys.stderr)
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not run_file.is_file():
        write_json(run_file, fingerprint)
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        print(f"train: resuming from {resume}", file=sys.stderr)
    try:
        yield str(ckpt_dir), resume
    except BaseException:
        # Keep the folder only if it holds work to resume (a refused run leaves nothing behind).
        if latest_checkpoint(ckpt_dir) is None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _restore_token_count(trainer, checkpoint: Path) -> None:
    """TRL's running token count (SFT, DPO) is not in the checkpoint; restart it where it stopped,
    so the logged `num_tokens` (and `train_tokens`) equal those of an uninterrupted run."""
    if not hasattr(trainer, "_total_train_tokens"):
        return
    history = read_json(checkpoint / "trainer_state.json").get("log_history", [])
    seen = [entry["num_tokens"] for entry in history if "num_tokens" in entry]
    if seen:
        trainer._total_train_tokens = int(seen[-1])


def _train_and_save(trainer, model, out_dir: Path, record: dict, resume_from: Path | None = None,
                    inputs: dict | None = None) -> dict:
    start = time.perf_counter()
    record["resumed_from_step"] = _checkpoint_step(resume_from) if resume_from is not None else None
    if resume_from is not None:
        _restore_token_count(trainer, resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    record["train_seconds"] = round(time.perf_counter() - start, 3)
    # The mean of the per-step losses (logging_steps=1). The Trainer's own `training_loss` counts
    # only the steps of the last session after a resume; this is the same with or without one.
    step_losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    record["train_loss"] = sum(step_losses) / len(step_losses) if step_losses else float(result.training_loss)
    record["global_steps"] = int(result.global_step)
    record["log_history"] = trainer.state.log_history
    # TRL logs a running token count for SFT and DPO (not ORPO); 0 means "not reported".
    record["train_tokens"] = int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0))
    with staged_dir(out_dir) as staging:
        model.save_pretrained(str(staging), selected_adapters=["default"], safe_serialization=True)
        record["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        write_json(staging / "training.json", record)
        params = {k: record.get(k) for k in ("phase", "method", "init", "n", "seed", "hparams", "lora")}
        write_manifest(staging / MANIFEST_NAME,
                       build_manifest("training", inputs or {}, staging, params, device=record.get("device")))
    return record


def _dataset(rows: list[dict], method: str):
    from datasets import Dataset

    return Dataset.from_list(conversational(rows, method))


def _fit(method: str, model, tokenizer, rows: list[dict], hp: dict, out_dir: Path, seed: int, device: str,
         record: dict, inputs: dict, checkpoint_steps: int) -> dict:
    checkpoint_steps = int(checkpoint_steps or 0)
    record["checkpoint_steps"] = checkpoint_steps
    with _trainer_dir(out_dir, checkpoint_steps, _fingerprint(record, inputs)) as (trainer_dir, resume_from):
        callbacks = [_mark_complete_callback()] if checkpoint_steps > 0 else None
        trainer = build_trainer(method, model, tokenizer, _dataset(rows, method), hp, trainer_dir, seed, device == "cpu",
                                checkpoint_steps=checkpoint_steps, callbacks=callbacks)
        _check_rows_kept(trainer, rows, record, hp)
        return _train_and_save(trainer, model, out_dir, record, resume_from, inputs)


def _check_rows_kept(trainer, rows: list[dict], record: dict, hp: dict) -> None:
    """TRL silently drops rows whose prompt alone fills max_length (SFT, DPO). An adaptation cell
    would then train on fewer than n rows: refused. The warm-up records how many it kept."""
    kept = len(trainer.train_dataset)
    record["rows_trained"] = kept
    if kept == len(rows):
        return
    key = "training.warmup" if record["phase"] == "warmup" else f"training.adapt.{record['method']}"
    message = (f"{key}.max_length: {len(rows) - kept} of {len(rows)} training rows have a prompt of "
               f"max_length={hp.get('max_length', 1024)} tokens or more, and TRL drops them")
    if record["phase"] == "adapt" or kept == 0:
        raise ValueError(f"{message}; the cell would not train on the n rows it names. Raise max_length")
    print(f"train: warning: {message}; warm-up trains on the other {kept}", file=sys.stderr)


def run_warmup(model_dir, train_path, lora: dict, hp: dict, out_dir, seed: int, device: str = "auto",
               checkpoint_steps: int = 0) -> dict:
    """Phase 1 of D2LoRA: SFT a fresh LoRA adapter on prompt + chosen of the general set."""
    set_seed(seed)
    device = resolve_device(device)
    rows = read_jsonl(train_path)
    tokenizer = load_tokenizer(model_dir)
    model = fresh_adapter(load_model(model_dir, device=device), lora)
    record = {"phase": "warmup", "method": "sft", "rows": len(rows), "seed": seed, "hparams": hp, "lora": lora,
              "train_data_sha256": sha256_file(train_path), "device": device}
    inputs = {"model": model_dir, "train_data": train_path}
    return _fit("sft", model, tokenizer, rows, hp, Path(out_dir), seed, device, record, inputs, checkpoint_steps)


def run_adaptation(model_dir, train_path, method: str, init: str, n: int, lora: dict, hp: dict, out_dir, seed: int,
                   warmup_dir=None, device: str = "auto", checkpoint_steps: int = 0) -> dict:
    """Phase 2: train on the first n task rows, from a fresh adapter (lora) or the warm-up adapter (d2lora)."""
    if n <= 0:
        raise ValueError(f"adaptation with n={n}: n = 0 cells train nothing and are evaluated directly")
    set_seed(seed)
    device = resolve_device(device)
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
    record = {"phase": "adapt", "method": method, "init": init, "n": n, "seed": seed, "hparams": hp, "lora": lora,
              "train_ids": [r["id"] for r in rows], "train_data_sha256": sha256_file(train_path), "device": device}
    inputs = {"model": model_dir, "train_data": train_path, "warmup_adapter": warmup_dir if init == "d2lora" else None}
    print(f"adapt: {method}/{init} n={n} seed={seed} on {device}", file=sys.stderr)
    return _fit(method, model, tokenizer, rows, hp, Path(out_dir), seed, device, record, inputs, checkpoint_steps)
