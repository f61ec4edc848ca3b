"""What an evaluate job costs beyond its cell: N jobs in a row, each a fresh process as Snakemake
starts one, with `evaluation.server` off and then on, side by side in one run.

    python benchmarks/evaluate_startup.py --model results/model/base --data results/data/math \
        --benchmark gsm8k --jobs 6 --device auto --out benchmarks/out/evaluate_startup \
        --settings '{"max_new_tokens": 48, "batch_size": 32, "prompt_template": "{question} Answer."}'

Each job evaluates the same cell (the base model, or with `--adapter` a trained adapter on it: an SFT
cell, merged or not as the settings say) into its own folder through
d2lora.evaluation.dispatch, as workflow/scripts/evaluate.py does, so the difference between the
two modes is what the server saves: imports, the CUDA context and, with a compiled decoding step,
the compile. `--rows` evaluates only the first rows, so a job is mostly start-up. Writes
summary.json: wall seconds per job and mode, the mean of jobs 2..N (the amortized cost; job 1 with
the server on also starts it), each job's seconds in its cell and, of those, loading the model (with
the merge), and whether every job's predictions equal the first off job's. `--modes` adds
`server_kept`: the server with `evaluation.server.keep_base_weights` (its first job reads the
checkpoint into host memory, the next build their models from it; d2lora.base_weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from d2lora.io import read_jsonl, write_jsonl  # noqa: E402
from d2lora.precision import cpu_model  # noqa: E402

# One evaluate job, as workflow/scripts/evaluate.py runs it (argv[1]: its arguments as JSON).
JOB = """
import json, sys, types
from d2lora.evaluation.dispatch import evaluate_cell_job
from d2lora.runtime import job
arguments = json.loads(sys.argv[1])
fake = types.SimpleNamespace(threads=1, log=[arguments.pop("log")], config={})
with job(fake):
    evaluate_cell_job(log_path=fake.log[0], **arguments)
"""


MODES = ("own", "server", "server_kept")


def run_fresh_jobs(script: str, mode: str, count: int, job_arguments, out: Path, server_dir: Path) -> list[float]:
    """`count` jobs of `mode`, each `script` in a fresh Python process (argv[1]: job_arguments(folder)
    as JSON, its "log" the job's log) with this run's own server folder; each job's wall seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["D2LORA_SERVER_DIR"] = str(server_dir)  # a server of this run's own
    seconds = []
    for index in range(count):
        arguments = job_arguments(out / mode / f"job{index}")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script, json.dumps(arguments)], env=env)
        seconds.append(round(time.perf_counter() - start, 3))
        if done.returncode != 0:
            sys.exit(f"{mode} job {index} failed; its log: {arguments['log']}")
        print(f"{mode:>9} job {index}: {seconds[-1]:.2f} s", flush=True)
    return seconds


def run_jobs(mode: str, count: int, arguments: dict, out: Path, server_dir: Path) -> list[float]:
    def job_arguments(folder: Path) -> dict:
        return {
            **arguments,
            "server": {"enabled": mode != "own", "idle_seconds": 60, "keep_base_weights": mode == "server_kept"},
            "log": str(folder / "evaluate.log"),
            "scores_path": str(folder / "scores.json"),
            "predictions_path": str(folder / "predictions.jsonl"),
        }

    return run_fresh_jobs(JOB, mode, count, job_arguments, out, server_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a prepared base model folder (results/model/base)")
    parser.add_argument("--data", required=True, help="a prepared data folder with eval.jsonl (results/data/math)")
    parser.add_argument("--adapter", help="a trained adapter folder: every job evaluates it as an SFT cell")
    parser.add_argument("--benchmark", default="gsm8k", choices=["gsm8k", "titles", "arc_easy"])
    parser.add_argument("--settings", required=True, help="the evaluate rule's settings, as JSON")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--rows", type=int, default=0, help="evaluate only the first rows (0: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="own,server", help=f"in this order, from {', '.join(MODES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "evaluate_startup")
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or not set(args.modes) <= set(MODES) or len(set(args.modes)) < len(args.modes):
        parser.error(f"--modes: some of {', '.join(MODES)}, each once; got {','.join(args.modes) or 'none'}")

    args.out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    if args.rows:
        data = args.out / "data"
        write_jsonl(data / "eval.jsonl", read_jsonl(Path(args.data) / "eval.jsonl")[: args.rows])
    task = {"gsm8k": "math", "arc_easy": "math", "titles": "titles"}[args.benchmark]
    arguments = {
        "benchmark": args.benchmark,
        "cell": {"task": task, "method": "sft" if args.adapter else "none", "init": "lora", "n": 0, "seed": 0},
        "model_dir": str(Path(args.model).resolve()),
        "adapter_dir": str(Path(args.adapter).resolve()) if args.adapter else None,
        "data_dir": str(data),
        "settings": json.loads(args.settings),
        "device": args.device,
    }
    with tempfile.TemporaryDirectory(prefix="d2s") as server_dir:  # short: a socket path has a limit
        seconds = {mode: run_jobs(mode, args.jobs, arguments, args.out, Path(server_dir)) for mode in args.modes}
        # the servers' own logs: per cell its time and the GPU memory left allocated after it
        for log in Path(server_dir).glob("*.log"):
            (args.out / "server").mkdir(exist_ok=True)
            shutil.copy(log, args.out / "server" / f"server_{log.name}")
    first = (args.out / args.modes[0] / "job0" / "predictions.jsonl").read_bytes()
    identical = all(
        (args.out / mode / f"job{i}" / "predictions.jsonl").read_bytes() == first
        for mode in seconds
        for i in range(args.jobs)
    )
    amortized = {mode: round(statistics.mean(values[1:]), 3) for mode, values in seconds.items() if len(values) > 1}
    # Where each job's wall time went: in the cell (evaluate_cell's eval_seconds), of which loading the
    # model (and merging); the rest of the wall time is the job's process, the request and the scores' writing.
    cells = {
        mode: [
            {
                key: json.loads((args.out / mode / f"job{i}" / "scores.json").read_text())[key]
                for key in ("eval_seconds", "load_seconds")
            }
            for i in range(args.jobs)
        ]
        for mode in seconds
    }
    record = json.loads((args.out / args.modes[0] / "job0" / "scores.json").read_text())
    summary = {
        "benchmark": args.benchmark,
        "items": record["n_items"],
        "device": record["device"],
        "host_cpu": cpu_model(),
        "jobs": args.jobs,
        "adapter": arguments["adapter_dir"],
        "seconds": seconds,
        "in_cell_seconds": cells,
        "mean_jobs_2_to_n": amortized,
        "speedup_jobs_2_to_n": round(amortized["own"] / amortized["server"], 2)
        if {"own", "server"} <= set(amortized)
        else None,
        "predictions_identical": identical,
        "settings": arguments["settings"],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("mean_jobs_2_to_n", "speedup_jobs_2_to_n", "predictions_identical")}))


if __name__ == "__main__":
    main()
