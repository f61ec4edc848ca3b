"""Training speed settings (GitHub issue 15): each one trains what the plain path trains.

padding_free (SFT), precompute_reference (DPO) and base_dtype are checked against the plain path on
the tiny model in float32 on the CPU, where the only differences left are summation order.
"""

from __future__ import annotations

import json

import pytest
import torch

from d2lora.io import write_jsonl
from d2lora.settings import TrainingHparams
from d2lora.training.run import _resolve_precision, run_adaptation, run_warmup
from d2lora.training.trainers import build_trainer, conversational, trl_dataset

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
HP = {"learning_rate": 5e-3, "epochs": 2, "scheduler": "constant", "batch_size": 3, "max_length": 160}


def _rows(count: int) -> list[dict]:
    """Prompts and answers of different lengths, so padded batches carry padding."""
    return [
        {
            "id": f"row-{i}",
            "prompt": "Add these numbers: " + " plus ".join(str(j) for j in range(i + 1)) + ".",
            "chosen": f"The sum is {sum(range(i + 1))}. " * (1 + i % 3) + f"\\boxed{{{sum(range(i + 1))}}}",
            "rejected": f"I think it is {i}. \\boxed{{{i}}}",
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("levers") / "train.jsonl"
    write_jsonl(path, _rows(6))
    return path


@pytest.fixture(scope="module")
def warmup_adapter(tiny_model_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("levers_warmup") / "adapter"
    run_warmup(tiny_model_dir, train_file, lora=LORA, hp=dict(HP, epochs=1), out_dir=out, seed=0, device="cpu")
    return out


def _cpu_trainer(method: str, model, tokenizer, rows: list[dict], hp, out, **kwargs):
    """build_trainer for `method` on the CPU, seed 0, over `rows` as TRL takes them, writing under `out`."""
    return build_trainer(
        method, model, tokenizer, trl_dataset(rows, method), hp=hp, output_dir=str(out), seed=0, use_cpu=True, **kwargs
    )


def _losses(record: dict) -> list[float]:
    return [e["loss"] for e in record["log_history"] if "loss" in e]


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_padding_free_sft_trains_what_padded_batches_train(tiny_model_dir, train_file, tmp_path):
    records = {}
    for name, extra in (("padded", {}), ("padding_free", {"padding_free": True})):
        records[name] = run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="lora",
            n=6,
            lora=LORA,
            hp=dict(HP, **extra),
            out_dir=tmp_path / name,
            seed=0,
            device="cpu",
        )
    plain, free = _losses(records["padded"]), _losses(records["padding_free"])
    for record in records.values():  # the micro-batches met, within the worst case the cell could make
        counted = record["checkpointing"]
        assert 0 < counted["largest_micro_batch_tokens"] <= counted["micro_batch_tokens"]
    assert (
        records["padding_free"]["checkpointing"]["micro_batch_tokens"]
        < records["padded"]["checkpointing"]["micro_batch_tokens"]
    )
    assert len(plain) == len(free) == 4  # 6 rows / batch 3 x 2 epochs: the same steps
    assert plain == pytest.approx(free, rel=1e-4, abs=1e-5)
    # The steps moved the adapter (lr 5e-3): equal adapters are evidence, not an untrained pair.
    assert plain[0] != pytest.approx(plain[-1], rel=1e-3)
    padded, packed = _adapter(tmp_path / "padded"), _adapter(tmp_path / "padding_free")
    assert padded.keys() == packed.keys()
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], atol=1e-5, rtol=1e-4)
    assert records["padding_free"]["hparams"]["padding_free"] is True
    assert records["padding_free"]["train_tokens"] == records["padded"]["train_tokens"]


def test_flex_attention_on_padding_free_batches_gives_padded_sdpa_batches_loss(tiny_model_dir, tokenizer, tmp_path):
    """The lever for padding-free batches without flash-attn: FlexAttention's block mask keeps each
    packed row's attention within the row, as SDPA's padded batches do. Forward only (float32, CPU):
    FlexAttention has no backward on the CPU."""
    losses = {}
    for name, extra in (("padded_sdpa", {}), ("padding_free_flex", {"padding_free": True})):
        model = _tiny_peft(tiny_model_dir, "float32")
        trainer = _cpu_trainer("sft", model, tokenizer, _rows(6), dict(HP, **extra), tmp_path / name)
        if name == "padding_free_flex":
            model.get_base_model().set_attn_implementation("flex_attention")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        with torch.no_grad():
            losses[name] = model(**inputs).loss.item()
            if name == "padding_free_flex":
                assert inputs["input_ids"].shape[0] == 1 and "attention_mask" not in inputs  # one packed row
                # The control: the same packed row read as one sequence attends across rows.
                across = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0)
                losses["one_sequence"] = model(**dict(inputs, position_ids=across)).loss.item()
    assert losses["padding_free_flex"] == pytest.approx(losses["padded_sdpa"], rel=1e-6)
    # On a tiny random model attending across rows moves the loss little, but over 100x the rounding.
    assert abs(losses["one_sequence"] - losses["padded_sdpa"]) > 1e-4 * losses["padded_sdpa"]


