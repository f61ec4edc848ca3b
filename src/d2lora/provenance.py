"""What a reader of the report needs to audit a run: config, versions, data checksums, runtimes.

Everything here reads files the workflow already wrote (Snakemake benchmark TSVs, the data
stage's manifests) so that the provenance rules never rerun or re-hash anything expensive.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

from d2lora.io import atomic_path, canonical_json, json_sha256, read_json, sha256_file, sha256_tree

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
BENCHMARK_DIR = "benchmarks"


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of `names` plus the interpreter and platform."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def benchmark_cell(path: str | os.PathLike) -> tuple[str, str]:
    """(rule, wildcards) from results/benchmarks/<rule>/<wildcards...>.tsv.

    A rule without wildcards may write results/benchmarks/<rule>.tsv; its cell is ''.
    """
    parts = Path(path).with_suffix("").parts
    if BENCHMARK_DIR not in parts[:-1]:
        raise ValueError(f"{path}: expected a path like .../{BENCHMARK_DIR}/<rule>/<cell>.tsv")
    start = len(parts) - 1 - parts[::-1].index(BENCHMARK_DIR)
    return parts[start + 1], "/".join(parts[start + 2 :])


def read_benchmark(path: str | os.PathLike) -> pd.DataFrame:
    """One Snakemake benchmark file (one row per repeat); 'NA' and '-' mean not measured."""
    rule, cell = benchmark_cell(path)
    table = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    table.insert(0, "cell", cell)
    table.insert(0, "rule", rule)
    return table


def runtime_table(benchmark_tsv_paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All benchmark files as one table with rule and cell columns, sorted by rule then cell."""
    frames = [read_benchmark(path) for path in benchmark_tsv_paths]
    if not frames:
        return pd.DataFrame(columns=["rule", "cell", "s", "h:m:s", "max_rss"])
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["rule", "cell"], kind="mergesort").reset_index(drop=True)


def row_count(rows: dict, filename: str):
    """Rows of a prepared file; manifests key counts by split ('train') or by file name."""
    for key in (filename, Path(filename).stem):
        if key in rows:
            return rows[key]
    return None


def source_records(manifest: dict) -> list[tuple[str, dict]]:
    """(split, record) per source; manifests keep sources per split or as a plain list."""
    sources = manifest.get("sources", [])
    if isinstance(sources, dict):
        return sorted(sources.items())
    return [(source.get("split", ""), source) for source in sources]


def source_rows(role: str, split: str, record: dict) -> list[dict]:
    """One row per raw file; a generated source is identified by its generator code's hash."""
    base = {
        "role": role,
        "stage": "source",
        "split": split,
        "config": canonical_json(record.get("config")),
        "rows": record.get("rows"),
    }
    rows = [{**base, "file": entry["path"], "sha256": entry["sha256"]} for entry in record.get("files", [])]
    generator = record.get("generator")
    if generator:
        rows.append({**base, "file": f"generator:{generator.get('function')}", "sha256": generator.get("code_sha256")})
    return rows


def manifest_rows(path: str | os.PathLike) -> list[dict]:
    manifest = read_json(path)
    role = manifest.get("role", Path(path).parent.name)
    rows = [row for split, record in source_records(manifest) for row in source_rows(role, split, record)]
    prepared = manifest.get("files") or manifest.get("prepared") or {}
    counts = manifest.get("counts") or manifest.get("rows") or {}
    rows += [
        {
            "role": role,
            "stage": "prepared",
            "split": Path(name).stem,
            "config": "",
            "file": name,
            "sha256": sha,
            "rows": row_count(counts, name),
        }
        for name, sha in sorted(prepared.items())
    ]
    return rows


