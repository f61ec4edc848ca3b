"""Per-batch partial results of an evaluation, so that a killed job resumes where it stopped.

The sidecar file sits beside the evaluation's outputs (`.<predictions>.partial`) and is NOT a
declared output: Snakemake (`--rerun-incomplete`) deletes a killed job's outputs, not this file.
Line 1 is a header with the fingerprint of the run (benchmark, settings, eval data, model,
adapter, device kind, dtype); every further line is one finished batch, written whole and
fsync'ed, as {"batch": [[index, value], ...]}. A rerun with the same fingerprint skips the
batches found there; a line cut off by the kill is dropped (its batch is recomputed); a file
with another fingerprint is discarded. The evaluation removes the file once its outputs exist.

Batches are the same on the rerun (they depend only on the prompts and batch_size), so the
results equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from d2lora.io import json_sha256
from d2lora.manifests import input_record


def sidecar_path(predictions_path: str | os.PathLike) -> Path:
    path = Path(predictions_path)
    return path.with_name(f".{path.name}.partial")


class PartialResults:
    """Finished batches of one evaluation run: `done` maps an item index to its result."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict):
        self.path = Path(path)
        self.key = json_sha256(fingerprint)
        self.done: dict[int, Any] = {}
        self._load()
        self.resumed = len(self.done)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._handle = open(self.path, "a", encoding="utf-8")
        if new:
            self._write_line({"fingerprint": self.key})

    def _load(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as handle:
            lines = handle.read().split(b"\n")
        # The last element is b"" after a complete file; anything else is a line cut off mid-write.
        for number, raw in enumerate(lines[:-1]):
            try:
                entry = json.loads(raw)
            except ValueError:
                break
            if number == 0:
                if not isinstance(entry, dict) or entry.get("fingerprint") != self.key:
                    print(f"evaluate: discarding {self.path}: partial results of another run", file=sys.stderr)
                    self.path.unlink()
                    self.done = {}
                    return
            else:
                for index, value in entry["batch"]:
                    self.done[int(index)] = value
            good_bytes += len(raw) + 1
        if good_bytes < self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)

    def _write_line(self, obj: dict) -> None:
        self._handle.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def has_all(self, indices) -> bool:
        return all(int(i) in self.done for i in indices)

    def record(self, results: dict[int, Any]) -> None:
        """One finished batch: item index -> result (JSON-serialisable)."""
        self._write_line({"batch": [[int(i), v] for i, v in sorted(results.items())]})
        self.done.update({int(i): v for i, v in results.items()})

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def remove(self) -> None:
        self.close()
        if self.path.exists():
            self.path.unlink()


def eval_fingerprint(benchmark: str, settings: dict, eval_path, model_dir, adapter_dir, device: str) -> dict:
    """What must match for partial results to be reused: benchmark, settings and every input."""
    return {
        "benchmark": benchmark,
        "settings": settings,
        "eval_data": input_record(eval_path)["sha256"],
        "model": input_record(model_dir)["files"],
        "adapter": input_record(adapter_dir)["files"] if adapter_dir else None,
        "device": device,
    }
