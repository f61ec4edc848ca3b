"""How fast a checkpoint reaches the card: read from its safetensors files (the page cache warm, as a
cell server's next cell finds it) against copied from tensors kept in host memory
(`evaluation.server.keep_base_weights`, d2lora.base_weights), pinned or not.

    python benchmarks/host_weights_copy.py --gb 16 --out benchmarks/out/host_weights_copy

Writes --gb of bf16 tensors in the shapes of a Llama layer stack (hidden 4096, MLP 14336, 8 of 32
heads for K and V: the 8B shape's matrices, as many layers as fit) into safetensors files of about 5 GB
in a temporary folder, reads them once to warm the page cache, then times, each --repeats times:

- files_to_host: read into host memory (a copy out of safetensors' memory map);
- files_to_device: safetensors' safe_open with the device set, tensor by tensor (what from_pretrained
  does with device_map);
- files_to_host_to_device: read to host memory, then copied (pageable);
- kept_pinned_to_device: from tensors already pinned in host memory (keep_base_weights on CUDA);
- kept_pageable_to_device: from tensors already in pageable host memory.

and, once, how long reading the files into pinned host memory takes (what the server's first cell
pays for keeping them). On a CPU only the reads run (the test's tiny size). summary.json: seconds
(the best of the repeats) and GB/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HIDDEN, MLP, KV = 4096, 14336, 1024  # the 8B shape: K and V projections are 8 heads x 128
LAYER_SHAPES = [
    (HIDDEN, HIDDEN),
    (KV, HIDDEN),
    (KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (MLP, HIDDEN),
    (MLP, HIDDEN),
    (HIDDEN, MLP),
]
SHARD_BYTES = 5 * 10**9


def layer_shapes(total_bytes: int, scale: float) -> list[tuple[int, int]]:
    """Shapes of whole layers (each matrix scaled by `scale` per side) up to `total_bytes` of bf16."""
    shapes = [(max(1, int(rows * scale)), max(1, int(cols * scale))) for rows, cols in LAYER_SHAPES]
    per_layer = sum(2 * rows * cols for rows, cols in shapes)
    return shapes * max(1, total_bytes // per_layer)


def write_checkpoint(folder: Path, shapes: list[tuple[int, int]]) -> int:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, written = {}, 0, 0, 0
    for number, shape in enumerate(shapes):
        tensor = torch.randn(shape, generator=generator).to(torch.bfloat16)
        shard[f"w{number}"] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES or number == len(shapes) - 1:
            save_file(shard, str(folder / f"model-{index:05d}.safetensors"))
            written += shard_bytes
            shard, shard_bytes, index = {}, 0, index + 1
    return written


def read(folder: Path, device: str, pin: bool = False) -> dict:
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device=device) as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                tensors[name] = tensor.pin_memory() if pin else tensor
    return tensors


def timed(work, repeats: int, cuda: bool) -> float:
    """The best wall seconds of `repeats` runs of work(), the device synchronized."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        del result
    return best


def measure(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    shapes = layer_shapes(int(args.gb * 1e9), args.scale)
    with tempfile.TemporaryDirectory(prefix="hostweights", dir=args.tmp) as tmp:
        folder = Path(tmp)
        total = write_checkpoint(folder, shapes)
        read(folder, "cpu")  # the page cache warm, as for a server's next cell
        # safetensors maps the files: a copy is what makes the host read happen
        seconds = {
            "files_to_host": timed(lambda: {k: v.clone() for k, v in read(folder, "cpu").items()}, args.repeats, False)
        }
        if cuda:
            seconds["files_to_device"] = timed(lambda: read(folder, "cuda"), args.repeats, True)
            seconds["files_to_host_to_device"] = timed(
                lambda: {k: v.to("cuda") for k, v in read(folder, "cpu").items()}, args.repeats, True
            )
            start = time.perf_counter()
            pinned = read(folder, "cpu", pin=True)
            seconds["files_to_pinned_host_once"] = time.perf_counter() - start
            seconds["kept_pinned_to_device"] = timed(
                lambda: {k: v.to("cuda", non_blocking=True) for k, v in pinned.items()}, args.repeats, True
            )
            del pinned
            pageable = read(folder, "cpu")
            seconds["kept_pageable_to_device"] = timed(
                lambda: {k: v.to("cuda") for k, v in pageable.items()}, args.repeats, True
            )
            del pageable
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "gb": round(total / 1e9, 3),
        "tensors": len(shapes),
        "repeats": args.repeats,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "gb_per_second": {k: round(total / 1e9 / v, 2) for k, v in seconds.items() if v > 0},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=16.0, help="checkpoint size (the 8B shape: 16 GB in bf16)")
    parser.add_argument("--scale", type=float, default=1.0, help="each matrix side times this (tests: tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="where the checkpoint is written (default: the system's)")
    parser.add_argument("--cpu", action="store_true", help="the host reads only, even where there is CUDA")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/host_weights_copy"))
    args = parser.parse_args(argv)
    summary = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