def test_flex_attention_training_is_refused_on_the_cpu(tiny_model_dir):
    from d2lora.training import fast_paths

    model = _tiny_peft(tiny_model_dir, "float32")
    hp = TrainingHparams.of(dict(HP, flex_attention=True), "training.adapt.sft")
    with pytest.raises(ValueError, match="flex_attention: torch's FlexAttention has no backward on the CPU"):
        fast_paths.apply(model, hp)


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_padding_to_a_multiple_of_8_pads_every_batch_and_trains_the_same(method, tiny_model_dir, tokenizer, tmp_path):
    """The lever that halves compile_layers' graphs (benchmarks/RESULTS.md, Round 9): every batch's
    width a multiple of 8, and the same training, since padding is masked."""
    widths, losses = [], {}
    for name, extra in (("plain", {}), ("multiple_of_8", {"pad_to_multiple_of": 8})):
        hp = TrainingHparams.of(dict(HP, batch_size=2, beta=0.1, **extra), f"training.adapt.{method}")
        trainer = _cpu_trainer(method, _tiny_peft(tiny_model_dir, "float32"), tokenizer, _rows(6), hp, tmp_path / name)
        collate = trainer.data_collator

        def collate_and_record(examples, collate=collate, name=name):
            batch = collate(examples)
            # ORPO collates a pair's two answers apart: both halves must be padded.
            keys = ["chosen_input_ids", "rejected_input_ids", "chosen_labels"] if method == "orpo" else ["input_ids"]
            widths.extend((name, batch[key].shape[-1]) for key in keys)
            return batch

        trainer.data_collator = collate_and_record
        trainer.train()
        losses[name] = _losses({"log_history": trainer.state.log_history})
    padded = [width for name, width in widths if name == "multiple_of_8"]
    assert padded and all(width % 8 == 0 for width in padded), widths
    # The check can fail: the rows' own widths are not all multiples of 8.
    assert any(width % 8 for name, width in widths if name == "plain"), widths
    assert len(losses["plain"]) == 6  # 6 rows / batch 2 x 2 epochs
    assert losses["plain"] == pytest.approx(losses["multiple_of_8"], rel=1e-4, abs=1e-5)


def test_padding_free_cuts_rows_at_max_length_as_padded_batches_do(tiny_model_dir, tokenizer, tmp_path):
    """TRL does not cut padding-free rows (it leaves max_length to packing): the pipeline cuts them as
    padded rows are cut, so the two train the same tokens and reach the same losses."""
    # The rows are 51-82 tokens, their prompts 37-52: at 58 five are cut, at 40 five are prompt alone.
    rows, losses, lengths = _rows(6), {}, {}
    for max_length in (58, 40):
        for name, extra in (("padded", {}), ("padding_free", {"padding_free": True})):
            hp = dict(HP, max_length=max_length, **extra)
            model = _tiny_peft(tiny_model_dir, "float32")
            trainer = _cpu_trainer("sft", model, tokenizer, rows, hp, tmp_path / f"{name}_{max_length}")
            lengths[name, max_length] = [len(ids) for ids in trainer.train_dataset["input_ids"]]
            if max_length == 58:
                trainer.train()
                losses[name] = _losses({"log_history": trainer.state.log_history})
    assert lengths["padded", 58] == lengths["padding_free", 58] == [51, 58, 58, 58, 58, 58], lengths
    assert lengths["padded", 40] == lengths["padding_free", 40] == [40], lengths  # the rest had no answer left
    assert len(losses["padded"]) == 4  # 6 rows / batch 3 x 2 epochs
    assert losses["padding_free"] == pytest.approx(losses["padded"], rel=1e-5)


