"""The one place that touches TRL's trainer API, so a TRL upgrade is one file to fix.

TRL 1.16: SFTTrainer/DPOTrainer live at top level, ORPO moved to `trl.experimental.orpo`.
Given a PeftModel that already carries an adapter, DPOTrainer copies it into a frozen adapter
named "ref" and uses that as the reference policy (the policy as adaptation starts).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
import trl.trainer.dpo_trainer as dpo_module
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from d2lora.data.schema import prompt_messages
from d2lora.grid import PREFERENCE_METHODS
from d2lora.settings import TrainingHparams

try:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
except ImportError:  # older TRL kept ORPO at top level
    from trl import ORPOConfig, ORPOTrainer

REF_ADAPTER = "ref"


def conversational(rows: list[dict], method: str) -> list[dict]:
    """Canonical pairs → TRL's conversational prompt/completion or prompt/chosen/rejected rows."""
    out = []
    for row in rows:
        prompt = prompt_messages(row["prompt"])
        if method in PREFERENCE_METHODS:
            if row.get("rejected") is None:
                raise ValueError(f"row {row['id']}: method '{method}' needs a rejected answer and this row has none")
            out.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}],
                }
            )
        else:
            out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": row["chosen"]}]})
    return out


def trl_dataset(rows: list[dict], method: str) -> Dataset:
    return Dataset.from_list(conversational(rows, method))


def _common_args(
    hp: TrainingHparams, *, output_dir: str, seed: int, use_cpu: bool, checkpoint_steps: int
) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum,
        num_train_epochs=float(hp.epochs),
        learning_rate=float(hp.learning_rate),
        lr_scheduler_type=hp.scheduler,
        # transformers 5 folded warmup_ratio into warmup_steps: a value below 1 is a ratio.
        warmup_steps=float(hp.warmup_ratio),
        max_length=hp.max_length,
        # "auto" is resolved for the device before a trainer is built (d2lora.training.run).
        bf16=hp.bf16 is True,
        # TRL turns checkpointing on by default; it trades ~30% speed for memory only large models need.
        gradient_checkpointing=hp.gradient_checkpointing,
        # Batches of similar length pad less; the batches differ from random ones, so it is off
        # unless a config asks (benchmarks/speed.py measures both).
        # (transformers 5 spells it train_sampling_strategy; 4.x had group_by_length=True.)
        train_sampling_strategy="group_by_length" if hp.group_by_length else "random",
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        # Checkpoints (adapter, optimizer, scheduler, RNG, step) every `checkpoint_steps` steps into
        # output_dir, so a killed job resumes (d2lora.training.run); the newest two are kept, so a
        # kill in the middle of writing one still leaves a complete one.
        save_strategy="steps" if checkpoint_steps > 0 else "no",
        save_steps=max(int(checkpoint_steps), 1),
        save_total_limit=2,
        report_to=[],
        use_cpu=use_cpu,
        dataloader_num_workers=0,
    )


