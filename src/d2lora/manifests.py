"""Per-result manifests. Every trained adapter folder and every evaluation cell carries a
manifest.json: the hash of the config it was made under, the sha256 of its inputs and outputs,
package versions, git commit, host and device. `python -m d2lora.verify results/` re-hashes against
them; the report's manifest table reads them."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from d2lora.io import atomic_path, json_sha256, read_json, sha256_file, sha256_tree
from d2lora.provenance import git_commit, package_versions, run_manifest
from d2lora.redaction import redact

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Set by d2lora.runtime.job from snakemake.config: the sha256 of the whole config of the run.
CONFIG_SHA_ENV = "D2LORA_CONFIG_SHA256"


def config_sha256(config: dict) -> str:
    """sha256 of the config as canonical JSON (key order and YAML layout do not matter)."""
    return json_sha256(config)


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