def test_trl_still_turns_padding_free_dpo_off_which_is_why_the_config_refuses_it(tiny_model_dir, tokenizer, tmp_path):
    """training.adapt.dpo.padding_free is refused (d2lora.grid) because TRL's DPOTrainer drops it: when
    a TRL upgrade keeps it on, this fails, and padding-free preference cells are worth measuring."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(tmp_path), padding_free=True, use_cpu=True, report_to=[]),
        train_dataset=trl_dataset(_rows(2), "dpo"),
        processing_class=tokenizer,
    )
    assert trainer.args.padding_free and not trainer.padding_free


def test_micro_batch_tokens_counts_the_worst_micro_batch_padded_and_packed():
    from d2lora.training.trainers import micro_batch_tokens

    hp = TrainingHparams.of(dict(HP, batch_size=3, max_length=100), "training.adapt.sft")
    lengths = [10, 50, 30, 120, 5]
    assert micro_batch_tokens(lengths, hp) == (300, "3 rows padded to 100 tokens")  # cut at max_length
    assert micro_batch_tokens(lengths, hp.replace(pad_to_multiple_of=64)) == (384, "3 rows padded to 128 tokens")
    assert micro_batch_tokens(lengths, hp.replace(padding_free=True)) == (200, "the 3 longest rows packed")
    assert micro_batch_tokens([7, 9], hp.replace(padding_free=True)) == (16, "the 2 longest rows packed")
    # A preference pair is two sequences, chosen and rejected, each padded to the micro-batch's longest.
    assert micro_batch_tokens(lengths, hp, "dpo") == (600, "3 pairs, 6 sequences padded to 100 tokens")


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_sequence_lengths_count_the_micro_batch_trl_collates(method, tiny_model_dir, tokenizer, tmp_path):
    """What max_micro_batch_tokens and no_checkpointing_up_to_tokens count is what TRL builds: all 6
    rows in one micro-batch, the count equals the tokens of the batch that reaches the model."""
    from d2lora.training.trainers import count_micro_batches, micro_batch_tokens, sequence_lengths

    hp = TrainingHparams.of(dict(HP, batch_size=6, beta=0.1), f"training.adapt.{method}")
    trainer = _cpu_trainer(method, _tiny_peft(tiny_model_dir, "float32"), tokenizer, _rows(6), hp, tmp_path / "t")
    lengths = sequence_lengths(trainer.train_dataset, method)
    assert len(set(lengths)) > 1, "rows of different lengths, so the count is of the longest"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    if method == "orpo":  # chosen and rejected padded apart, then to the longer one (concatenated_inputs)
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        shape = (2 * batch["chosen_input_ids"].shape[0], width)
    else:
        shape = tuple(batch["input_ids"].shape)
    assert shape == (6 * (1 if method == "sft" else 2), max(lengths))
    assert micro_batch_tokens(lengths, hp, method)[0] == shape[0] * shape[1]
    # What training met: here every micro-batch is all 6 rows, so the worst case itself.
    seen: dict = {}
    count_micro_batches(trainer, method, into=seen)
    trainer.train()
    assert seen == {"largest_micro_batch_tokens": shape[0] * shape[1]}


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_cell_over_max_micro_batch_tokens_is_refused_before_training(
    method, tiny_model_dir, tokenizer, tmp_path
):
    from d2lora.training.trainers import micro_batch_tokens, sequence_lengths

    hp = dict(HP, beta=0.1)
    build = dict(
        tokenizer=tokenizer,
        train_dataset=trl_dataset(_rows(6), method),
        output_dir=str(tmp_path / "out"),
        seed=0,
        use_cpu=True,
    )

    def model():  # a DPO trainer adds its reference adapter to the model: one model a trainer
        return _tiny_peft(tiny_model_dir, "float32")

    trainer = build_trainer(method, model(), hp=hp, **build)
    worst, made = micro_batch_tokens(
        sequence_lengths(trainer.train_dataset, method), TrainingHparams.of(hp, "training.adapt.dpo"), method
    )
    build_trainer(method, model(), hp=dict(hp, max_micro_batch_tokens=worst), **build)  # at the limit: fits
    with pytest.raises(ValueError) as refused:
        build_trainer(method, model(), hp=dict(hp, max_micro_batch_tokens=worst - 1), **build)
    assert str(refused.value).startswith(
        f"training.adapt.{method}.max_micro_batch_tokens={worst - 1}: a micro-batch of these 6 rows can hold "
        f"{worst} tokens (3 pairs, 6 sequences padded to "
    )


@pytest.mark.parametrize("method", ["sft", "orpo"])
def test_no_checkpointing_up_to_tokens_turns_checkpointing_off_only_for_cells_that_fit(
    method, tiny_model_dir, tokenizer, tmp_path
):
    """gradient_checkpointing as Table 2 sets it, off for a cell whose largest micro-batch is within
    the budget: the trainer then trains without it, and trains what a run without it trains, dropout
    included (SFT keeps the LoRA dropout; a checkpointed forward is recomputed with the same masks)."""
    from transformers import TrainerCallback

    from d2lora.training.trainers import (
        choose_checkpointing,
        dropout_while_training,
        micro_batch_tokens,
        sequence_lengths,
    )

    seen: dict[str, list] = {}

    class Checkpointing(TrainerCallback):
        def __init__(self, name):
            self.name = name

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.setdefault(self.name, []).append(model.get_base_model().is_gradient_checkpointing)

    def train(name, **extra):
        hp = TrainingHparams.of(dict(HP, beta=0.1, **extra), f"training.adapt.{method}")
        model = _tiny_peft(tiny_model_dir, "float32", dropout=0.3)
        trainer = _cpu_trainer(method, model, tokenizer, _rows(6), hp, tmp_path / name, callbacks=[Checkpointing(name)])
        # SFT trains with the LoRA dropout (TRL turns it off for ORPO): the masks must match too.
        assert dropout_while_training(model, method, hp)["while_training"] == (0.3 if method == "sft" else 0.0)
        chosen = choose_checkpointing(trainer, method, hp)
        trainer.train()
        hooks = getattr(model.get_base_model(), "_require_grads_hooks", None)
        return chosen, _losses({"log_history": trainer.state.log_history}), bool(hooks), trainer

    _, without, _, trainer = train("without", gradient_checkpointing=False)
    hp = TrainingHparams.of(dict(HP, beta=0.1), f"training.adapt.{method}")
    worst, made = micro_batch_tokens(sequence_lengths(trainer.train_dataset, method), hp, method)
    off, off_losses, off_hook = train("off", gradient_checkpointing=True, no_checkpointing_up_to_tokens=worst)[:3]
    kept, kept_losses, kept_hook = train("kept", gradient_checkpointing=True, no_checkpointing_up_to_tokens=worst - 1)[
        :3
    ]
    assert off == {
        "setting": True,
        "on": False,
        "micro_batch_tokens": worst,
        "reason": f"off: a micro-batch holds at most {worst} tokens ({made}), within no_checkpointing_up_to_tokens={worst}",
    }
    assert kept["on"] is True and kept["reason"].startswith(f"kept: a micro-batch can hold {worst} tokens")
    assert set(seen["without"]) == set(seen["off"]) == {False} and set(seen["kept"]) == {True}
    assert not off_hook and kept_hook  # TRL's input-gradient hook goes with the checkpointing
    assert len(without) == 4 and off_losses == without  # the same run, bit for bit on the CPU
    assert kept_losses == pytest.approx(without, rel=1e-5, abs=1e-6)  # recomputed forwards, the same math
    assert without[0] != pytest.approx(without[-1], rel=1e-3), "the steps moved the adapter"


@pytest.mark.parametrize("method,padding_free", [("sft", False), ("sft", True), ("dpo", False), ("orpo", False)])
def test_split_micro_batches_train_a_cell_over_the_budget_without_checkpointing(
    method, padding_free, tiny_model_dir, tokenizer, tmp_path
):
    """A cell whose 4-row micro-batch passes no_checkpointing_up_to_tokens trains as 2 x 2 without
    checkpointing (the same rows a step) instead of 4 x 1 with it; with no divisor fitting it keeps
    checkpointing. Packed SFT rows count as their sum."""
    from d2lora.training.trainers import choose_checkpointing, count_micro_batches, micro_batch_tokens, sequence_lengths

    base = dict(HP, beta=0.1, batch_size=4, grad_accum=1, padding_free=padding_free)

    def train(name, **extra):
        hp = TrainingHparams.of(dict(base, **extra), f"training.adapt.{method}")
        trainer = _cpu_trainer(method, _tiny_peft(tiny_model_dir, "float32"), tokenizer, _rows(8), hp, tmp_path / name)
        chosen = choose_checkpointing(trainer, method, hp)
        count_micro_batches(trainer, method, into=chosen)
        trainer.train()
        return chosen, _losses({"log_history": trainer.state.log_history}), trainer

    _, whole_losses, trainer = train("whole", gradient_checkpointing=False)
    lengths = sequence_lengths(trainer.train_dataset, method)
    hp = TrainingHparams.of(base, f"training.adapt.{method}")
    whole, _ = micro_batch_tokens(lengths, hp, method)
    half, half_made = micro_batch_tokens(lengths, hp.replace(batch_size=2), method)
    single, _ = micro_batch_tokens(lengths, hp.replace(batch_size=1), method)
    assert single < half < whole
    split, split_losses, split_trainer = train(
        "split", gradient_checkpointing=True, no_checkpointing_up_to_tokens=half, split_micro_batches=True
    )
    assert split["on"] is False and split["micro_batch"] == {"batch_size": 2, "grad_accum": 2}
    assert split["micro_batch_tokens"] == half and 0 < split["largest_micro_batch_tokens"] <= half
    assert split["reason"].startswith(
        f"off: micro-batches split to 2 x 2 (split_micro_batches), which hold at most {half} tokens ({half_made})"
    )
    assert split_trainer.state.global_step == trainer.state.global_step == 4  # 8 rows, 4 a step, 2 epochs
    assert not split_trainer.model.get_base_model().is_gradient_checkpointing
    # SFT's loss averages over a step's tokens (TRL counts them across its micro-batches) and DPO's over
    # its pairs: the same steps. ORPO's NLL term averages over each micro-batch's tokens: close, not equal.
    assert split_losses == pytest.approx(whole_losses, rel=1e-5 if method in ("sft", "dpo") else 1e-3)
    assert whole_losses[0] != pytest.approx(whole_losses[-1], rel=1e-3), "the steps moved the adapter"
    kept = train(
        "kept", gradient_checkpointing=True, no_checkpointing_up_to_tokens=single - 1, split_micro_batches=True
    )[0]
    assert kept["on"] is True and "micro_batch" not in kept
    assert kept["reason"].endswith("; so can one row alone (split_micro_batches)")


_ROW_KEY = {"sft": "input_ids", "dpo": "prompt_ids", "orpo": "prompt_input_ids"}


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_length_grouped_batches_pad_less_and_a_split_keeps_each_steps_rows(method, tiny_model_dir, tokenizer, tmp_path):
    """group_by_length for every method (a pair as long as its longer answer): each epoch every row
    once, fewer padded positions than random batches, and 2 rows a step split 1 x 2 (what
    split_micro_batches does) take the same rows each step and reach the same losses."""
    from d2lora.training.trainers import SEQUENCES_PER_ROW, batch_tokens, choose_checkpointing, sequence_lengths

    rows = _rows(16)  # 2 rows a step: transformers sorts mega-batches of 16 // (2 x 4) = 2 steps' rows

    def trainer_for(name, **extra):
        hp = TrainingHparams.of(
            dict(HP, beta=0.1, batch_size=2, grad_accum=1, epochs=1, **extra), f"training.adapt.{method}"
        )
        trainer = _cpu_trainer(method, _tiny_peft(tiny_model_dir, "float32"), tokenizer, rows, hp, tmp_path / name)
        choose_checkpointing(trainer, method, hp)
        index = {tuple(r[_ROW_KEY[method]]): i for i, r in enumerate(trainer.train_dataset)}
        assert len(index) == len(rows), "every row tells itself apart by its prompt"
        seen, collate = {"batches": [], "computed": 0}, trainer.data_collator

        def recorded(examples):
            seen["batches"].append([index[tuple(e[_ROW_KEY[method]])] for e in examples])
            batch = collate(examples)
            seen["computed"] += batch_tokens(batch, method)
            return batch

        trainer.data_collator = recorded
        seen["lengths"] = sequence_lengths(trainer.train_dataset, method)
        return trainer, seen

    def train(name, **extra):
        trainer, seen = trainer_for(name, **extra)
        trainer.train()
        seen["losses"] = _losses({"log_history": trainer.state.log_history})
        return seen

    trainer, random_order = trainer_for("random")
    for _ in trainer.get_train_dataloader():  # random batches' padding: collated, not trained
        pass
    grouped = train("grouped", group_by_length=True)
    # Split: checkpointing on, and a budget that only one row fits.
    one_row = SEQUENCES_PER_ROW[method] * max(grouped["lengths"])
    split = train(
        "grouped_split",
        group_by_length=True,
        gradient_checkpointing=True,
        no_checkpointing_up_to_tokens=one_row,
        split_micro_batches=True,
    )
    assert [len(b) for b in grouped["batches"]] == [2] * 8 and [len(b) for b in split["batches"]] == [1] * 16
    for seen in (random_order, grouped, split):
        assert sorted(i for b in seen["batches"] for i in b) == list(range(16)), "each row once an epoch"
    assert grouped["computed"] < random_order["computed"], (grouped["computed"], random_order["computed"])
    steps = [sorted(split["batches"][2 * k] + split["batches"][2 * k + 1]) for k in range(8)]
    assert steps == [sorted(b) for b in grouped["batches"]], "a split step takes the whole micro-batch's rows"
    # SFT's and DPO's losses average over a step's tokens and pairs; ORPO's NLL over each micro-batch's.
    assert split["losses"] == pytest.approx(grouped["losses"], rel=1e-5 if method in ("sft", "dpo") else 1e-3)


def test_the_length_grouped_order_is_the_seeds_and_the_epochs():
    """A resumed job rebuilds the sampler: the same seed and epoch must give the same order, which
    transformers' own sampler (the global RNG) does not promise; each epoch is shuffled anew."""
    from d2lora.training.trainers import SeededLengthGroupedSampler

    lengths = [(7 * i) % 23 + 1 for i in range(64)]

    def order(seed, epoch):
        sampler = SeededLengthGroupedSampler(4, lengths, seed)
        torch.manual_seed(epoch + 100)  # the global RNG must not matter
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(64))
    # Within each mega-batch (64 // 16 = 4 steps' rows, 16 rows) the rows run longest first.
    first = order(0, 0)
    for start in range(0, 64, 16):
        mega = [lengths[i] for i in first[start : start + 16]]
        assert mega[1:] == sorted(mega[1:], reverse=True)  # transformers swaps the longest row of all to the front


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_cell_whose_micro_batch_could_pass_max_micro_batch_tokens_is_refused_before_training(
    padding_free, tiny_model_dir, tokenizer, tmp_path
):
    """The guard for settings that fit memory only up to so many tokens a micro-batch (16 packed rows
    without checkpointing: ~7,800 on an 80 GB card at the 8B shape, benchmarks/RESULTS.md, Round 22)."""
    from d2lora.training.trainers import micro_batch_tokens

    hp = dict(HP, padding_free=padding_free)
    build = dict(
        tokenizer=tokenizer,
        train_dataset=trl_dataset(_rows(6), "sft"),
        output_dir=str(tmp_path / "out"),
        seed=0,
        use_cpu=True,
    )
    model = _tiny_peft(tiny_model_dir, "float32")
    trainer = build_trainer("sft", model, hp=hp, **build)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    worst, _ = micro_batch_tokens(lengths, TrainingHparams.of(hp, "training.adapt.sft"))
    assert worst > sum(sorted(lengths)[:3]), "the worst micro-batch, not any one"
    build_trainer("sft", model, hp=dict(hp, max_micro_batch_tokens=worst), **build)  # at the limit: fits
    with pytest.raises(ValueError) as refused:
        build_trainer("sft", model, hp=dict(hp, max_micro_batch_tokens=worst - 1), **build)
    assert str(refused.value).startswith(
        f"training.adapt.sft.max_micro_batch_tokens={worst - 1}: a micro-batch of these 6 rows can hold {worst} tokens"
    )


