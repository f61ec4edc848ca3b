"""What a training job costs beyond its cell: N adapt jobs in a row, each a fresh process as Snakemake
starts one, with `training.server` off and then on, side by side in one run.

    python benchmarks/training_startup.py --model results/model/base --data results/data/math \
        --method sft --rows 64 --jobs 4 --device auto --out benchmarks/out/training_startup \
        --hp '{"learning_rate": 1e-4, "epochs": 1, "batch_size": 8, "max_length": 512}'

Each job trains the same cell (`--method` on the first `--rows` rows of train.jsonl, the plain LoRA
init, seed 0) into its own folder through d2lora.training.dispatch, as workflow/scripts/adapt.py does,
so the difference between the two modes is what the server saves: imports, the CUDA context and,
with `"compile_layers": true` in `--hp`, the layers' compile after the server's first cell. Writes
summary.json: wall seconds per job and mode, the mean of jobs 2..N (the amortized cost; job 1 with
the server on also starts it), each job's seconds in its cell (trainer set-up, training) and train
loss, whether every job's adapter equals the first own-process job's byte for byte, and whether the
own-process jobs' adapters equal each other: the device's own run-to-run spread, which a server
cannot be blamed for (a GPU's bf16 kernels need not give the same sums twice).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from d2lora.io import read_jsonl, write_jsonl  # noqa: E402
from d2lora.precision import cpu_model  # noqa: E402
from evaluate_startup import run_fresh_jobs  # noqa: E402  (this folder: the script's own)

# One adapt job, as workflow/scripts/adapt.py runs it (argv[1]: its arguments as JSON).
JOB = """
import json, sys, types
from d2lora.training.dispatch import train_cell_job
from d2lora.runtime import job
arguments = json.loads(sys.argv[1])
fake = types.SimpleNamespace(threads=1, log=[arguments.pop("log")], config={})
with job(fake):
    train_cell_job("run_adaptation", log_path=fake.log[0], **arguments)
"""
MODES = ("own", "server")
ADAPTER = "adapter_model.safetensors"
CELL_SECONDS = ("trainer_setup_seconds", "train_seconds")


def run_jobs(mode: str, count: int, arguments: dict, out: Path, server_dir: Path) -> list[float]:
    def job_arguments(folder: Path) -> dict:
        return {
            **arguments,
            "server": {"enabled": mode == "server", "idle_seconds": 60},
            "log": str(folder / "adapt.log"),
            "out_dir": str(folder / "adapter"),
        }

    return run_fresh_jobs(JOB, mode, count, job_arguments, out, server_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a prepared base model folder (results/model/base)")
    parser.add_argument("--data", required=True, help="a prepared data folder with train.jsonl (results/data/math)")
    parser.add_argument("--method", default="sft", choices=["sft", "dpo", "orpo"])
    parser.add_argument("--hp", required=True, help="the adapt rule's hyperparameters, as JSON")
    parser.add_argument("--lora", default='{"rank": 16, "alpha": 16}', help="training.lora, as JSON")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64, help="train on the first rows of train.jsonl")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "training_startup")
    args = parser.parse_args()
    if args.jobs < 1 or args.rows < 1:
        parser.error("--jobs and --rows: at least 1")

    args.out.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(Path(args.data) / "train.jsonl")[: args.rows]
    write_jsonl(args.out / "data" / "train.jsonl", rows)
    arguments = {
        "model_dir": str(Path(args.model).resolve()),
        "train_path": str((args.out / "data" / "train.jsonl").resolve()),
        "method": args.method,
        "init": "lora",
        "n": len(rows),
        "lora": json.loads(args.lora),
        "hp": json.loads(args.hp),
        "seed": 0,
        "device": args.device,
        "checkpoint_steps": 0,
    }
    with tempfile.TemporaryDirectory(prefix="d2t") as server_dir:  # short: a socket path has a limit
        seconds = {mode: run_jobs(mode, args.jobs, arguments, args.out, Path(server_dir)) for mode in MODES}
        # the servers' own logs: per cell its time and the GPU memory left allocated after it
        for log in Path(server_dir).glob("*.log"):
            (args.out / "server_logs").mkdir(exist_ok=True)
            shutil.copy(log, args.out / "server_logs" / log.name)
    adapters = {
        mode: [(args.out / mode / f"job{i}" / "adapter" / ADAPTER).read_bytes() for i in range(args.jobs)]
        for mode in MODES
    }
    first = adapters["own"][0]
    identical = all(adapter == first for values in adapters.values() for adapter in values)
    own_identical = all(adapter == first for adapter in adapters["own"])
    records = {
        mode: [
            json.loads((args.out / mode / f"job{i}" / "adapter" / "training.json").read_text())
            for i in range(args.jobs)
        ]
        for mode in MODES
    }
    amortized = {mode: round(statistics.mean(values[1:]), 3) for mode, values in seconds.items() if len(values) > 1}
    summary = {
        "method": args.method,
        "rows": len(rows),
        "device": records["own"][0]["device"],
        "host_cpu": cpu_model(),
        "jobs": args.jobs,
        "seconds": seconds,
        # Where a job's wall time went inside its cell; the rest is the job's process and the request.
        "in_cell_seconds": {
            mode: [{key: record.get(key) for key in CELL_SECONDS} for record in values]
            for mode, values in records.items()
        },
        "compile_layers": records["own"][0]["fast_paths"]["compile_layers"],
        "mean_jobs_2_to_n": amortized,
        "speedup_jobs_2_to_n": round(amortized["own"] / amortized["server"], 2) if len(amortized) == 2 else None,
        "adapters_identical": identical,
        "own_jobs_adapters_identical": own_identical,
        "train_loss": {mode: [record.get("train_loss") for record in values] for mode, values in records.items()},
        "hp": arguments["hp"],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "mean_jobs_2_to_n",
                    "speedup_jobs_2_to_n",
                    "adapters_identical",
                    "own_jobs_adapters_identical",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
