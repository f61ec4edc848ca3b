"""Does a speed lever change what a preset's cells score? The chosen cells trained and evaluated
twice through the workflow, without the lever and with it, then compared cell by cell
(benchmarks/compare_runs.py: paired bootstrap, McNemar, Holm).

    python benchmarks/lever_accuracy.py --config config/mini.yaml \
        --lever benchmarks/levers/group_by_length.yaml --methods dpo,orpo --benchmarks gsm8k \
        --out benchmarks/out/lever_accuracy -- --cores 16 --resources gpu=3 --scheduler greedy

`--seeds 1,2` trains both arms with these seeds instead of the preset's (a GPU does not repeat its
training bit for bit, so seeds are what separates a small effect from run-to-run noise).

A lever is a config file that Snakemake merges over --config (its second `--configfile`), holding
only the settings it changes. Both arms run in this checkout's `results/`: first the preset as it
is, then with the lever, so Snakemake reruns only the jobs whose settings the lever changed (and
reuses the base model, the prepared data and whatever else the lever leaves alone). The chosen
cells' evaluation files and their adapters' training records (training.json, manifest.json) are
copied after each arm into <out>/<arm>/ (with the config the arm ran, as
provenance/config_used.yaml), and <out>/comparison.{md,csv,json} says whether they differ. A
cell the lever did not make Snakemake recompute is an error, not a match: the comparison would be
of a run with itself. `results/` is left as the lever made it; the next plain run recomputes those
cells. Snakemake's own output goes to <out>/snakemake_<arm>.log.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402
from snakemake.utils import update_config  # noqa: E402

from compare_runs import compare, out_line, write  # noqa: E402
from d2lora import grid  # noqa: E402

RESULTS = "results"
EVAL_FILES = ("predictions.jsonl", "scores.json", "manifest.json")
# Each trained cell's record of how it trained (settings, seconds, memory), which the next arm overwrites in results/.
ADAPTER_RECORDS = ("training.json", "manifest.json")


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SystemExit(f"{what} {path}: no such file")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or not loaded:
        raise SystemExit(f"{what} {path}: not a mapping of settings")
    return loaded


def merged(config: dict, lever: dict) -> dict:
    """The config Snakemake runs with the lever as a second --configfile (nested keys merged)."""
    out = copy.deepcopy(config)
    update_config(out, copy.deepcopy(lever))
    return out


def chosen_evaluations(
    config: dict, methods: set[str], benchmarks: set[str], inits: set[str] | None = None, sizes: set[int] | None = None
) -> list[tuple[str, dict]]:
    """(benchmark, cell wildcards) of every evaluation of the grid in the chosen methods and benchmarks
    (and inits and n, where given)."""
    chosen = [
        (benchmark, cell.wildcards)
        for benchmark, cell in grid.evaluation_jobs(config)
        if cell.method in methods
        and benchmark in benchmarks
        and (inits is None or cell.init in inits)
        and (sizes is None or cell.n in sizes)
    ]
    if not chosen:
        raise SystemExit(
            f"the grid evaluates no cell of methods {sorted(methods)} on {sorted(benchmarks)}"
            + (f", inits {sorted(inits)}" if inits else "")
            + (f", n {sorted(sizes)}" if sizes else "")
        )
    return chosen


def run_arm(name: str, configfiles: list[Path], targets: list[str], snakemake_args: list[str], out: Path) -> float:
    """Snakemake on the targets; returns when it started. Fails with the log's tail."""
    cmd = [sys.executable, "-m", "snakemake", *snakemake_args, "--rerun-incomplete", *targets, "--configfile"]
    cmd += [str(path) for path in configfiles]
    log_path = out / f"snakemake_{name}.log"
    print(f"[lever_accuracy] arm {name}: {len(targets)} evaluation(s), log {log_path}", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"[lever_accuracy] arm {name}: exit {code} after {time.time() - started:.0f} s", flush=True)
    if code != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise SystemExit(f"arm {name}: snakemake failed (exit {code}); {log_path} ends:\n" + "\n".join(tail))
    return started