def test_a_warmup_over_max_micro_batch_tokens_is_refused_naming_the_warmup_key(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ValueError, match=r"^training\.warmup\.max_micro_batch_tokens=1: a micro-batch of these"):
        run_warmup(
            tiny_model_dir,
            train_file,
            lora=LORA,
            hp=dict(HP, epochs=1, max_micro_batch_tokens=1),
            out_dir=tmp_path / "warmup",
            seed=0,
            device="cpu",
        )
    assert not (tmp_path / "warmup" / "training.json").exists()


def test_precomputed_dpo_reference_equals_the_per_step_reference(tiny_model_dir, warmup_adapter, tmp_path):
    from datasets import Dataset

    from d2lora.models import load_model, load_tokenizer
    from d2lora.training.warm_start import warm_started_adapter

    model = warm_started_adapter(load_model(tiny_model_dir), warmup_adapter, LORA, None, tiny_model_dir)
    dataset = Dataset.from_list(conversational(_rows(6), "dpo"))
    hp = dict(HP, beta=0.1, precompute_reference=True)
    trainer = build_trainer(
        "dpo",
        model,
        load_tokenizer(tiny_model_dir),
        dataset,
        hp=hp,
        output_dir=str(tmp_path / "t"),
        seed=0,
        use_cpu=True,
    )
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    batch = trainer.data_collator(
        [{k: v for k, v in trainer.train_dataset[i].items() if not k.startswith("ref_")} for i in range(6)]
    )
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_chosen_logps"]), chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["ref_rejected_logps"]), rejected, atol=1e-4, rtol=1e-5
    )


