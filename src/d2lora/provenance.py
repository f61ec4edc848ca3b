"""Where and with what a run happened: package versions, git commit, host and device, and the
config_used.yaml / versions.tsv bundle of the report."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Iterable

import yaml

from d2lora.io import atomic_path

PACKAGES = (
    "d2lora",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "gguf",
    "lm_eval",
    "rouge_score",
    "snakemake",
    "pandas",
    "numpy",
    "matplotlib",
    "pyyaml",
)


NOT_INSTALLED = "not installed"


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of `names` plus the interpreter and platform."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def write_provenance_bundle(config: dict, versions: dict[str, str], out_dir: str | os.PathLike) -> dict[str, Path]:
    """config_used.yaml and versions.tsv in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"config": out_dir / "config_used.yaml", "versions": out_dir / "versions.tsv"}
    # Snakemake may hand over dict subclasses that safe_dump refuses; JSON makes plain types.
    plain = json.loads(json.dumps(config, default=str))
    with atomic_path(paths["config"]) as tmp:
        tmp.write_text(yaml.safe_dump(plain, sort_keys=True, allow_unicode=True), encoding="utf-8")
    lines = ["package\tversion", *(f"{name}\t{version}" for name, version in sorted(versions.items()))]
    with atomic_path(paths["versions"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def find_git_dir(start: str | os.PathLike) -> Path | None:
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        if (folder / ".git").is_dir():
            return folder / ".git"
    return None


def packed_ref(git_dir: Path, ref: str) -> str | None:
    packed = git_dir / "packed-refs"
    if not packed.is_file():
        return None
    for line in packed.read_text().splitlines():
        if line.endswith(" " + ref):
            return line.split()[0]
    return None


# A tree unpacked from `git archive` (how code reaches an air-gapped node) has no .git; whoever unpacks
# it can name its commit here (`git get-tar-commit-id < repo.tar`).
GIT_COMMIT_ENV = "D2LORA_GIT_COMMIT"


def git_commit(start: str | os.PathLike = ".") -> str | None:
    """HEAD's commit, read from .git directly (compute nodes may lack git); outside a repo, the commit
    named by $D2LORA_GIT_COMMIT, else None."""
    git_dir = find_git_dir(start)
    if git_dir is None or not (git_dir / "HEAD").is_file():
        return os.environ.get(GIT_COMMIT_ENV) or None
    head = (git_dir / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head or None
    ref = head[len("ref: ") :]
    loose = git_dir / ref
    return loose.read_text().strip() if loose.is_file() else packed_ref(git_dir, ref)


def device_string() -> str:
    """The accelerator a job would use; importing torch only when it is installed."""
    if importlib.util.find_spec("torch") is None:
        return "cpu (torch not installed)"
    # torch only where it is installed: the device record works without it
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{count}x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"cpu ({os.cpu_count()} cores)"


def run_manifest(start: str | os.PathLike = ".", device: str | None = None) -> dict:
    """Where and from which code a run happened."""
    return {
        "git_commit": git_commit(start),
        "host": socket.gethostname(),
        "device": device if device is not None else device_string(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
