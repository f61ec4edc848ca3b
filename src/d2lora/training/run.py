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

The init variant (d2lora.training.variants and inits: peft's init_lora_weights default, gaussian, PiSSA, OLoRA,
EVA, CorDA, with or without the warm-up) is recorded in training.json and in the checkpoint
fingerprint. Inits that rewrite the base weights (W_res = W - s·B0A0) keep A0/B0 in
`<checkpoints>/initial_adapter/`, written before the first step: a resumed run rebuilds the same
residual base from the original weights and those (bit-identical to the one peft built), then the
Trainer loads the checkpoint's A/B on top.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import set_seed as hf_set_seed

from d2lora.cost import (
    base_parameter_count,
    parameter_count,
    peak_memory_mb,
    reset_peak_memory,
    sequence_tokens,
    synchronize,
)
from d2lora.data.prepare import subset
from d2lora.io import (
    read_json,
    read_jsonl,
    sha256_file,
    sha256_tree,
    staged_dir,
    write_json,
)
from d2lora.manifests import MANIFEST_NAME, build_manifest, write_manifest
from d2lora.models import load_model, load_tokenizer, resolve_device
from d2lora.precision import resolve_bf16_flag
from d2lora.settings import LoraShape, TrainingHparams
from d2lora.training import fast_paths, inits, warm_start
from d2lora.training.adaptive import DEFAULTS, adapter_report, adaptive_adapter
from d2lora.training.checkpoints import (
    INITIAL_ADAPTER_DIR,
    checkpoint_step,
    mark_complete_callback,
    restore_token_count,
    run_fingerprint,
    trainer_dir,
)
from d2lora.training.trainers import (
    build_trainer,
    choose_checkpointing,
    count_micro_batches,
    dropout_while_training,
    trl_dataset,
)
from d2lora.training.variants import Variant, VariantError


def _train_and_save(
    trainer,
    model,
    *,
    hp: TrainingHparams,
    out_dir: Path,
    record: dict,
    resume_from: Path | None,
    inputs: dict,
    variant: Variant,
) -> dict:
    device = record["device"]
    reset_peak_memory(device)
    start = time.perf_counter()
    record["resumed_from_step"] = checkpoint_step(resume_from) if resume_from is not None else None
    if resume_from is not None:
        restore_token_count(trainer, resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    synchronize(device)
    record["train_seconds"] = round(time.perf_counter() - start, 3)
    record["peak_gpu_memory_mb"] = peak_memory_mb(device)
    # The mean of the per-step losses (logging_steps=1). The Trainer's own `training_loss` counts
    # only the steps of the last session after a resume; this is the same with or without one.
    step_losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    record["train_loss"] = sum(step_losses) / len(step_losses) if step_losses else float(result.training_loss)
    record["global_steps"] = int(result.global_step)
    record["log_history"] = trainer.state.log_history
    # Tokens the policy read: the tokenized rows (prompt + answer, both answers for DPO/ORPO,
    # each capped at max_length) times epochs; the same count for every method, unlike TRL's own
    # running `num_tokens` (SFT and DPO only; kept as trl_num_tokens).
    record["sequence_tokens_per_epoch"] = sequence_tokens(trainer.train_dataset, hp.max_length)
    record["train_tokens"] = int(round(record["sequence_tokens_per_epoch"] * float(hp.epochs)))
    record["trl_num_tokens"] = int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0))
    record["model_parameters"] = base_parameter_count(model)
    record["trainable_parameters"] = parameter_count(model, trainable=True)
    if variant.adapter != "lora":
        record["adapter"] = adapter_report(model)
    with staged_dir(out_dir) as staging:
        warm_start.save_adapter(model, staging, variant)
        # Relative paths: residual inits also write residual/ (A0/B0, trained A/B, config).
        record["files"] = sha256_tree(staging)
        write_json(staging / "training.json", record)
        params = {
            k: record.get(k)
            for k in ("phase", "method", "init", "variant", "n", "seed", "hparams", "lora", "precision")
        }
        write_manifest(
            staging / MANIFEST_NAME,
            build_manifest("training", inputs, staging, params, device=record["device"]),
        )
    return record