def test_precomputed_dpo_reference_gives_the_same_training(tiny_model_dir, train_file, warmup_adapter, tmp_path):
    records = {}
    for name, extra in (("per_step", {}), ("precomputed", {"precompute_reference": True})):
        records[name] = run_adaptation(
            tiny_model_dir,
            train_file,
            method="dpo",
            init="d2lora",
            n=6,
            lora=LORA,
            hp=dict(HP, beta=0.1, **extra),
            out_dir=tmp_path / name,
            seed=0,
            warmup_dir=warmup_adapter,
            device="cpu",
        )
    per_step, precomputed = _losses(records["per_step"]), _losses(records["precomputed"])
    assert len(per_step) == 4 and per_step == pytest.approx(precomputed, rel=1e-4, abs=1e-5)
    assert per_step[0] != pytest.approx(per_step[-1], rel=1e-3)
    assert records["precomputed"]["trainer_setup_seconds"] > 0


def test_base_dtype_auto_follows_bf16_autocast_and_keeps_residual_bases_float32(monkeypatch):
    from d2lora.training.variants import Variant

    lora = Variant.of(None, "lora")
    pissa = Variant.of({"init_lora_weights": "pissa"}, "pissa")
    monkeypatch.setenv("D2LORA_NATIVE_BF16", "1")
    auto = TrainingHparams.of(HP)  # bf16 and base_dtype: the schema's default, auto
    hp, record = _resolve_precision(auto, "cpu", lora)
    assert (hp.bf16, hp.base_dtype) == (True, "bfloat16") and record["base_dtype"]["setting"] == "auto"
    assert _resolve_precision(auto, "cpu", pissa)[0].base_dtype == "float32"
    hp, record = _resolve_precision(auto.replace(base_dtype="float32"), "cpu", lora)
    assert hp.base_dtype == "float32" and record["base_dtype"]["reason"] == "set in the config"
    monkeypatch.setenv("D2LORA_NATIVE_BF16", "0")
    assert _resolve_precision(auto, "cpu", lora)[0].base_dtype == "float32"


