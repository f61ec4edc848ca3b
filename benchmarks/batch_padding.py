"""How much of a padded training micro-batch is padding, on the data benchmarks/paper_scale.py trains on.

MFU counts non-padding tokens only, so a padded batch's share of padding is what padding-free
batches (`padding_free`, with `flex_attention` on a GPU) can take off an SFT step at most. The roles
are prepared as paper_scale.py prepares them (d2lora.data.prepare), counted through the chat template
with the config's tokenizer, and cut into micro-batches of `--rows` after a seeded shuffle (the
trainer's sampler is shuffled too); each shuffle's share is reported. CPU only, no model.

    python benchmarks/batch_padding.py --config config/paper_shape.yaml --rows 8 --shuffles 5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

# What each training job reads per row: the warm-up and SFT prompt + chosen; a preference pair also
# prompt + rejected, padded in its own half of the batch.
ROWS_READ = (("warmup", "chosen"), ("math", "chosen"), ("math", "rejected"), ("titles", "chosen"))


def non_padding_share(lengths: list[int], rows: int, seed: int) -> float:
    """Non-padding tokens over padded tokens when `lengths` are shuffled and cut into batches of `rows`."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), rows):
        batch = order[start : start + rows]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return real / padded


def count(config_path: Path, rows: int, shuffles: int) -> dict:
    import paper_scale
    from paper_scale_data import _chat_lengths, prepare_data

    from d2lora.io import read_jsonl
    from d2lora.models import _load_tokenizer_from_source

    config = paper_scale.load_config(config_path, "paper", "cpu")
    tokenizer = _load_tokenizer_from_source(config["model"]["tokenizer"])
    max_length = int(config["training"]["adapt"]["sft"]["max_length"])
    result = {"config": str(config_path), "rows_per_micro_batch": rows, "shuffles": shuffles, "roles": {}}
    with tempfile.TemporaryDirectory() as folder:
        prepare_data(config, Path(folder))
        for role, answer in ROWS_READ:
            lengths = _chat_lengths(tokenizer, read_jsonl(Path(folder) / role / "train.jsonl"), answer, max_length)
            shares = [non_padding_share(lengths, rows, seed) for seed in range(shuffles)]
            result["roles"][f"{role}:{answer}"] = {
                "rows": len(lengths),
                "mean_tokens": round(sum(lengths) / len(lengths), 1),
                "max_tokens": max(lengths),
                "non_padding_share": [round(s, 3) for s in shares],
            }
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "paper_shape.yaml")
    parser.add_argument("--rows", type=int, default=8, help="rows per micro-batch (Table 2: 8)")
    parser.add_argument("--shuffles", type=int, default=5)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.shuffles < 1:
        parser.error("--rows and --shuffles: at least 1")
    result = count(args.config, args.rows, args.shuffles)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