def _fit(
    method: str,
    build_model,
    *,
    tokenizer,
    rows: list[dict],
    hp: TrainingHparams,
    out_dir: Path,
    seed: int,
    device: str,
    record: dict,
    inputs: dict,
    checkpoint_steps: int,
    variant: Variant,
    fresh_residual: bool,
) -> dict:
    """build_model(initial_dir) -> (PeftModel, extra callbacks); initial_dir is None except when a
    checkpointed run of a fresh residual init resumes (its saved A0/B0)."""
    checkpoint_steps = int(checkpoint_steps or 0)
    record["checkpoint_steps"] = checkpoint_steps
    with trainer_dir(out_dir, checkpoint_steps, run_fingerprint(record, inputs)) as (output_dir, resume_from):
        initial_dir = Path(output_dir) / INITIAL_ADAPTER_DIR if checkpoint_steps > 0 and fresh_residual else None
        if initial_dir is not None and resume_from is not None:
            if not (initial_dir / inits.INITIAL_FILE).is_file():
                raise RuntimeError(
                    f"{resume_from}: a checkpoint of a residual init without its {initial_dir}; "
                    f"delete {Path(output_dir)} to start over"
                )
            model, extra_callbacks = build_model(initial_dir)
        else:
            model, extra_callbacks = build_model(None)
            if initial_dir is not None:
                with staged_dir(initial_dir) as staging:
                    inits.save_initial_adapter(model, staging)
        record["base_weights_dtype"] = _frozen_dtype(model)
        record["fast_paths"] = fast_paths.apply(model, hp, steps=hp.optimizer_steps(len(rows)))
        # The adaptive adapters' callbacks first: they write their state into a checkpoint before
        # the marker says the checkpoint is complete.
        callbacks = list(extra_callbacks or []) + ([mark_complete_callback()] if checkpoint_steps > 0 else [])
        started = time.perf_counter()
        trainer = build_trainer(
            method,
            model,
            tokenizer,
            trl_dataset(rows, method),
            hp=hp,
            output_dir=output_dir,
            seed=seed,
            use_cpu=device == "cpu",
            checkpoint_steps=checkpoint_steps,
            callbacks=callbacks or None,
            config_key=_config_key(record),
        )
        synchronize(device)
        # Tokenizing the rows, and with precompute_reference the reference pass over every pair.
        record["trainer_setup_seconds"] = round(time.perf_counter() - started, 3)
        record["checkpointing"] = choose_checkpointing(trainer, method, hp)
        count_micro_batches(trainer, method, into=record["checkpointing"])
        record["dropout"] = dropout_while_training(model, method, hp)
        _check_rows_kept(trainer, rows, record, hp.max_length)
        return _train_and_save(
            trainer,
            model,
            hp=hp,
            out_dir=out_dir,
            record=record,
            resume_from=resume_from,
            inputs=inputs,
            variant=variant,
        )


def _frozen_dtype(model) -> str | None:
    """The dtype the frozen base weights were loaded in (base_dtype as it took effect)."""
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    return None if frozen is None else str(frozen.dtype).removeprefix("torch.")


def _config_key(record: dict) -> str:
    """The config section whose settings trained this record's phase, as errors name it."""
    return "training.warmup" if record["phase"] == "warmup" else f"training.adapt.{record['method']}"


def _check_rows_kept(trainer, rows: list[dict], record: dict, max_length: int) -> None:
    """TRL silently drops rows whose prompt alone fills max_length (SFT, DPO). An adaptation cell
    would then train on fewer than n rows: refused. The warm-up records how many it kept."""
    kept = len(trainer.train_dataset)
    record["rows_trained"] = kept
    if kept == len(rows):
        return
    key = _config_key(record)
    message = (
        f"{key}.max_length: {len(rows) - kept} of {len(rows)} training rows have a prompt of "
        f"max_length={max_length} tokens or more, and TRL drops them"
    )
    if record["phase"] == "adapt" or kept == 0:
        raise ValueError(f"{message}; the cell would not train on the n rows it names. Raise max_length")
    print(f"train: warning: {message}; warm-up trains on the other {kept}", file=sys.stderr)