def test_a_bf16_base_trains_a_float32_adapter(tiny_model_dir, train_file, tmp_path):
    record = run_adaptation(
        tiny_model_dir,
        train_file,
        method="sft",
        init="lora",
        n=3,
        lora=LORA,
        hp=dict(HP, epochs=1, bf16=True),
        out_dir=tmp_path / "a",
        seed=0,
        device="cpu",
    )
    assert record["hparams"]["base_dtype"] == "bfloat16" and record["base_weights_dtype"] == "bfloat16"
    assert {str(t.dtype) for t in _adapter(tmp_path / "a").values()} == {"torch.float32"}
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["precision"]["base_dtype"]["dtype"] == "bfloat16"


def test_the_reference_fingerprint_is_cheap_content_based_and_restored(tiny_model_dir, warmup_adapter, tmp_path):
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset

    from d2lora.models import load_model, load_tokenizer
    from d2lora.training import trainers
    from d2lora.training.warm_start import warm_started_adapter

    seen = []
    original = trainers.module_fingerprint
    trainers.module_fingerprint = lambda module: seen.append(original(module)) or seen[-1]
    try:
        model = warm_started_adapter(load_model(tiny_model_dir), warmup_adapter, LORA, None, tiny_model_dir)
        build_trainer(
            "dpo",
            model,
            load_tokenizer(tiny_model_dir),
            Dataset.from_list(conversational(_rows(2), "dpo")),
            hp=dict(HP, beta=0.1, precompute_reference=True),
            output_dir=str(tmp_path / "t"),
            seed=0,
            use_cpu=True,
        )
    finally:
        trainers.module_fingerprint = original
    assert len(seen) == 1 and dpo_module.hash_module is not trainers.module_fingerprint
    base = load_model(tiny_model_dir)
    before = original(base)
    assert original(load_model(tiny_model_dir)) == before
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert original(base) != before


def _tiny_peft(tiny_model_dir, dtype: str, dropout: float = 0.0, alpha: int = LORA["alpha"]):
    from peft import get_peft_model

    from d2lora.models import load_model
    from d2lora.training.adapters import lora_config

    torch.manual_seed(0)
    return get_peft_model(
        load_model(tiny_model_dir, dtype=dtype, device="cpu"), lora_config(dict(LORA, dropout=dropout, alpha=alpha))
    )


def test_uncast_adapter_inputs_reach_the_branch_in_bf16(tiny_model_dir):
    from d2lora.training import fast_paths

    model = _tiny_peft(tiny_model_dir, "bfloat16")
    seen = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda _module, args: seen.append(args[0].dtype))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
        assert set(seen) == {torch.float32}  # peft's default: a float32 copy for the float32 adapter
        seen.clear()
        layers = fast_paths.keep_adapter_inputs(model)
        model(input_ids=ids)
    assert set(seen) == {torch.bfloat16} and layers == len(seen) > 0


def test_uncast_adapter_inputs_give_the_cast_gradients(tiny_model_dir):
    from d2lora.training import fast_paths

    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    grads = {}
    for cast in (True, False):
        model = _tiny_peft(tiny_model_dir, "bfloat16")
        _nonzero_b(model)
        if not cast:
            fast_paths.keep_adapter_inputs(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[cast] = {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name in grads[True]:
        assert grads[True][name].abs().max() > 0, name
        torch.testing.assert_close(grads[False][name], grads[True][name], rtol=1e-2, atol=1e-4)


def test_uncast_adapter_inputs_train_what_the_cast_trains(tiny_model_dir, train_file, tmp_path):
    lora = dict(LORA, dropout=0.1)  # dropout runs on the branch's input: in float32 or in bf16
    records = {}
    for cast in (True, False):
        hp = dict(HP, bf16=True, cast_adapter_inputs=cast)
        records[cast] = run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="lora",
            n=6,
            lora=lora,
            hp=hp,
            out_dir=tmp_path / str(cast),
            seed=0,
            device="cpu",
        )
    assert records[False]["fast_paths"]["cast_adapter_inputs"]["layers"] > 0
    assert records[True]["fast_paths"]["cast_adapter_inputs"]["layers"] == 0
    # Adam moves each weight by about lr a step whatever its gradient's size, so weights whose
    # gradient is near 0 differ by rounding's sign; the losses are what must agree.
    assert _losses(records[False]) == pytest.approx(_losses(records[True]), rel=1e-3)
    assert _losses(records[True])[0] != pytest.approx(_losses(records[True])[-1], rel=1e-3)


def test_inputs_stay_cast_without_bf16_autocast(tiny_model_dir):
    from d2lora.training import fast_paths

    model = _tiny_peft(tiny_model_dir, "float32")
    record = fast_paths.apply(model, TrainingHparams.of(dict(HP, bf16=False, cast_adapter_inputs=False)))
    assert record["cast_adapter_inputs"]["layers"] == 0 and "autocast is off" in record["cast_adapter_inputs"]["reason"]
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())


