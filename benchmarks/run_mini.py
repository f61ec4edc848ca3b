"""Run a preset (default: config/mini.yaml) on one GPU through Snakemake's local executor and
write a timing table: per job, wall seconds, peak GPU memory, training tokens/s, evaluation
items/s and model FLOPs utilization of training.

    python benchmarks/run_mini.py run   --cores 12 --gpu-jobs 3     # the workflow, then the table
    python benchmarks/run_mini.py table                             # the table from results/ only

MFU = 6 x base-model parameters x training tokens / training seconds / the card's bf16 matrix
rate, measured here (an 8192^3 bf16 product, METHOD.md) and stored in <out>/device.json.
Training tokens are counted from the tokenized training set (d2lora.cost.sequence_tokens), so
they are comparable across SFT, DPO and ORPO; the DPO reference forward is not counted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def measure_device(out: Path) -> dict:
    import torch

    from d2lora.cost import measure_matmul_peak

    info = {"cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["name"] = torch.cuda.get_device_name(0)
        info["bf16_matmul_flops"] = measure_matmul_peak("cuda")
        info["torch"] = torch.__version__
    out.mkdir(parents=True, exist_ok=True)
    (out / "device.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"device: {info}", flush=True)
    return info


def run_workflow(config: str, cores: int, gpu_jobs: int, out: Path, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        "--resources",
        f"gpu={gpu_jobs}",
        "--rerun-incomplete",
        "--keep-going",
        *extra,
        "all",
        "--configfile",
        config,
    ]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(out / "snakemake.log", "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    (out / "workflow_wall.json").write_text(
        json.dumps({"wall_seconds": round(wall, 1), "exit_code": code, "command": cmd}, indent=2) + "\n"
    )
    print(f"workflow finished with exit code {code} in {wall:.0f} s", flush=True)
    return wall


def _read_tsv(path: Path) -> dict:
    with open(path) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return rows[0] if rows else {}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def base_parameters(results: Path) -> int | None:
    from safetensors import safe_open

    files = sorted((results / "model" / "base").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def job_rows(results: Path, peak_flops: float | None) -> list[dict]:
    from d2lora.cost import mfu

    params = base_parameters(results)
    rows = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rel = tsv.relative_to(results / "benchmarks").with_suffix("")
        rule, job = rel.parts[0], "/".join(rel.parts[1:])
        bench = _read_tsv(tsv)
        row = {
            "rule": rule,
            "job": job,
            "wall_s": float(bench.get("s", "nan")),
            "max_rss_mb": bench.get("max_rss", ""),
            "peak_gpu_mb": None,
            "train_tokens": None,
            "train_s": None,
            "tokens_per_s": None,
            "samples_per_s": None,
            "mfu": None,
            "items": None,
            "items_per_s": None,
        }
        record = {}
        if rule == "adapt":
            record = _json(results / "adapters" / job / "training.json")
        elif rule == "warmup":
            record = _json(results / "warmup" / job / "training.json") or _json(
                results / "warmup" / "adapter" / "training.json"
            )
        elif rule == "evaluate":
            record = _json(results / "eval" / job / "scores.json")
        if rule in ("adapt", "warmup") and record:
            tokens, seconds = record.get("train_tokens"), record.get("train_seconds")
            row.update(peak_gpu_mb=record.get("peak_gpu_memory_mb"), train_tokens=tokens, train_s=seconds)
            if tokens and seconds:
                row["tokens_per_s"] = round(tokens / seconds, 1)
                row["mfu"] = mfu(params or 0, tokens, seconds, peak_flops or 0)
            if record.get("rows_trained") and seconds:
                row["samples_per_s"] = round(record["rows_trained"] * float(record["hparams"]["epochs"]) / seconds, 2)
        if rule == "evaluate" and record:
            row.update(
                peak_gpu_mb=record.get("peak_gpu_memory_mb"),
                items=record.get("n_items"),
                items_per_s=record.get("items_per_second"),
            )
        rows.append(row)
    return rows


def _fmt(value, digits=1):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def write_table(results: Path, out: Path) -> None:
    device = _json(out / "device.json")
    rows = job_rows(results, device.get("bf16_matmul_flops"))
    if not rows:
        raise SystemExit(f"no Snakemake benchmark files under {results}/benchmarks: has the workflow run?")
    columns = list(rows[0])
    with open(out / "timing.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    by_rule: dict[str, list[dict]] = {}
    for row in rows:
        by_rule.setdefault(row["rule"], []).append(row)
    wall = _json(out / "workflow_wall.json")
    lines = ["# Timing table", ""]
    if device:
        flops = device.get("bf16_matmul_flops")
        lines.append(
            f"Device: {device.get('name', 'cpu')}; measured bf16 matmul rate "
            f"{flops / 1e12:.0f} TFLOP/s (MFU denominator)."
            if flops
            else "Device: CPU."
        )
    if wall:
        lines.append(f"Workflow wall clock: {wall['wall_seconds']:.0f} s (exit code {wall['exit_code']}).")
    lines += [
        "",
        "## Per rule",
        "",
        "| rule | jobs | sum of job wall s | mean s | max s | mean tokens/s | mean MFU | mean items/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule, group in sorted(by_rule.items()):
        walls = [r["wall_s"] for r in group]
        tps = [r["tokens_per_s"] for r in group if r["tokens_per_s"]]
        mfus = [r["mfu"] for r in group if r["mfu"]]
        ips = [r["items_per_s"] for r in group if r["items_per_s"]]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        lines.append(
            f"| {rule} | {len(group)} | {sum(walls):.0f} | {mean(walls):.1f} | {max(walls):.1f} | "
            f"{_fmt(mean(tps))} | {_fmt(mean(mfus) * 100 if mfus else None, 2)}{'%' if mfus else ''} | {_fmt(mean(ips))} |"
        )
    lines += [
        "",
        "## Per job",
        "",
        "| rule | job | wall s | peak GPU MiB | train tokens | tokens/s | samples/s | MFU | items | items/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['job']} | {r['wall_s']:.1f} | {_fmt(r['peak_gpu_mb'], 0)} | {_fmt(r['train_tokens'])} | "
            f"{_fmt(r['tokens_per_s'])} | {_fmt(r['samples_per_s'])} | "
            f"{_fmt(r['mfu'] * 100 if r['mfu'] else None, 2)}{'%' if r['mfu'] else ''} | {_fmt(r['items'])} | {_fmt(r['items_per_s'])} |"
        )
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 12 + len(by_rule)]))
    write_summary(results, out, rows, device, wall)


_STEPS = re.compile(r"^(\d+) of (\d+) steps")
_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")


def workflow_progress(log: Path) -> dict:
    """Jobs done and planned, and seconds from the first to the last timestamp, from Snakemake's log.

    Read from the log rather than the finished run so a run cut off midway still reports them.
    """
    done = total = None
    stamps = []
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        if match := _STEPS.match(line):
            done, total = int(match[1]), int(match[2])
        elif match := _STAMP.match(line):
            stamps.append(datetime.strptime(" ".join(match[1].split()), "%a %b %d %H:%M:%S %Y"))
    span = (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else None
    return {"jobs_done": done, "jobs_total": total, "log_span_s": span}


def write_summary(results: Path, out: Path, rows: list[dict], device: dict, wall: dict) -> dict:
    """summary.json: the run in a few numbers (GPU, jobs, wall clock, the GSM8K evaluations)."""
    progress = workflow_progress(out / "snakemake.log")
    gsm8k = [r for r in rows if r["rule"] == "evaluate" and r["job"].startswith("gsm8k/")]
    summary = {
        "gpu": device.get("name"),
        "bf16_matmul_tflops": round(device["bf16_matmul_flops"] / 1e12, 1) if device.get("bf16_matmul_flops") else None,
        "jobs_total": progress["jobs_total"],
        "jobs_done": progress["jobs_done"],
        "finished": bool(wall) and wall.get("exit_code") == 0,
        # The whole workflow's wall clock once it has ended; until then the span its log covers.
        "grid_wall_s": wall.get("wall_seconds") if wall else progress["log_span_s"],
        "gsm8k_items": max((r["items"] or 0 for r in gsm8k), default=None),
        "gsm8k_eval_jobs": len(gsm8k),
        "gsm8k_eval_s_mean": round(sum(r["wall_s"] for r in gsm8k) / len(gsm8k), 1) if gsm8k else None,
        "job_seconds_by_rule": {
            rule: round(sum(r["wall_s"] for r in rows if r["rule"] == rule), 1)
            for rule in sorted({r["rule"] for r in rows})
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--config", default="config/mini.yaml")
    parser.add_argument("--cores", type=int, default=max(os.cpu_count() or 1, 1))
    parser.add_argument(
        "--gpu-jobs",
        type=int,
        default=1,
        help="jobs sharing the one GPU at a time (--resources gpu=N); small models leave it idle at 1",
    )
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default="benchmarks/out")
    # Anything else (e.g. --scheduler greedy) goes to snakemake, before the target.
    args, snakemake_args = parser.parse_known_args(argv)
    out, results = ROOT / args.out, ROOT / args.results
    out.mkdir(parents=True, exist_ok=True)
    if args.action == "run":
        measure_device(out)
        run_workflow(args.config, args.cores, args.gpu_jobs, out, snakemake_args)
    write_table(results, out)


if __name__ == "__main__":
    main()
