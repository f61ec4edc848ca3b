"""Checkpoints of one training run: where they live, which are complete, whether they belong to
this run (a fingerprint of its settings, inputs and libraries), and resuming from the newest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from d2lora.io import canonical_json, json_sha256, read_json, write_json, write_text
from d2lora.manifests import input_record
from d2lora.provenance import package_versions

CHECKPOINT_SUFFIX = ".checkpoints"
CHECKPOINT_RUN_FILE = "run.json"
# Written by a callback after the Trainer has finished writing a checkpoint folder (the Trainer
# writes in place, trainer_state.json last): a folder without it was cut off mid-write.
COMPLETE_MARKER = "d2lora_checkpoint_complete"
# A0/B0 of a fresh residual init (PiSSA, OLoRA, CorDA), kept beside the checkpoints of its run.
INITIAL_ADAPTER_DIR = "initial_adapter"
FINGERPRINT_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate")


def checkpoint_dir_for(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + CHECKPOINT_SUFFIX)


def checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-") :].isdigit():
        return None
    return int(name[len("checkpoint-") :])


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder; incomplete ones (cut off mid-write) are removed."""
    ckpt_dir = Path(ckpt_dir)
    complete = []
    for folder in sorted(ckpt_dir.glob("checkpoint-*")):
        step = checkpoint_step(folder)
        if step is None or not folder.is_dir():
            continue
        if (folder / COMPLETE_MARKER).is_file():
            complete.append((step, folder))
        else:
            shutil.rmtree(folder)
    return max(complete)[1] if complete else None


def mark_complete_callback():
    class MarkCheckpointComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_text(folder / COMPLETE_MARKER, f"{state.global_step}\n")

    return MarkCheckpointComplete()


def run_fingerprint(record: dict, inputs: dict) -> dict:
    """What must match for a checkpoint to be resumed: the run's settings, inputs and libraries."""
    run = {
        k: record[k]
        for k in ("phase", "method", "init", "variant", "n", "seed", "hparams", "lora", "device")
        if k in record
    }
    run["inputs"] = {name: input_record(path) for name, path in sorted(inputs.items()) if path is not None}
    versions = package_versions(FINGERPRINT_PACKAGES)
    run["versions"] = {name: versions[name] for name in FINGERPRINT_PACKAGES}
    return {"sha256": json_sha256(run), "run": json.loads(canonical_json(run))}


@contextlib.contextmanager
def trainer_dir(out_dir: Path, checkpoint_steps: int, fingerprint: dict):
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


def restore_token_count(trainer, checkpoint: Path) -> None:
    """TRL's running token count (SFT, DPO) is not in the checkpoint; restart it where it stopped,
    so the logged `num_tokens` (and `train_tokens`) equal those of an uninterrupted run."""
    if not hasattr(trainer, "_total_train_tokens"):
        return
    history = read_json(checkpoint / "trainer_state.json").get("log_history", [])
    seen = [entry["num_tokens"] for entry in history if "num_tokens" in entry]
    if seen:
        trainer._total_train_tokens = int(seen[-1])