def test_compiled_decoder_layers_compute_what_the_eager_ones_compute(tiny_model_dir):
    from d2lora.training import fast_paths

    model = _tiny_peft(tiny_model_dir, "float32")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        layers = fast_paths.compile_decoder_layers(model, backend="eager")
        compiled = model(input_ids=ids).logits
    assert layers == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in fast_paths.decoder_layers(model))
    torch.testing.assert_close(compiled, eager)
    with pytest.raises(ValueError, match="compile_layers: the model names no decoder layer"):
        fast_paths.compile_decoder_layers(torch.nn.Linear(2, 2))


def test_inductor_compiled_layers_give_eager_bf16_losses_and_gradients(tiny_model_dir):
    """compile_layers asks inductor to round each fused op's bf16 output as eager does: unrounded
    intermediates made the compiled loss of a trained adapter 0.03 lower than eager's at the 8B shape
    (benchmarks/RESULTS.md, Rounds 23-24). The control compiles without it. On a Xeon with AMX the
    rounded loss and gradients are eager's bit for bit (the unrounded: 1e-5 and 1e-4 off); other CPUs
    may order a reduction differently, so the check is that rounding takes 90 % of the difference."""
    import torch._dynamo

    from d2lora.training import fast_paths

    ids = torch.randint(3, 1000, (4, 37), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(model):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def differences(one, other) -> tuple[float, float]:
        grads = max((one[1][k] - other[1][k]).abs().max().item() for k in one[1])
        return (one[0] - other[0]).abs().item(), grads

    found = {}
    for name in ("rounded", "unrounded"):
        torch._dynamo.reset()
        model = _tiny_peft(tiny_model_dir, "bfloat16")
        _nonzero_b(model)
        fast_paths.keep_adapter_inputs(model)
        model.train()
        eager = loss_and_grads(model)
        if name == "rounded":
            fast_paths.compile_decoder_layers(model)
        else:
            for layer in fast_paths.decoder_layers(model):
                layer.compile(backend="inductor", dynamic=True)
        try:
            found[name] = differences(loss_and_grads(model), eager)
        finally:
            torch._dynamo.reset()
    (loss_rounded, grads_rounded), (loss_unrounded, grads_unrounded) = found["rounded"], found["unrounded"]
    assert loss_unrounded > 0 and grads_unrounded > 0, "the control: inductor's default is not eager's rounding"
    assert loss_rounded <= loss_unrounded / 10 and grads_rounded <= grads_unrounded / 10, found


def test_compile_layers_min_steps_leaves_short_cells_eager_and_says_why(tiny_model_dir):
    """Compiling costs a job a fixed time and saves a little each step: worth it on long cells only."""
    import torch._dynamo

    from d2lora.training import fast_paths

    hp = TrainingHparams.of(dict(HP, compile_layers=True, compile_layers_min_steps=500), "training.adapt.sft")
    short = _tiny_peft(tiny_model_dir, "float32")
    record = fast_paths.apply(short, hp, steps=499)["compile_layers"]
    assert record == {
        "setting": True,
        "layers": 0,
        "reason": "not compiled: 499 optimizer steps, under compile_layers_min_steps=500",
    }
    assert all(layer._compiled_call_impl is None for layer in fast_paths.decoder_layers(short))
    try:
        for steps in (500, None):  # None: a caller that does not know the cell's steps
            model = _tiny_peft(tiny_model_dir, "float32")
            record = fast_paths.apply(model, hp, steps=steps)["compile_layers"]
            assert record["layers"] == model.config.num_hidden_layers and "reason" not in record
            assert record["inductor"] == {"emulate_precision_casts": True}
            assert all(layer._compiled_call_impl is not None for layer in fast_paths.decoder_layers(model))
    finally:
        torch._dynamo.reset()


def test_compiled_layers_train_rows_of_every_length_without_recompiling(tiny_model_dir):
    """Dynamic shapes from the first compile: one graph for every row length, plus one for the first
    layer, whose input needs no grad. A static first compile needs a third for the lengths, and on the
    H200 the compiled levers hit dynamo's recompile limit (benchmarks/RESULTS.md, Round 8)."""
    import torch._dynamo

    from d2lora.training import fast_paths

    torch._dynamo.reset()
    # dynamo's own patch: monkeypatch's undo deleted the option from dynamo's config module, and a
    # later test's torch.compile then failed on it.
    limits = torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)
    model = _tiny_peft(tiny_model_dir, "float32", dropout=0.05)
    fast_paths.compile_decoder_layers(model, backend="eager")
    model.train()
    with limits:
        try:
            for length in (5, 9, 13, 7):
                ids = torch.randint(3, 100, (2, length))
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            # The check can fail: a static first compile needs a third graph, refused at this limit.
            torch._dynamo.reset()
            for layer in fast_paths.decoder_layers(model):
                layer.compile(backend="eager")
            with pytest.raises(Exception, match="recompile_limit|cache_size_limit"):
                for length in (5, 9):
                    ids = torch.randint(3, 100, (2, length))
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        finally:
            torch._dynamo.reset()


