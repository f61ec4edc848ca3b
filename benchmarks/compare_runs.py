"""Two runs of the same grid that differ in one setting (a speed lever on and off): is every
shared cell's score the same within noise?

    python benchmarks/compare_runs.py results_plain results_grouped --names plain,grouped \
        --out benchmarks/results_compare/grouped_vs_plain

Reads each run's per-example predictions (`eval/<benchmark>/<task>/<method>/<init>/n<n>/s<seed>/
predictions.jsonl`, as the workflow writes them under `results/`) and tests B against A cell by
cell with the significance table's own statistics (d2lora.results.significance: the difference
B - A with its paired-bootstrap interval over examples, McNemar's exact test where accuracies are
0/1 and each arm has one seed, Holm's adjustment within each task and metric). A cell of one run
only is listed, not compared. Where both runs kept `provenance/config_used.yaml`, the settings that
differ are written beside the table, so the comparison says what it compared.

Writes <out>.csv (one row per cell and metric), <out>.md and <out>.json (verdict and config
difference). Exit status 0 whatever the verdict; the verdict is `same within noise` when no
difference is significant after Holm's adjustment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402

from d2lora import grid  # noqa: E402
from d2lora.grid import DEFAULT_BOOTSTRAP_SAMPLES, DEFAULT_CONFIDENCE, DEFAULT_SEED  # noqa: E402
from d2lora.io import DataFileError, atomic_path  # noqa: E402
from d2lora.results.per_example import CellKey, CellExamples, load_examples  # noqa: E402
from d2lora.results.significance import SIGNIFICANCE_FORMATS, significance_table  # noqa: E402
from d2lora.results.tables import markdown, write_csv  # noqa: E402

CELL_FIELDS = ("task", "method", "init", "n", "seed")
NAME, NUMBER = "[^/]+", r"\d+"
# A cell's predictions relative to a results folder: grid.eval_file's path with every field a group.
PREDICTIONS = re.compile(
    grid.eval_file(
        f"(?P<benchmark>{NAME})",
        {k: f"(?P<{k}>{NUMBER if k in ('n', 'seed') else NAME})" for k in CELL_FIELDS},
        r"predictions\.jsonl",
        "",
    )
    + "$"
)
ARM_SEPARATOR = "@"


def run_cells(results: Path) -> tuple[list[dict], list[Path]]:
    """Every evaluated cell under one run's results folder and its predictions file."""
    cells, paths = [], []
    for path in sorted(results.glob("eval/**/predictions.jsonl")):
        match = PREDICTIONS.match("/" + path.relative_to(results).as_posix())
        if match:
            cells.append({**match.groupdict(), "n": int(match["n"]), "seed": int(match["seed"])})
            paths.append(path)
    if not cells:
        raise DataFileError(f"{results}: no eval/<benchmark>/<task>/<method>/<init>/n<n>/s<seed>/predictions.jsonl")
    return cells, paths


def run_examples(results: Path) -> dict[CellKey, CellExamples]:
    """One run's per-example values, by cell and metric."""
    return load_examples(*run_cells(results))


def arm_init(init: str, name: str) -> str:
    """An init's name in one run's arm, so that one significance table holds both runs."""
    return f"{init}{ARM_SEPARATOR}{name}"


def flatten(config, prefix: str = "") -> dict[str, object]:
    if isinstance(config, Mapping):
        flat = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: config}


def config_difference(run_a: Path, run_b: Path) -> dict[str, list] | None:
    """{dotted key: [A's value, B's value]} for every setting the runs' configs disagree on (a key
    one config lacks is null there); None where either run kept no config_used.yaml."""
    paths = [run / "provenance" / "config_used.yaml" for run in (run_a, run_b)]
    if not all(path.is_file() for path in paths):
        return None
    flat_a, flat_b = (flatten(yaml.safe_load(path.read_text()) or {}) for path in paths)
    return {
        key: [flat_a.get(key), flat_b.get(key)]
        for key in sorted(set(flat_a) | set(flat_b))
        if flat_a.get(key) != flat_b.get(key)
    }


