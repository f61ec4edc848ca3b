"""A base checkpoint's weights kept in host memory across the cells of one process
(`evaluation.server.keep_base_weights`).

The cell server loads the model per cell and frees it after, so that it holds no GPU memory between
cells; every cell then reads the whole checkpoint again. Kept, the tensors are read once per server
and each cell's model is built from them, pinned in host memory on a machine with CUDA: on an H100
16 GB reached the card in 0.29 s from pinned memory against 2.69 s from the files (page cache warm),
and pinning them cost the first cell 11.5 s once (benchmarks/RESULTS.md, Round 15). One checkpoint is
kept at a time, keyed by its folder, its files' sizes and modification times and its dtype: a
rewritten checkpoint is read again, another base replaces it. The process holds the checkpoint's
size in host memory until it ends (a server leaves after `idle_seconds` without a cell).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

_keeping = False
_kept: tuple[tuple, dict[str, Any]] | None = None


@contextlib.contextmanager
def keeping(enabled: bool):
    """Inside the block, `state_dict` answers from (and fills) the kept weights when `enabled`; a
    block that does not keep frees what an earlier one kept."""
    global _keeping
    if not enabled:
        forget()
    previous, _keeping = _keeping, bool(enabled)
    try:
        yield
    finally:
        _keeping = previous


def active() -> bool:
    """Whether this process keeps base weights now (inside `keeping(True)`)."""
    return _keeping


def _key(model_dir: Path, dtype) -> tuple:
    stats = [(f.name, f.stat()) for f in sorted(model_dir.glob("*.safetensors"))]
    return (str(model_dir), str(dtype), tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def state_dict(model_dir: str | os.PathLike, dtype) -> dict[str, Any] | None:
    """The checkpoint's tensors from host memory (read now if not yet kept), or None when not keeping.
    The caller asks only for a checkpoint stored in `dtype` (a conversion is from_pretrained's to do)."""
    global _kept
    if not _keeping:
        return None
    folder = Path(model_dir).resolve()
    key = _key(folder, dtype)
    if _kept is None or _kept[0] != key:
        _kept = None  # the previous checkpoint's memory goes before the next one's comes
        tensors = _read(folder)
        _kept = (key, tensors)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        print(
            f"base weights: {folder} read into host memory ({size / 1e9:.2f} GB), kept for the next cells",
            file=sys.stderr,
        )
    return _kept[1]


def _read(folder: Path) -> dict[str, Any]:
    """Every tensor of the folder's safetensors files, pinned where there is CUDA."""
    # torch: kept out of workflow parsing (the rules import d2lora.models, which imports this)
    import torch

    # safetensors: as torch
    from safetensors import safe_open

    pin = torch.cuda.is_available()
    tensors: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        # one tensor at a time: pinning copies, and the whole unpinned checkpoint need not exist at once
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                tensors[name] = tensor.pin_memory() if pin else tensor
    return tensors


def forget() -> None:
    """Drop the kept weights (tests; a server frees them when it ends)."""
    global _kept
    _kept = None


def kept_key() -> tuple | None:
    """What is kept now: (folder, dtype, files) or None."""
    return _kept[0] if _kept is not None else None