def _nonzero_b(model) -> None:
    """B starts at 0, which would make the branch and A's gradient vanish from any comparison."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))


@pytest.mark.parametrize("alpha", [4, 8])  # scaling 1.0 (Table 2's alpha = r) and 2.0
def test_fused_adapter_add_gives_peft_outputs_and_gradients_in_float32(tiny_model_dir, alpha):
    from peft import get_peft_model

    from d2lora.models import load_model
    from d2lora.training import fast_paths
    from d2lora.training.adapters import lora_config

    ids = torch.tensor([[5, 9, 2, 7, 3, 8], [4, 4, 1, 6, 2, 9]])
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(load_model(tiny_model_dir), lora_config(dict(LORA, alpha=alpha)))
        _nonzero_b(model)
        layers = fast_paths.fuse_adapter_add(model) if fused else 0
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[fused] = (out.logits.detach(), grads, layers)
    assert results[True][2] == sum(1 for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert results[True][2] > 0
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-7)


def test_fused_adapter_add_makes_one_call_of_three_under_bf16_autocast(tiny_model_dir):
    from torch.profiler import ProfilerActivity, profile

    from d2lora.training import fast_paths

    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    calls, losses = {}, {}
    for fused in (False, True):
        model = _tiny_peft(tiny_model_dir, "bfloat16", alpha=LORA["rank"])  # Table 2's scaling of 1.0
        _nonzero_b(model)
        fast_paths.keep_adapter_inputs(model)
        if fused:
            fast_paths.fuse_adapter_add(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        calls[fused] = {e.key: e.count for e in prof.key_averages()}
        losses[fused] = loss.item()
    projections = sum(1 for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert calls[True].get("AddmmBackward0", 0) - calls[False].get("AddmmBackward0", 0) == projections
    # forward: the B matmul, the multiply by the scaling (1.0 here) and the add become one addmm;
    # backward: no multiply by an alpha of 1
    assert calls[False]["aten::mul"] - calls[True]["aten::mul"] == 2 * projections
    assert calls[False]["aten::add"] - calls[True].get("aten::add", 0) >= projections
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


def test_fused_adapter_add_merges_as_peft_does(tiny_model_dir):
    from d2lora.training import fast_paths

    merged = {}
    for fused in (False, True):
        model = _tiny_peft(tiny_model_dir, "float32")
        _nonzero_b(model)
        if fused:
            fast_paths.fuse_adapter_add(model)
        merged[fused] = model.merge_and_unload().state_dict()
    for name, weight in merged[False].items():
        torch.testing.assert_close(merged[True][name], weight, rtol=0, atol=0)


def test_fused_adapter_add_trains_what_peft_trains(tiny_model_dir, train_file, tmp_path):
    records = {}
    for fused in (False, True):
        records[fused] = run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="lora",
            n=6,
            lora=dict(LORA, dropout=0.1),
            hp=dict(HP, fuse_adapter_add=fused),
            out_dir=tmp_path / str(fused),
            seed=0,
            device="cpu",
        )
    assert records[True]["fast_paths"]["fuse_adapter_add"]["layers"] > 0
    assert records[False]["fast_paths"]["fuse_adapter_add"] == {"setting": False, "layers": 0}
    assert _losses(records[True]) == pytest.approx(_losses(records[False]), rel=1e-4)
    assert _losses(records[False])[0] != pytest.approx(_losses(records[False])[-1], rel=1e-3)


def test_fused_adapter_add_leaves_dynamic_loras_sliced_factors_to_peft(tiny_model_dir):
    # Dynamic LoRA swaps lora_A / lora_B for wrappers that use only their active components; a layer
    # whose B is such a wrapper must keep peft's sum, whenever the swap happens.
    from d2lora.training import fast_paths
    from d2lora.training.adaptive.dynamic_modules import DynamicA, DynamicB

    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    logits = {}
    for fused in (False, True):
        model = _tiny_peft(tiny_model_dir, "float32")
        _nonzero_b(model)
        if fused:
            assert fast_paths.fuse_adapter_add(model) > 0
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"] = DynamicA(module.lora_A["default"], 2, sliced=True)
                module.lora_B["default"] = DynamicB(module.lora_B["default"], 2, sliced=True)
        logits[fused] = model(input_ids=ids).logits.detach()
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method,keep", [("sft", False), ("dpo", False), ("dpo", True), ("orpo", False), ("orpo", True)]
)
def test_the_record_says_what_dropout_trained(method, keep, tiny_model_dir, tokenizer, tmp_path):
    """TRL zeroes every dropout for DPO and ORPO unless told not to: training.lora.dropout would
    otherwise read as applied where it was not."""
    from d2lora.training.trainers import dropout_while_training

    extra = {"keep_dropout": True} if keep else {}
    hp = TrainingHparams.of(dict(HP, beta=0.1, **extra), f"training.adapt.{method}")
    model = _tiny_peft(tiny_model_dir, "float32", dropout=0.1)
    _cpu_trainer(method, model, tokenizer, _rows(2), hp, tmp_path)
    record = dropout_while_training(model, method, hp)
    if method == "sft" or keep:
        assert record == {"lora": 0.1, "while_training": 0.1}
    else:
        assert record == {
            "lora": 0.1,
            "while_training": 0.0,
            "reason": f"TRL sets every dropout to 0 for {method.upper()} (keep_dropout: false)",
        }


def test_a_process_training_compiled_cells_one_after_another_reuses_the_graphs_and_keeps_no_model(
    tiny_model_dir, train_file, tmp_path
):
    """What a cell server (training.server) relies on: a later compiled cell in the same process makes
    no new dynamo graph for its new model (the compile is paid once per server: 18.1 s then 1.0 s a
    cell here on a Xeon), and no cell's model outlives it."""
    import gc

    from torch._dynamo.utils import counters

    torch._dynamo.reset()

    def models_alive() -> int:
        gc.collect()
        return sum(type(o).__name__ == "LlamaForCausalLM" for o in gc.get_objects())

    before = models_alive()
    graphs = []
    for cell in range(2):
        record = run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="lora",
            n=6,
            lora=LORA,
            hp=dict(HP, epochs=1, compile_layers=True),
            out_dir=tmp_path / f"cell{cell}",
            seed=cell,
            device="cpu",
        )
        assert record["fast_paths"]["compile_layers"]["layers"] == 2
        graphs.append(counters["stats"]["unique_graphs"])
        assert models_alive() == before, f"cell {cell} left its model alive"
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs
