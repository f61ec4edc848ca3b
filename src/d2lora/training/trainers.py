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
from transformers.trainer_pt_utils import LengthGroupedSampler
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
        # unless a config asks (benchmarks/speed.py measures both); group_by_length's sampler
        # replaces the Trainer's (group_rows_by_length).
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
    config_key: str | None = None,
):
    """A TRL trainer for `method` on a PeftModel whose trainable adapter is "default"; config_key
    (training.adapt.<method> unless given: the warm-up's is training.warmup) names the settings in errors."""
    config_key = config_key or f"training.adapt.{method}"
    hp = TrainingHparams.of(hp, config_key)
    args = _common_args(hp, output_dir=output_dir, seed=seed, use_cpu=use_cpu, checkpoint_steps=checkpoint_steps)
    if hp.pad_to_multiple_of and method in ("sft", "dpo"):  # ORPO's config has no such field: pad_pairs_to_multiple
        args.update(pad_to_multiple_of=hp.pad_to_multiple_of)
    if method == "sft":
        if hp.padding_free:
            # TRL enforces no max_length without packing when padding-free (it would not truncate):
            # cut_at_max_length cuts the rows after it has tokenized them, as padded batches are cut.
            args.update(padding_free=True, max_length=None)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**args),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if hp.padding_free:
            trainer.train_dataset = cut_at_max_length(trainer.train_dataset, hp.max_length)
    elif method == "dpo":
        if hp.precompute_reference:
            # Same batch size as training, so the precompute pass needs no more memory than a step.
            args.update(precompute_ref_log_probs=True, precompute_ref_batch_size=hp.batch_size)
        with _fast_reference_fingerprint(hp.precompute_reference):
            trainer = DPOTrainer(
                model=model,
                args=DPOConfig(beta=float(hp.beta), disable_dropout=not hp.keep_dropout, **args),
                train_dataset=train_dataset,
                processing_class=tokenizer,
                callbacks=callbacks,
            )
        if hp.reference == "base":
            # Without a "ref" adapter TRL computes reference log-probs with adapters disabled: the bare base.
            drop_reference_adapter(trainer.model)
    elif method == "orpo":
        trainer = ORPOTrainer(
            model=model,
            args=ORPOConfig(beta=float(hp.beta), disable_dropout=not hp.keep_dropout, **args),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if hp.pad_to_multiple_of:
            pad_pairs_to_multiple(trainer, hp.pad_to_multiple_of)
    else:
        raise ValueError(f"unknown method '{method}' (known: sft, dpo, orpo)")
    if hp.group_by_length:
        group_rows_by_length(trainer, method, seed)
    if hp.max_micro_batch_tokens:
        lengths = sequence_lengths(trainer.train_dataset, method)
        check_micro_batch_tokens(lengths, hp, method, f"{config_key}.max_micro_batch_tokens")
    return trainer


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


def cut_at_max_length(dataset, max_length: int):
    """A padding-free SFT dataset (TRL's tokenized rows: input_ids and labels) cut as TRL 1.16 cuts
    padded rows (SFTTrainer._prepare_dataset, truncation_mode keep_start): each row's first
    max_length tokens, and the rows left with no token to learn dropped, so that the lever never
    changes what a cell trains on (tests/test_training_levers.py)."""
    if max(map(len, dataset["input_ids"]), default=0) <= max_length:
        return dataset
    cut = dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]})
    return cut.filter(lambda row: any(label != -100 for label in row["labels"]))


# The sequences one row puts through the model: TRL runs a pair's chosen and rejected answers as two.
SEQUENCES_PER_ROW = {"sft": 1, "dpo": 2, "orpo": 2}