def compare(
    run_a: Path,
    run_b: Path,
    names: tuple[str, str] = ("a", "b"),
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> dict:
    """B against A for every cell evaluated in both runs: the table, the cells of one run only and
    the verdict."""
    runs = {name: run_examples(run) for name, run in zip(names, (run_a, run_b))}
    shared = runs[names[0]].keys() & runs[names[1]].keys()
    if not shared:
        raise DataFileError(f"{run_a} and {run_b} share no evaluated cell")
    examples = {
        key._replace(init=arm_init(key.init, name)): cell
        for name, run in runs.items()
        for key, cell in run.items()
        if key in shared
    }
    inits = sorted({key.init for key in shared})
    table = significance_table(
        examples,
        sorted({(key.task, key.metric) for key in shared}),
        [(arm_init(init, names[0]), arm_init(init, names[1])) for init in inits],
        samples,
        confidence,
        seed,
    )
    significant = table[table["significant"] == "yes"]
    return {
        "runs": {names[0]: str(run_a), names[1]: str(run_b)},
        "cells_compared": len(table),
        "only_in": {name: sorted(key.describe() for key in runs[name].keys() - shared) for name in names},
        "significant": len(significant),
        "verdict": "same within noise" if significant.empty else "different",
        "largest_difference": _largest(table),
        "config_difference": config_difference(run_a, run_b),
        "statistics": {"bootstrap_samples": samples, "confidence": confidence, "seed": seed},
        "table": table,
    }


def _largest(table) -> dict | None:
    if table.empty:
        return None
    row = table.loc[table["diff"].abs().idxmax()]
    return {
        "cell": f"{row['task']}/{row['metric']}/{row['method']}/{row['a'].rsplit(ARM_SEPARATOR, 1)[0]}/n{row['n']}",
        "diff": float(row["diff"]),
        "ci": [float(row["diff_ci_low"]), float(row["diff_ci_high"])],
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    table = result["table"]
    write_csv(table, out.with_suffix(".csv"), SIGNIFICANCE_FORMATS)
    summary = {key: value for key, value in result.items() if key != "table"}
    with atomic_path(out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    names = list(result["runs"])
    lines = [
        f"# {names[1]} against {names[0]}: {result['verdict']}",
        "",
        f"- runs: {names[0]} = `{result['runs'][names[0]]}`, {names[1]} = `{result['runs'][names[1]]}`",
        f"- {result['cells_compared']} cell(s) and metric(s) compared, {result['significant']} significant "
        "after Holm's adjustment",
    ]
    if result["largest_difference"]:
        largest = result["largest_difference"]
        lines.append(
            f"- largest difference: {largest['cell']} {largest['diff']:+.3f} "
            f"[{largest['ci'][0]:+.3f}, {largest['ci'][1]:+.3f}]"
        )
    for name, cells in result["only_in"].items():
        if cells:
            lines.append(f"- only in {name} (not compared): {', '.join(cells)}")
    difference = result["config_difference"]
    if difference is None:
        lines.append("- config difference: unknown (a run kept no provenance/config_used.yaml)")
    else:
        lines.append(f"- config difference ({len(difference)} setting(s)):")
        lines += [f"  - `{key}`: {a!r} -> {b!r}" for key, (a, b) in difference.items()]
    lines += ["", markdown(table, SIGNIFICANCE_FORMATS)]
    with atomic_path(out.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="results folder of the first run (the plain setting)")
    parser.add_argument("run_b", type=Path, help="results folder of the second run (the lever)")
    parser.add_argument("--names", default="a,b", help="the two runs' names, comma-separated (default a,b)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--bootstrap-samples", type=int, default=DEFAULT_BOOTSTRAP_SAMPLES)
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    names = tuple(name.strip() for name in args.names.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1] or any(ARM_SEPARATOR in n for n in names):
        parser.error(f"--names: two different names without '{ARM_SEPARATOR}', comma-separated (got {args.names!r})")
    for run in (args.run_a, args.run_b):
        if not run.is_dir():
            parser.error(f"{run}: not a folder")
    try:
        result = compare(args.run_a, args.run_b, names, args.bootstrap_samples, args.confidence, args.seed)
    except (DataFileError, ValueError) as error:
        parser.error(str(error))
    write(result, args.out)
    print(out_line(result, args.out))
    return result


def out_line(result: dict, out: Path) -> str:
    return (
        f"{result['verdict']}: {result['cells_compared']} compared, {result['significant']} significant "
        f"-> {out.with_suffix('.md')}"
    )


if __name__ == "__main__":
    main()