def dataset_checksum_table(manifest_paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """sha256 of every raw source file (or generator) and every prepared file, per data role."""
    rows = [row for path in manifest_paths for row in manifest_rows(path)]
    columns = ["role", "stage", "split", "file", "sha256", "rows", "config"]
    table = pd.DataFrame(rows, columns=columns).astype({"rows": "Int64"})
    return table.sort_values(["role", "stage", "split", "file"], kind="mergesort").reset_index(drop=True)


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


def git_commit(start: str | os.PathLike = ".") -> str | None:
    """HEAD's commit, read from .git directly (compute nodes may lack git); None outside a repo."""
    git_dir = find_git_dir(start)
    if git_dir is None or not (git_dir / "HEAD").is_file():
        return None
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


# --- Per-result manifests ------------------------------------------------------------------
# Every trained adapter folder and every evaluation cell carries a manifest.json: the hash of the
# config it was made under, the sha256 of its inputs and outputs, package versions, git commit,
# host and device. `python -m d2lora.verify results/` re-hashes against them.

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Set by d2lora.runtime.job from snakemake.config: the sha256 of the whole config of the run.
CONFIG_SHA_ENV = "D2LORA_CONFIG_SHA256"
# Environment variables whose values are secrets wherever they are set; the config's
# `hf_token_env` adds its own name through D2LORA_SECRET_ENVS (d2lora.runtime.job).
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")
SECRET_ENVS_VAR = "D2LORA_SECRET_ENVS"
REDACTED = "***"


def config_sha256(config: dict) -> str:
    """sha256 of the config as canonical JSON (key order and YAML layout do not matter)."""
    return json_sha256(config)


def secret_values() -> list[str]:
    """Values of the environment variables that hold tokens (never written anywhere)."""
    names = set(SECRET_ENVS) | {n for n in os.environ.get(SECRET_ENVS_VAR, "").split(",") if n}
    # Longest first, so a token that contains another is replaced whole.
    return sorted({os.environ[n] for n in names if len(os.environ.get(n, "")) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def input_record(path: str | os.PathLike) -> dict:
    """sha256 of an input file, or of every file of an input folder.

    The base model folder (it holds `source.json`, which records the sha256 of every weight file)
    is represented by source.json alone: re-hashing 16 GB of weights in every job would cost
    minutes, and `d2lora.verify` checks the weights against source.json separately.
    """

    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    if (path / "source.json").is_file():
        return {"path": str(path), "files": {"source.json": sha256_file(path / "source.json")}}
    return {"path": str(path), "files": sha256_tree(path)}


def build_manifest(
    kind: str,
    inputs: dict,
    output_dir: str | os.PathLike,
    params: dict,
    outputs: Iterable[str] | None = None,
    device: str | None = None,
) -> dict:
    """The manifest of one result. `outputs` names files in output_dir (all of its files when None:
    the whole folder is the result, and verify also reports files the manifest does not list)."""

    output_dir = Path(output_dir)
    if outputs is None:
        names = sorted(
            p.name
            for p in output_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_NAME
        )
        scope = "folder"
    else:
        names = sorted(outputs)
        scope = "files"
    where = run_manifest(Path(__file__).parent)
    where["job_device"] = device
    if where["git_commit"] is None:
        where["git_commit"] = git_commit(".")
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config_sha256": os.environ.get(CONFIG_SHA_ENV) or None,
        "params_sha256": config_sha256(params),
        "params": json.loads(json.dumps(params, default=str)),
        "inputs": {name: input_record(path) for name, path in sorted(inputs.items()) if path is not None},
        "outputs": {name: sha256_file(output_dir / name) for name in names},
        "outputs_scope": scope,
        "packages": package_versions(),
        **where,
    }


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Atomically, with every secret value redacted (a token must never reach a manifest)."""
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(redact(text), encoding="utf-8")


def _manifest_cell(kind: str | None, params: dict) -> str:
    """task/method/init/n<n>/s<seed> (evaluation), adapt/method/init/n<n>/s<seed> or warmup (training)."""
    if params.get("phase") == "warmup":
        return "warmup"
    head = params.get("task") if kind == "evaluation" else params.get("phase")
    return f"{head}/{params.get('method')}/{params.get('init')}/n{params.get('n')}/s{params.get('seed')}"


def _precision_text(precision: dict | None) -> str:
    # Training records bf16 autocast or not, evaluation the weights' dtype; both say why.
    if not precision:
        return ""
    return f"{precision['dtype']} ({precision['setting']}: {precision['reason']})"


def manifest_table(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per result manifest: what, where, from which code and config, on which machine."""
    rows = []
    for path in paths:
        path = Path(path)
        manifest = read_json(path)
        params = manifest.get("params", {})
        packages = manifest.get("packages", {})
        rows.append(
            {
                "kind": manifest.get("kind"),
                "result": str(path.parent),
                "benchmark": params.get("benchmark", ""),
                "cell": _manifest_cell(manifest.get("kind"), params),
                "config_sha256": (manifest.get("config_sha256") or "")[:12],
                "params_sha256": (manifest.get("params_sha256") or "")[:12],
                "outputs": len(manifest.get("outputs", {})),
                "git_commit": (manifest.get("git_commit") or "")[:12],
                "host": manifest.get("host"),
                "device": manifest.get("device"),
                "precision": _precision_text(params.get("precision")),
                "torch": packages.get("torch"),
                "transformers": packages.get("transformers"),
                "peft": packages.get("peft"),
                "trl": packages.get("trl"),
                "created_utc": manifest.get("created_utc"),
            }
        )
    columns = [
        "kind",
        "result",
        "benchmark",
        "cell",
        "config_sha256",
        "params_sha256",
        "outputs",
        "git_commit",
        "host",
        "device",
        "precision",
        "torch",
        "transformers",
        "peft",
        "trl",
        "created_utc",
    ]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["kind", "result"], kind="mergesort").reset_index(drop=True)