def _adaptive_adapter(base, lora: LoraShape, variant: Variant, total_steps: int, seed: int):
    """AdaLoRA or Dynamic LoRA (d2lora.training.adaptive): the variant's `options` plus, for
    Dynamic LoRA, the run's seed (it draws the A rows of the rank it grants)."""
    options = dict(variant.options)
    if "seed" in DEFAULTS.get(variant.adapter, {}):
        options.setdefault("seed", seed)
    return adaptive_adapter(base, lora, {"adapter": variant.adapter, **options}, total_steps)


def _check_reference(method: str, hp: TrainingHparams, variant: Variant) -> None:
    if method == "dpo" and hp.reference == "base" and variant.residual:
        raise ValueError(
            f"training.adapt.dpo.reference: 'base' computes reference log-probs with the adapter disabled, but init "
            f"'{variant.init_lora_weights}' trains on a residual base (W - s·B0A0), not the original model; "
            "use 'initial_policy'"
        )


def _resolve_precision(hp: TrainingHparams, device: str, variant: Variant) -> tuple[TrainingHparams, dict]:
    """The hyperparameters with `bf16` resolved for this device (auto: native bf16 or not) and the
    frozen base's dtype resolved from it (base_dtype auto), and why."""
    precision = resolve_bf16_flag(hp.bf16, device)
    record = precision.record()
    setting = hp.base_dtype
    if setting != "auto":
        base_dtype, why = setting, "set in the config"
    elif not precision.bf16:
        base_dtype, why = "float32", "bf16 autocast is off"
    elif variant.residual:
        base_dtype, why = "float32", f"init '{variant.init_lora_weights}' rewrites the base weights (W - s*B0A0)"
    else:
        base_dtype, why = "bfloat16", "bf16 autocast casts every base weight to bf16 for its matmul"
    record["base_dtype"] = {"setting": setting, "dtype": base_dtype, "reason": why}
    return hp.replace(bf16=precision.bf16, base_dtype=base_dtype), record


def run_warmup(
    model_dir,
    train_path,
    *,
    lora: LoraShape | dict,
    hp: TrainingHparams | dict,
    out_dir,
    seed: int,
    device: str = "auto",
    checkpoint_steps: int = 0,
    variant: Variant | dict | None = None,
) -> dict:
    """Phase 1 of D2LoRA: SFT a fresh LoRA adapter (initialised by the variant's init) on prompt + chosen
    of the general set. variant None: the built-in "d2lora" (peft's default init). lora and hp: the
    config's blocks (training.lora, training.warmup) or their settings."""
    lora = LoraShape.of(lora, "training.lora")
    variant = Variant.of(variant, "d2lora")
    if variant.adapter != "lora":
        raise VariantError(f"adapter: the warm-up trains a lora adapter, not '{variant.adapter}'")
    variant = variant.replace(warmup=True)
    hf_set_seed(seed)
    device = resolve_device(device)
    hp, precision = _resolve_precision(TrainingHparams.of(hp, "training.warmup"), device, variant)
    rows = read_jsonl(train_path)
    tokenizer = load_tokenizer(model_dir)
    texts, calibration = inits.calibration_for(rows, variant, tokenizer, "warmup", hp.max_length)
    record = {
        "phase": "warmup",
        "method": "sft",
        "variant": variant.as_dict(),
        "rows": len(rows),
        "seed": seed,
        "hparams": hp.as_dict(),
        "lora": lora.as_dict(),
        "calibration": calibration,
        "train_data_sha256": sha256_file(train_path),
        "device": device,
        "precision": precision,
    }

    def build_model(initial_dir):
        base = load_model(model_dir, dtype=hp.base_dtype, device=device)
        if initial_dir is not None:
            return inits.residual_from_initial(base, initial_dir, variant.init_lora_weights), []
        return inits.fresh_adapter(base, lora, variant, texts, tokenizer, max_length=hp.max_length), []

    return _fit(
        "sft",
        build_model,
        tokenizer=tokenizer,
        rows=rows,
        hp=hp,
        out_dir=Path(out_dir),
        seed=seed,
        device=device,
        record=record,
        inputs={"model": model_dir, "train_data": train_path},
        checkpoint_steps=checkpoint_steps,
        variant=variant,
        fresh_residual=variant.residual,
    )