def keep_arm(name: str, chosen: list[tuple[str, dict]], config: dict, out: Path, started: float | None) -> Path:
    """Copy the arm's evaluation files and training records into <out>/<name>/; with `started`, every
    predictions file must be newer (recomputed by this arm), else nothing is copied."""
    if started is not None:
        stale = [
            path
            for path in (grid.eval_file(benchmark, cell, "predictions.jsonl", RESULTS) for benchmark, cell in chosen)
            if (ROOT / path).stat().st_mtime < started
        ]
        if stale:
            raise SystemExit(
                f"arm {name}: the lever did not make Snakemake recompute {len(stale)} of {len(chosen)} "
                f"evaluation(s) (e.g. {stale[:3]}): it changes no setting their jobs depend on"
            )
    arm = out / name
    if arm.exists():
        shutil.rmtree(arm)
    staging = out / f".{name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    for benchmark, cell in chosen:
        for file in EVAL_FILES:
            target = Path(grid.eval_file(benchmark, cell, file, str(staging)))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / grid.eval_file(benchmark, cell, file, RESULTS), target)
    for cell_path in sorted({grid.CELL_PATH.format(**cell) for _, cell in chosen}):
        adapter = ROOT / RESULTS / "adapters" / cell_path
        for file in ADAPTER_RECORDS:
            if (adapter / file).is_file():  # an n = 0 cell evaluates the base model: nothing trained
                target = staging / "adapters" / cell_path / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(adapter / file, target)
    (staging / "provenance").mkdir(parents=True)
    (staging / "provenance" / "config_used.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    staging.rename(arm)
    return arm


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the preset (e.g. config/mini.yaml)")
    parser.add_argument("--lever", type=Path, required=True, help="config file of the settings the lever changes")
    parser.add_argument("--methods", required=True, help="comma-separated training methods (sft, dpo, orpo)")
    parser.add_argument("--benchmarks", default="gsm8k", help="comma-separated benchmarks (default gsm8k)")
    parser.add_argument("--inits", help="comma-separated inits (default: every init of the chosen cells)")
    parser.add_argument("--n", help="comma-separated training set sizes (default: every n of the chosen cells)")
    parser.add_argument(
        "--seeds",
        help="comma-separated training seeds, in place of the preset's `seeds` for both arms (default: the preset's)",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("snakemake_args", nargs="*", help="after --: Snakemake's options (default --cores <all>)")
    args = parser.parse_args(argv)
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    benchmarks = {b.strip() for b in args.benchmarks.split(",") if b.strip()}
    if not methods <= {"sft", *grid.PREFERENCE_METHODS}:
        parser.error(f"--methods: training methods only (sft, dpo, orpo), got {sorted(methods)}")
    inits = {i.strip() for i in args.inits.split(",") if i.strip()} if args.inits else None
    try:
        sizes = {int(n) for n in args.n.split(",") if n.strip()} if args.n else None
    except ValueError:
        parser.error(f"--n: comma-separated whole numbers, got {args.n!r}")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()] if args.seeds is not None else None
    except ValueError:
        parser.error(f"--seeds: comma-separated whole numbers, got {args.seeds!r}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        parser.error(f"--seeds: one or more distinct seeds, got {args.seeds!r}")
    config_path, lever_path = (path.resolve() for path in (args.config, args.lever))
    config = read_yaml(config_path, "--config")
    if seeds is not None:
        config = {**config, "seeds": seeds}
    lever = read_yaml(lever_path, "--lever")
    with_lever = merged(config, lever)
    if with_lever == config:
        parser.error(f"--lever {args.lever}: changes no setting of {args.config}")
    chosen = chosen_evaluations(config, methods, benchmarks, inits, sizes)
    if chosen != chosen_evaluations(with_lever, methods, benchmarks, inits, sizes):
        parser.error(f"--lever {args.lever}: changes which cells the grid evaluates; a lever may change only how")
    targets = [grid.eval_file(benchmark, cell, "predictions.jsonl", RESULTS) for benchmark, cell in chosen]
    snakemake_args = args.snakemake_args or ["--cores", str(os.cpu_count() or 1)]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    configfiles = [config_path]
    if seeds is not None:
        # Both arms train these seeds: a config file of them after the preset, before the lever.
        seeds_file = out / "seeds.yaml"
        seeds_file.write_text(yaml.safe_dump({"seeds": seeds}))
        configfiles.append(seeds_file)
    plain_name, lever_name = "plain", lever_path.stem
    run_arm(plain_name, configfiles, targets, snakemake_args, out)
    plain = keep_arm(plain_name, chosen, config, out, None)
    started = run_arm(lever_name, [*configfiles, lever_path], targets, snakemake_args, out)
    with_it = keep_arm(lever_name, chosen, with_lever, out, started)
    result = compare(plain, with_it, (plain_name, lever_name))
    write(result, out / "comparison")
    (out / "command.json").write_text(
        json.dumps({"argv": sys.argv if argv is None else argv, "targets": targets}, indent=2) + "\n"
    )
    print(out_line(result, out / "comparison"), flush=True)
    return result


if __name__ == "__main__":
    main()
