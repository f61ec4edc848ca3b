"""Draw the embedded default's real-data subsets from the full copies in ../shared/data.

    python workflow/resources/data/make_subsets.py [--shared ../shared/data]

Each subset is a uniform random sample drawn with a fixed seed, its rows unchanged (raw fields
and text as in the source, so the same `format` mappers read the subset and the full copy), kept
in the source's order. The source's sha256 is checked first, so a subset is only ever drawn
from the file its SOURCE.md names. Rerunning reproduces the committed files byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0


SUBSETS = {
    # name: (source file under shared/data, its sha256, rows to draw, row filter)
    "econ_titles": ("econ_titles/econ_qfin_arxiv_abstracts.jsonl",
                    "75241477019a9b482e87a23edfeb36c020d3b4da14b5596d1787ed95f99ae098", 80, None),
    "alpaca": ("general_instruct/alpaca_5000.jsonl",
               "fefc43ebcbc2b0f3b6a32596103a6f74501ebcfd465d66d9f05127ecdb63f093", 64, None),
}


def draw(source: Path, sha256: str, rows: int, keep=None, seed: int = SEED) -> list[str]:
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{source}: sha256 differs from {sha256}; is this the copy SOURCE.md names?")
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    candidates = [i for i, line in enumerate(lines) if keep is None or keep(json.loads(line))]
    chosen = sorted(random.Random(f"subset-{seed}").sample(candidates, rows))
    return [lines[i] for i in chosen]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=HERE.parents[3] / "shared" / "data")
    args = parser.parse_args(argv)
    for name, (relative, sha256, rows, keep) in SUBSETS.items():
        out = HERE / name / f"{name}_{rows}.jsonl"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(draw(args.shared / relative, sha256, rows, keep)) + "\n", encoding="utf-8")
        print(f"{out.relative_to(HERE)}: {rows} rows from {relative}, sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