def sequence_lengths(dataset, method: str) -> list[int]:
    """Per tokenized row of a trainer's dataset, its longest sequence in tokens (before max_length
    cuts it): SFT the row; DPO the prompt and the longer answer (TRL 1.16's DataCollatorForPreference
    joins them); ORPO the longer of its prompt-and-answer sequences."""
    if method == "sft":
        return [len(ids) for ids in dataset["input_ids"]]
    if method == "dpo":
        return [
            len(prompt) + max(len(chosen), len(rejected))
            for prompt, chosen, rejected in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
        ]
    if method == "orpo":
        return [
            max(len(chosen), len(rejected))
            for chosen, rejected in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])
        ]
    raise ValueError(f"unknown method '{method}' (known: sft, dpo, orpo)")


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order (shuffled, then sorted by length within mega-batches of
    50 optimizer steps' rows at most) over rows whose lengths are given, drawn from its own generator
    seeded by seed + epoch: the Trainer calls set_epoch before each epoch, so every epoch is
    shuffled anew and a job resumed mid-epoch takes the order it was killed in (the Trainer's own
    sampler draws from the global RNG, which it restores only after a resumed epoch's first batch)."""

    def __init__(self, rows_per_step: int, lengths: list[int], seed: int):
        super().__init__(rows_per_step, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


def group_rows_by_length(trainer, method: str, seed: int) -> None:
    """Length-grouped batches, each row as long as its longest sequence (sequence_lengths: what the
    collator pads a micro-batch to; a DPO or ORPO pair's longer answer). The Trainer's own
    group_by_length measures input_ids, which preference rows do not have (and DPO drops every
    column outside its signature before sampling), and is not resumable (SeededLengthGroupedSampler),
    so the trainer gets this sampler instead. Grouped by optimizer step (batch_size x grad_accum,
    read when training starts), as transformers groups: a split of the micro-batches
    (split_micro_batches) keeps each step's rows."""
    lengths = sequence_lengths(trainer.train_dataset, method)

    def sampler(train_dataset=None):
        rows = len(train_dataset if train_dataset is not None else trainer.train_dataset)
        if rows != len(lengths):
            raise RuntimeError(
                f"group_by_length: the training set has {rows} rows, its lengths were taken of {len(lengths)}"
            )
        return SeededLengthGroupedSampler(
            trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps, lengths, seed
        )

    trainer._get_train_sampler = sampler


def micro_batch_tokens(lengths: list[int], hp: TrainingHparams, method: str = "sft") -> tuple[int, str]:
    """The most tokens one micro-batch of `hp.batch_size` of these rows (`lengths`: sequence_lengths)
    can hold, and how it is made: padded, each row's sequences (two for a preference pair) padded to
    the longest (cut at max_length, rounded up to pad_to_multiple_of); padding-free (SFT), the longest
    rows' sum."""
    rows = sorted(lengths, reverse=True)[: hp.batch_size]
    if hp.padding_free:
        return sum(rows), f"the {len(rows)} longest rows packed"
    longest = min(rows[0], hp.max_length) if rows else 0
    multiple = hp.pad_to_multiple_of or 1
    width = -(-longest // multiple) * multiple
    sequences = SEQUENCES_PER_ROW[method]
    if sequences == 1:
        return hp.batch_size * width, f"{hp.batch_size} rows padded to {width} tokens"
    return (
        sequences * hp.batch_size * width,
        f"{hp.batch_size} pairs, {sequences * hp.batch_size} sequences padded to {width} tokens",
    )


def check_micro_batch_tokens(lengths: list[int], hp: TrainingHparams, method: str, key: str) -> None:
    """Refuse a cell whose rows (`lengths`: sequence_lengths) could make a micro-batch above
    max_micro_batch_tokens: before the first step, not out of memory partway through an epoch."""
    tokens, made = micro_batch_tokens(lengths, hp, method)
    if tokens > hp.max_micro_batch_tokens:
        raise ValueError(
            f"{key}={hp.max_micro_batch_tokens}: a micro-batch of these {len(lengths)} rows can hold {tokens} "
            f"tokens ({made}). Lower batch_size and raise grad_accum (the same rows a step), or turn "
            "gradient_checkpointing on and raise the limit"
        )


def pad_pairs_to_multiple(trainer, multiple: int) -> None:
    """ORPO's TRL config has no pad_to_multiple_of: each collated micro-batch's chosen and rejected
    halves are padded on the right here, as its collator pads them (the pad id, attention 0, labels
    -100, which the loss leaves out), so that compiled layers see one alignment case."""
    collate = trainer.data_collator
    values = {"input_ids": trainer.padding_value, "attention_mask": 0, "labels": -100}

    def padded(examples):
        batch = collate(examples)
        for side in ("chosen", "rejected"):
            for key, value in values.items():
                name = f"{side}_{key}"
                extra = -batch[name].shape[1] % multiple
                if extra:
                    batch[name] = torch.nn.functional.pad(batch[name], (0, extra), value=value)
        return batch

    trainer.data_collator = padded


def dropout_while_training(model, method: str, hp: TrainingHparams) -> dict:
    """The adapter's dropout as configured and what the built trainer left in the model (the largest
    of its dropout modules): TRL sets every one to 0 for DPO and ORPO unless keep_dropout."""
    config = getattr(model, "peft_config", {}).get("default")
    configured = float(config.lora_dropout) if hasattr(config, "lora_dropout") else None
    applied = max((float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)), default=0.0)
    record = {"lora": configured, "while_training": applied}
    if method in PREFERENCE_METHODS and not hp.keep_dropout and configured:
        record["reason"] = f"TRL sets every dropout to 0 for {method.upper()} (keep_dropout: false)"
    return record


def batch_tokens(batch: dict, method: str) -> int:
    """The tokens of one collated micro-batch as the model takes it, padding included (what memory
    follows): ORPO's chosen and rejected halves padded to the longer one (concatenated_inputs)."""
    if method == "orpo":
        chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
        return 2 * chosen.shape[0] * max(chosen.shape[1], rejected.shape[1])
    return batch["input_ids"].numel()


def count_micro_batches(trainer, method: str, into: dict) -> None:
    """Keep in into["largest_micro_batch_tokens"] the most tokens of any micro-batch the trainer
    collates from now on: the one memory met, beside micro_batch_tokens' worst case."""
    collate = trainer.data_collator
    into["largest_micro_batch_tokens"] = 0

    def counted(examples):
        batch = collate(examples)
        into["largest_micro_batch_tokens"] = max(into["largest_micro_batch_tokens"], batch_tokens(batch, method))
        return batch

    trainer.data_collator = counted


def choose_checkpointing(trainer, method: str, hp: TrainingHparams) -> dict:
    """Activation checkpointing for this cell: gradient_checkpointing's setting, except that with
    no_checkpointing_up_to_tokens set it goes off when the cell's largest possible micro-batch holds
    at most that many tokens, or, with split_micro_batches, when a smaller micro-batch (more
    accumulation, the same rows a step) does. Checkpointing recomputes the same forward, so either way
    the gradients are the same; without it a step is faster and keeps every layer's activations. What
    was chosen, why, and the largest micro-batch (the number a memory budget is set against)."""
    lengths = sequence_lengths(trainer.train_dataset, method)
    tokens, made = micro_batch_tokens(lengths, hp, method)
    chosen = {"setting": hp.gradient_checkpointing, "on": hp.gradient_checkpointing, "micro_batch_tokens": tokens}
    if hp.no_checkpointing_up_to_tokens is None or not hp.gradient_checkpointing:
        return chosen
    budget = f"no_checkpointing_up_to_tokens={hp.no_checkpointing_up_to_tokens}"
    if tokens > hp.no_checkpointing_up_to_tokens:
        split = _split_micro_batch(lengths, hp, method) if hp.split_micro_batches else None
        if split is None:
            chosen["reason"] = f"kept: a micro-batch can hold {tokens} tokens ({made}), above {budget}"
            if hp.split_micro_batches:
                chosen["reason"] += "; so can one row alone (split_micro_batches)"
            return chosen
        smaller, split_tokens, split_made = split
        _set_micro_batch(trainer, smaller.batch_size, smaller.grad_accum)
        _checkpointing_off(trainer)
        chosen.update(
            on=False,
            micro_batch_tokens=split_tokens,
            micro_batch={"batch_size": smaller.batch_size, "grad_accum": smaller.grad_accum},
            reason=(
                f"off: micro-batches split to {smaller.batch_size} x {smaller.grad_accum} (split_micro_batches), "
                f"which hold at most {split_tokens} tokens ({split_made}), within {budget}; "
                f"{hp.batch_size} x {hp.grad_accum} could hold {tokens} ({made})"
            ),
        )
        return chosen
    _checkpointing_off(trainer)
    chosen.update(on=False, reason=f"off: a micro-batch holds at most {tokens} tokens ({made}), within {budget}")
    return chosen


def _split_micro_batch(lengths: list[int], hp: TrainingHparams, method: str):
    """The largest micro-batch below batch_size that divides it and fits no_checkpointing_up_to_tokens,
    as (hparams with batch_size and grad_accum so set, its tokens, how it is made); None if none fits.
    A divisor keeps batch_size x grad_accum, so every optimizer step takes the same rows."""
    for rows in range(hp.batch_size - 1, 0, -1):
        if hp.batch_size % rows:
            continue
        smaller = hp.replace(batch_size=rows, grad_accum=hp.grad_accum * (hp.batch_size // rows))
        tokens, made = micro_batch_tokens(lengths, smaller, method)
        if tokens <= hp.no_checkpointing_up_to_tokens:
            return smaller, tokens, made
    return None


def _set_micro_batch(trainer, batch_size: int, grad_accum: int) -> None:
    """A built trainer's micro-batch and accumulation, before it trains: the Trainer reads both when
    training starts, except the batch size it copied at construction (_train_batch_size, which its
    train dataloader uses). DPO's reference pass ran at construction, per pair, at the whole size."""
    trainer.args.per_device_train_batch_size = batch_size
    trainer.args.gradient_accumulation_steps = grad_accum
    trainer._train_batch_size = trainer.args.train_batch_size


def _checkpointing_off(trainer) -> None:
    """Undo what gradient_checkpointing=True set up when the trainer was built: the argument the
    Trainer reads when training starts (transformers 5 names it activation_checkpointing, keeping
    gradient_checkpointing as an alias) and the input-gradient hook TRL adds for PEFT models."""
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(trainer.args, name):
            setattr(trainer.args, name, False)
    if hasattr(trainer.model, "disable_input_require_grads"):  # a no-op where no hook was added
        trainer.model.disable_input_require_grads()


def drop_reference_adapter(model) -> None:
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
        model.set_adapter("default")