def build_trainer(
    method: str,
    model,
    tokenizer,
    train_dataset,
    *,
    hp: TrainingHparams | dict,
    output_dir: str,
    seed: int,
    use_cpu: bool,
    checkpoint_steps: int = 0,
    callbacks: list | None = None,
):
    """A TRL trainer for `method` on a PeftModel whose trainable adapter is "default"."""
    hp = TrainingHparams.of(hp, f"training.adapt.{method}")
    args = _common_args(hp, output_dir=output_dir, seed=seed, use_cpu=use_cpu, checkpoint_steps=checkpoint_steps)
    if hp.pad_to_multiple_of and method in ("sft", "dpo"):  # ORPO's config has no such field (grid.check)
        args.update(pad_to_multiple_of=hp.pad_to_multiple_of)
    if method == "sft":
        if hp.padding_free:
            # TRL enforces no max_length without packing when padding-free (it would not truncate);
            # check_padding_free_lengths refuses the rows that max_length would have cut instead.
            args.update(padding_free=True, max_length=None)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**args),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if hp.padding_free or hp.max_micro_batch_tokens:
            lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
            if hp.padding_free:
                check_padding_free_lengths(lengths, hp.max_length)
            if hp.max_micro_batch_tokens:
                check_micro_batch_tokens(lengths, hp, f"training.adapt.{method}.max_micro_batch_tokens")
        return trainer
    if method == "dpo":
        if hp.precompute_reference:
            # Same batch size as training, so the precompute pass needs no more memory than a step.
            args.update(precompute_ref_log_probs=True, precompute_ref_batch_size=hp.batch_size)
        with _fast_reference_fingerprint(hp.precompute_reference):
            trainer = DPOTrainer(
                model=model,
                args=DPOConfig(beta=float(hp.beta), **args),
                train_dataset=train_dataset,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
        if hp.reference == "base":
            # Without a "ref" adapter TRL computes reference log-probs with adapters disabled: the bare base.
            drop_reference_adapter(trainer.model)
        return trainer
    if method == "orpo":
        return ORPOTrainer(
            model=model,
            args=ORPOConfig(beta=float(hp.beta), **args),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    raise ValueError(f"unknown method '{method}' (known: sft, dpo, orpo)")


def module_fingerprint(module) -> str:
    """A cheap, content-based fingerprint of a model: every tensor's name, dtype and shape, the bytes of
    the small trainable ones (the adapters) and the float64 sum and sum of squares of the rest,
    computed where the tensor lives."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if "lora_" in name or tensor.numel() <= 65536:
                digest.update(tensor.detach().to("cpu", torch.float64).numpy().tobytes())
            else:
                values = tensor.detach().to(torch.float64)
                digest.update(torch.stack([values.sum(), values.square().sum()]).cpu().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _fast_reference_fingerprint(active: bool):
    """TRL fingerprints the reference model for its precomputed log-probs' cache file with hash_module:
    every tensor copied to the CPU and hashed. At the 8B shape on an H200 the trainer's setup took
    68 s, of which the reference pass was 7 s; the rest is attributed to that hash (from the code,
    not profiled). The datasets here are in memory, so that cache file gets a random name and the
    fingerprint is never matched: a cheap one (module_fingerprint) serves."""
    if not active:
        yield
        return

    original = dpo_module.hash_module
    dpo_module.hash_module = module_fingerprint
    try:
        yield
    finally:
        dpo_module.hash_module = original


def check_padding_free_lengths(lengths: list[int], max_length: int) -> None:
    """Padding-free SFT trains untruncated rows (`lengths`: their tokens): refuse any longer than
    max_length, which a padded batch would have cut, so that the lever never changes what a cell
    trains on."""
    longest = max(lengths, default=0)
    if longest > max_length:
        raise ValueError(
            f"padding_free: {sum(n > max_length for n in lengths)} of {len(lengths)} rows are longer than "
            f"max_length={max_length} tokens (longest {longest}); padded batches would truncate them. "
            "Raise max_length or turn padding_free off"
        )


def micro_batch_tokens(lengths: list[int], hp: TrainingHparams) -> tuple[int, str]:
    """The most tokens one micro-batch of `hp.batch_size` of these rows can hold, and how it is made:
    padded, that many rows padded to the longest (cut at max_length, rounded up to pad_to_multiple_of);
    padding-free, the longest rows' sum."""
    rows = sorted(lengths, reverse=True)[: hp.batch_size]
    if hp.padding_free:
        return sum(rows), f"the {len(rows)} longest rows packed"
    longest = min(rows[0], hp.max_length) if rows else 0
    multiple = hp.pad_to_multiple_of or 1
    width = -(-longest // multiple) * multiple
    return hp.batch_size * width, f"{hp.batch_size} rows padded to {width} tokens"


def check_micro_batch_tokens(lengths: list[int], hp: TrainingHparams, key: str) -> None:
    """Refuse a cell whose rows (`lengths`: their tokens) could make a micro-batch above
    max_micro_batch_tokens: before the first step, not out of memory partway through an epoch."""
    tokens, made = micro_batch_tokens(lengths, hp)
    if tokens > hp.max_micro_batch_tokens:
        raise ValueError(
            f"{key}={hp.max_micro_batch_tokens}: a micro-batch of these {len(lengths)} rows can hold {tokens} "
            f"tokens ({made}). Lower batch_size and raise grad_accum (the same rows a step), or turn "
            "gradient_checkpointing on and raise the limit"
        )


def drop_reference_adapter(model) -> None:
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
        model.set_adapter("default")