def run_adaptation(
    model_dir,
    train_path,
    *,
    method: str,
    init: str,
    n: int,
    lora: LoraShape | dict,
    hp: TrainingHparams | dict,
    out_dir,
    seed: int,
    warmup_dir=None,
    device: str = "auto",
    checkpoint_steps: int = 0,
    variant: Variant | dict | None = None,
) -> dict:
    """Phase 2: train on the first n task rows, from a fresh adapter or the warm-up adapter.

    `init` names the cell's init (the results path); `variant` is its spec (d2lora.training.variants),
    None for the built-ins "lora" (fresh, peft's default init) and "d2lora" (the default warm-up)."""
    if n <= 0:
        raise ValueError(f"adaptation with n={n}: n = 0 cells train nothing and are evaluated directly")
    lora = LoraShape.of(lora, "training.lora")
    variant = Variant.of(variant, init)
    hf_set_seed(seed)
    device = resolve_device(device)
    hp, precision = _resolve_precision(TrainingHparams.of(hp, f"training.adapt.{method}"), device, variant)
    rows = subset(read_jsonl(train_path), n)
    _check_reference(method, hp, variant)
    warm = variant.warmup
    if warm:
        if warmup_dir is None:
            raise ValueError(f"init '{init}' needs the warm-up adapter")
        if variant.adapter != "lora":
            raise VariantError(f"adapter: '{variant.adapter}' cannot continue a warm-up adapter (warmup: true)")
        warm_start.check_warmup_matches(warmup_dir, lora, variant, model_dir)
    tokenizer = load_tokenizer(model_dir)
    texts, calibration = ([], None) if warm else inits.calibration_for(rows, variant, tokenizer, "adapt", hp.max_length)
    if warm and variant.needs_calibration:
        calibration = dict(
            read_json(Path(warmup_dir) / "training.json").get("calibration") or {}, from_warmup=str(warmup_dir)
        )
    record = {
        "phase": "adapt",
        "method": method,
        "init": init,
        "variant": variant.as_dict(),
        "n": n,
        "seed": seed,
        "hparams": hp.as_dict(),
        "lora": lora.as_dict(),
        "calibration": calibration,
        "train_ids": [r["id"] for r in rows],
        "train_data_sha256": sha256_file(train_path),
        "device": device,
        "precision": precision,
    }
    if warm:
        record["residual_base"] = warm_start.residual_record(warmup_dir)

    def build_model(initial_dir):
        base = load_model(model_dir, dtype=hp.base_dtype, device=device)
        if variant.adapter != "lora":
            return _adaptive_adapter(base, lora, variant, hp.optimizer_steps(len(rows)), seed)
        if warm:
            return warm_start.warm_started_adapter(base, warmup_dir, lora, variant, model_dir), []
        if initial_dir is not None:
            return inits.residual_from_initial(base, initial_dir, variant.init_lora_weights), []
        return inits.fresh_adapter(base, lora, variant, texts, tokenizer, max_length=hp.max_length), []

    print(f"adapt: {method}/{init} n={n} seed={seed} on {device}", file=sys.stderr)
    return _fit(
        method,
        build_model,
        tokenizer=tokenizer,
        rows=rows,
        hp=hp,
        out_dir=Path(out_dir),
        seed=seed,
        device=device,
        record=record,
        inputs={"model": model_dir, "train_data": train_path, "warmup_adapter": warmup_dir if warm else None},
        checkpoint_steps=checkpoint_steps,
        variant=variant,
        fresh_residual=variant.residual and not warm,
    )
