"""Resume after SIGKILL: training from its last checkpoint, evaluation from its finished batches.

Real processes (tests/reliability_entry.py) are killed with SIGKILL once their first checkpoint
(training) or first finished batch (evaluation) is on disk, then rerun; the result must equal
that of an uninterrupted run: identical adapter tensors and per-step losses, identical
predictions and scores. The entry point sleeps after each step/batch so that the kill lands
mid-run; it changes nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2lora.evaluation.partial import PartialResults
from d2lora.io import write_jsonl
from d2lora.training.checkpoints import COMPLETE_MARKER, checkpoint_dir_for, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "reliability_entry.py"
LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}  # dropout: the RNG matters
HP = {"learning_rate": 5e-3, "epochs": 2, "scheduler": "cosine", "batch_size": 2, "max_length": 96, "beta": 0.1}
TEMPLATE = "{question} Please reason step by step, and put your final answer within \\boxed{}."


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _start(command: str, kwargs: dict, delay: float | None = None) -> subprocess.Popen:
    args = [sys.executable, str(ENTRY), command, json.dumps(kwargs, default=str)] + ([str(delay)] if delay else [])
    return subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return err


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the process ended before the test could kill it"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(
        path,
        [
            {
                "id": f"row-{i}",
                "prompt": f"What is {i} plus {i}?",
                "chosen": f"{i} plus {i} is \\boxed{{{2 * i}}}.",
                "rejected": f"{i} plus {i} is \\boxed{{{2 * i + 1}}}.",
            }
            for i in range(8)
        ],
    )
    return path


@pytest.mark.parametrize("sampling", ["random", "length_grouped"])
def test_training_killed_mid_epoch_resumes_to_the_same_adapter(sampling, tiny_model_dir, train_file, tmp_path):
    """DPO, the hardest case: TRL keeps a frozen copy of the starting adapter ('ref') beside the
    trained one, and the checkpoint holds both. (DPO and ORPO from the warm-up adapter and SFT were
    checked the same way by hand: docs/reliability.md.) Length-grouped batches come from the
    pipeline's own sampler, which a resumed job must rebuild in the killed job's order.

    A checkpoint folder of another run sits where the job will checkpoint: it must be discarded.
    """
    from safetensors.torch import load_file

    def kwargs(out: Path) -> dict:
        return dict(
            model_dir=str(tiny_model_dir),
            train_path=str(train_file),
            method="dpo",
            init="lora",
            n=8,
            lora=LORA,
            hp=dict(HP, group_by_length=sampling == "length_grouped"),
            out_dir=str(out),
            seed=0,
            device="cpu",
            checkpoint_steps=2,
        )

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    checkpoints = checkpoint_dir_for(resumed)
    stale = checkpoints / "checkpoint-99"  # left by another run (other data or settings): must not be resumed
    stale.mkdir(parents=True)
    (stale / COMPLETE_MARKER).write_text("99")
    (checkpoints / "run.json").write_text(json.dumps({"sha256": "another run"}))
    uninterrupted = _start("train", kwargs(reference))  # runs beside the one that gets killed
    victim = _start("train", kwargs(resumed), delay=0.3)
    _kill_when(victim, lambda: not stale.exists() and any(checkpoints.glob(f"checkpoint-*/{COMPLETE_MARKER}")))
    assert not resumed.exists(), "a killed job must not leave an adapter folder"
    assert latest_checkpoint(checkpoints) is not None
    log = _finish(_start("train", kwargs(resumed)))
    _finish(uninterrupted)

    assert "resuming from" in log
    assert not checkpoints.exists(), "checkpoints are removed once the adapter is in place"
    a, b = (
        load_file(str(reference / "adapter_model.safetensors")),
        load_file(str(resumed / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "adapter tensors differ"
    ra, rb = (json.loads((d / "training.json").read_text()) for d in (reference, resumed))
    assert 2 <= rb["resumed_from_step"] < 8 and ra["resumed_from_step"] is None
    losses = [[e["loss"] for e in r["log_history"] if "loss" in e] for r in (ra, rb)]
    assert len(losses[0]) == ra["global_steps"] == 8 and losses[0] == losses[1]
    assert ra["train_loss"] == rb["train_loss"]
    tokens = [[e["num_tokens"] for e in r["log_history"] if "num_tokens" in e] for r in (ra, rb)]
    assert tokens[0] == tokens[1] and ra["train_tokens"] == rb["train_tokens"] > 0
    print(
        f"\nkilled after checkpoint-{rb['resumed_from_step']}; resumed: 8 steps, adapter tensors identical, "
        f"losses {losses[1]}"
    )


def test_evaluation_killed_mid_run_resumes_from_finished_batches(tiny_model_dir, tmp_path):
    from d2lora.data.prepare import prepare_role

    data = tmp_path / "data"
    prepare_role(
        "math", {"prompt_template": TEMPLATE, "eval": {"source": "synthetic", "kind": "math", "rows": 6}}, data, seed=0
    )
    settings = {"max_new_tokens": 8, "batch_size": 2, "prompt_template": TEMPLATE, "dtype": "float32"}
    cell = {"task": "math", "method": "none", "init": "lora", "n": 0, "seed": 0}

    def kwargs(out: Path) -> dict:
        return dict(
            benchmark="gsm8k",
            cell=cell,
            model_dir=str(tiny_model_dir),
            adapter_dir=None,
            data_dir=str(data),
            settings=settings,
            scores_path=str(out / "scores.json"),
            predictions_path=str(out / "predictions.jsonl"),
            device="cpu",
        )

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    uninterrupted = _start("evaluate", kwargs(reference))
    victim = _start("evaluate", kwargs(resumed), delay=1.0)
    sidecar = resumed / ".predictions.jsonl.partial"
    _kill_when(victim, lambda: sidecar.is_file() and len(sidecar.read_text().splitlines()) >= 2)
    assert not (resumed / "scores.json").exists() and not (resumed / "predictions.jsonl").exists()
    done_batches = len(sidecar.read_text().splitlines()) - 1
    log = _finish(_start("evaluate", kwargs(resumed)))
    _finish(uninterrupted)

    assert f"resuming: {done_batches} of 3 batches already done" in log
    assert not sidecar.exists()
    assert (reference / "predictions.jsonl").read_bytes() == (resumed / "predictions.jsonl").read_bytes()
    ra, rb = (json.loads((d / "scores.json").read_text()) for d in (reference, resumed))
    assert ra["metrics"] == rb["metrics"] and ra["n_items"] == rb["n_items"] == 6
    print(
        f"\nkilled after {done_batches} of 3 batches; resumed run recomputed {3 - done_batches}; predictions identical"
    )


def test_multiple_choice_reuses_recorded_batches(tiny_model, tokenizer, tmp_path):
    """A rerun whose batches are all recorded never calls the model, and gives the same numbers."""
    from d2lora.evaluation.multiple_choice import evaluate_multiple_choice

    rows = [
        {"id": f"q{i}", "question": f"Which is {i}?", "choices": [str(i), str(i + 1), "none"], "answer_index": 0}
        for i in range(4)
    ]
    sidecar = tmp_path / ".predictions.jsonl.partial"
    first = PartialResults(sidecar, {"run": 1})
    expected = evaluate_multiple_choice(tiny_model, tokenizer, rows, batch_size=4, partial=first)
    first.close()

    class NoModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, *args, **kwargs):
            raise AssertionError("the model was called for a batch already recorded")

    again = PartialResults(sidecar, {"run": 1})
    assert again.resumed == 12
    assert evaluate_multiple_choice(NoModel(), tokenizer, rows, batch_size=4, partial=again) == expected


def test_partial_results_drop_a_torn_line_and_another_runs_file(tmp_path):
    sidecar = tmp_path / ".x.partial"
    partial = PartialResults(sidecar, {"run": 1})
    partial.record({0: "a", 1: "b"})
    partial.record({2: "c"})
    partial.close()
    with open(sidecar, "a", encoding="utf-8") as handle:
        handle.write('{"batch": [[3, "d"')  # the kill came in the middle of a write
    resumed = PartialResults(sidecar, {"run": 1})
    assert resumed.done == {0: "a", 1: "b", 2: "c"}
    resumed.record({3: "d"})
    resumed.close()
    assert PartialResults(sidecar, {"run": 1}).done == {0: "a", 1: "b", 2: "c", 3: "d"}
    other = PartialResults(sidecar, {"run": 2})  # other settings, model or data: start over
    assert other.done == {} and len(sidecar.read_text().splitlines()) == 1
    other.remove()
    assert not sidecar.exists()


def test_only_complete_checkpoints_are_resumed(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if complete:
            (folder / COMPLETE_MARKER).write_text(str(step))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists(), "a checkpoint cut off mid-write is removed"
