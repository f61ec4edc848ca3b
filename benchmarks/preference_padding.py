"""Padding in a preference cell's micro-batches, random against length-grouped, counted on the CPU.

The preset's DPO cell at the 8B shape computes 36.6 % padding (benchmarks/RESULTS.md, Round 33):
each micro-batch's sequences are padded to its longest. This counts, without training, what the
pipeline's own trainer would feed the model: the cell's pairs prepared as benchmarks/paper_scale.py
prepares them (d2lora.data.prepare), TRL's tokenization and collator through d2lora's build_trainer
at the config's settings (batch, accumulation, pad_to_multiple_of, split_micro_batches), the train
dataloader iterated epoch by epoch, and each micro-batch's positions (batch_tokens) against its real
tokens (the attention masks). Random batches (the Trainer's seeded sampler) against
`group_by_length` (d2lora's length-grouped sampler). The model is a 1-layer stand-in with the
tokenizer's vocabulary: it only has to exist, nothing runs through it.

The grid's cells hold 1,000-10,000 pairs and the stand-in data 320; a larger n resamples the
prepared pairs (seeded) so that its lengths follow theirs. transformers sorts mega-batches of up to
50 optimizer steps' rows, so the larger the cell the less grouping leaves to pad.

    python benchmarks/preference_padding.py --config config/paper_shape.yaml --n 208,1000,10000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

METHODS = ("dpo", "orpo")


def stand_in_model(vocab_size: int, lora: dict):
    """A 1-layer Llama with the tokenizer's vocabulary and the config's adapter: DPO copies the adapter
    into its reference, and the collator never calls the model."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from d2lora.training.adapters import lora_config

    torch.manual_seed(0)
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, num_key_value_heads=1, **shape))
    return get_peft_model(model, lora_config(dict(lora, dropout=0.0)))


def cell_rows(pairs: list[dict], n: int, seed: int) -> tuple[list[dict], bool]:
    """The cell's n pairs: the pipeline's subset of n or, past the prepared pairs, n drawn with
    replacement (seeded); and whether they were drawn."""
    from d2lora.data.prepare import subset

    if n <= len(pairs):
        return subset(pairs, n), False
    drawn = random.Random(f"preference-padding-{seed}").choices(pairs, k=n)
    return [dict(row, id=f"{row['id']}#{i}") for i, row in enumerate(drawn)], True


def real_tokens(batch: dict, method: str) -> int:
    if method == "orpo":
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return int(batch["attention_mask"].sum())


def count_epochs(trainer, method: str, epochs: int) -> dict:
    """Every micro-batch the trainer's train dataloader collates over `epochs` epochs, as training
    iterates it (set_epoch before each): positions computed, real tokens, micro-batches."""
    from d2lora.training.trainers import batch_tokens

    computed = real = batches = 0
    loader = trainer.get_train_dataloader()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            computed += batch_tokens(batch, method)
            real += real_tokens(batch, method)
            batches += 1
    return {
        "micro_batches": batches,
        "computed_tokens": computed,
        "real_tokens": real,
        "padding_share": round(1 - real / computed, 4),
    }


def count_cell(config: dict, pairs: list[dict], tokenizer, method: str, n: int, out: Path) -> dict:
    from d2lora.settings import TrainingHparams
    from d2lora.training.trainers import build_trainer, choose_checkpointing, group_rows_by_length, trl_dataset

    key = f"training.adapt.{method}"
    seed = int(config["seed"])
    # The reference pass is DPO's own and changes no batch; it would run the stand-in model for nothing.
    settings = dict(config["training"]["adapt"][method], group_by_length=False)
    if method == "dpo":
        settings["precompute_reference"] = False
    hp = TrainingHparams.of(settings, key)
    rows, drawn = cell_rows(pairs, n, seed)
    started = time.perf_counter()
    model = stand_in_model(len(tokenizer), config["training"]["lora"])
    trainer = build_trainer(
        method, model, tokenizer, trl_dataset(rows, method), hp=hp, output_dir=str(out), seed=seed, use_cpu=True
    )
    checkpointing = choose_checkpointing(trainer, method, hp)
    result = {
        "n": n,
        "drawn_with_replacement": drawn,
        "epochs": hp.epochs,
        "micro_batch": checkpointing.get("micro_batch", {"batch_size": hp.batch_size, "grad_accum": hp.grad_accum}),
        "random": count_epochs(trainer, method, hp.epochs),
    }
    group_rows_by_length(trainer, method, seed)
    result["length_grouped"] = count_epochs(trainer, method, hp.epochs)
    result["computed_random_over_grouped"] = round(
        result["random"]["computed_tokens"] / result["length_grouped"]["computed_tokens"], 3
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def count(config_path: Path, methods: list[str], sizes: list[int] | None) -> dict:
    import paper_scale
    from paper_scale_data import prepare_data

    from d2lora.io import read_jsonl
    from d2lora.models import _load_tokenizer_from_source

    config = paper_scale.load_config(config_path, "paper", "cpu")
    tokenizer = _load_tokenizer_from_source(config["model"]["tokenizer"])
    result = {"config": str(config_path), "methods": {}}
    with tempfile.TemporaryDirectory() as folder:
        prepare_data(config, Path(folder))
        pairs = read_jsonl(Path(folder) / "math" / "train.jsonl")
        result["prepared_pairs"] = len(pairs)
        for method in methods:
            cells = sizes or [paper_scale.cell_n(config, method)]
            result["methods"][method] = []
            for n in cells:
                cell = count_cell(config, pairs, tokenizer, method, n, Path(folder) / f"trainer_{method}_{n}")
                print(json.dumps({method: cell}), file=sys.stderr, flush=True)
                result["methods"][method].append(cell)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "paper_shape.yaml")
    parser.add_argument("--methods", default="dpo,orpo", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--n", default="", help="cell sizes, comma-separated (default: the config's cell)")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: one or more of {', '.join(METHODS)}")
    try:
        sizes = [int(x) for x in args.n.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--n: whole numbers, comma-separated (got {args.n!r})")
    if any(n < 1 for n in sizes):
        parser.error("--n: every size at least 1")
    result = count(args.config, methods, sizes or None)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
