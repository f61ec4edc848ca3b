"""A small entry point that the reliability tests run as real processes (and kill).

    python tests/reliability_entry.py train    '<json kwargs of run_adaptation>' [delay_s]
    python tests/reliability_entry.py evaluate '<json kwargs of evaluate_cell>'  [delay_s]
    python tests/reliability_entry.py chain    '<json {"model_dir", "out"}>'

`delay_s` sleeps after every training step / evaluation batch (nothing else changes), so that
the test can SIGKILL the process after its first checkpoint appears and before it finishes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _slow_training(delay: float) -> None:
    from transformers import Trainer

    step = Trainer.training_step

    def slow_step(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        time.sleep(delay)
        return loss

    Trainer.training_step = slow_step


def _slow_batches(delay: float) -> None:
    from d2lora.evaluation import generation, multiple_choice

    for module in (generation, multiple_choice):
        log = module.log_progress

        def slow_log(*args, _log=log, **kwargs):
            _log(*args, **kwargs)
            time.sleep(delay)

        module.log_progress = slow_log


def chain(model_dir: str, out: str) -> None:
    """prepare -> train -> evaluate -> collect_metrics with the package's entry points."""
    from d2lora.data.prepare import prepare_role
    from d2lora.evaluation.run import evaluate_cell
    from d2lora.results.metrics import collect_metrics, write_metrics
    from d2lora.training.run import run_adaptation

    out_path = Path(out)
    template = "{question} Please reason step by step, and put your final answer within \\boxed{}."
    role_cfg = {
        "prompt_template": template,
        "train": {"source": "synthetic", "kind": "math", "rows": 8},
        "eval": {"source": "synthetic", "kind": "math", "rows": 4},
    }
    prepare_role("math", role_cfg, out_path / "data" / "math", seed=0, max_n=4)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
    hp = {"learning_rate": 5e-3, "epochs": 1, "scheduler": "cosine", "batch_size": 2, "max_length": 96}
    adapter = out_path / "adapters" / "math" / "sft" / "lora" / "n4" / "s0"
    run_adaptation(
        model_dir,
        out_path / "data" / "math" / "train.jsonl",
        method="sft",
        init="lora",
        n=4,
        lora=lora,
        hp=hp,
        out_dir=adapter,
        seed=0,
        device="cpu",
        checkpoint_steps=1,
    )
    scores = []
    for cell_adapter, cell in (
        (None, {"task": "math", "method": "none", "init": "lora", "n": 0, "seed": 0}),
        (adapter, {"task": "math", "method": "sft", "init": "lora", "n": 4, "seed": 0}),
    ):
        cell_dir = out_path / "eval" / "gsm8k" / cell["task"] / cell["method"] / cell["init"] / f"n{cell['n']}" / "s0"
        settings = {"max_new_tokens": 8, "batch_size": 2, "prompt_template": template, "dtype": "float32"}
        evaluate_cell(
            "gsm8k",
            cell=cell,
            model_dir=model_dir,
            adapter_dir=cell_adapter,
            data_dir=out_path / "data" / "math",
            settings=settings,
            scores_path=cell_dir / "scores.json",
            predictions_path=cell_dir / "predictions.jsonl",
            device="cpu",
        )
        scores.append(cell_dir / "scores.json")
    write_metrics(collect_metrics(scores), out_path / "metrics" / "metrics.tsv")


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    command, kwargs = argv[0], json.loads(argv[1])
    delay = float(argv[2]) if len(argv) > 2 else 0.0
    if command == "train":
        from d2lora.training.run import run_adaptation

        if delay:
            _slow_training(delay)
        run_adaptation(**kwargs)
    elif command == "evaluate":
        from d2lora.evaluation.run import evaluate_cell

        if delay:
            _slow_batches(delay)
        evaluate_cell(**kwargs)
    elif command == "chain":
        chain(**kwargs)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
