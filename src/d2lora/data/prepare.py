"""Prepare one data role (warmup, math, titles, forgetting) into one folder.

The folder holds train.jsonl (shuffled once by the seed, so the subset of size n is simply its
first n rows: subsets are nested and fixed), eval.jsonl (source order) and manifest.json
(sources, checksums, counts). It appears only complete: it is built in a temporary sibling and
renamed into place.
"""

from __future__ import annotations

import inspect
import os
import random
from pathlib import Path

from d2lora.data import synthetic
from d2lora.data.formats import DROP_RULES, map_rows
from d2lora.data.schema import validate_rows
from d2lora.data.sources import load_raw, source_format, source_name, source_origin
from d2lora.io import DataFileError, read_json, read_jsonl, sha256_file, staged_dir, write_json, write_jsonl

ROLE_FORMS: dict[str, dict[str, str]] = {
    "warmup": {"train": "pairs"},
    "math": {"train": "pairs", "eval": "math_eval"},
    "titles": {"train": "pairs", "eval": "generation_eval"},
    "forgetting": {"eval": "multiple_choice"},
}
SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}
MANIFEST = "manifest.json"
SUBSET_RULE = "train.jsonl is the source order shuffled by random.Random('subsets-<seed>'); subset n = its first n rows"


def _role_forms(role: str, role_cfg: dict) -> dict[str, str]:
    """The forms of the splits this role config asks for; rejects keys the role cannot use."""
    if role not in ROLE_FORMS:
        raise ValueError(f"unknown role {role!r}; known roles: {', '.join(ROLE_FORMS)}")
    allowed = {*ROLE_FORMS[role], "prompt_template"}
    unknown = sorted(set(role_cfg) - allowed)
    if unknown:
        raise ValueError(f"role {role}: unexpected key(s) {unknown}; this role takes {sorted(allowed)}")
    forms = {split: form for split, form in ROLE_FORMS[role].items() if role_cfg.get(split)}
    if not forms:
        raise ValueError(f"role {role}: no source configured (expected {' and/or '.join(ROLE_FORMS[role])})")
    return forms


def subset_order(rows: list[dict], seed: int) -> list[dict]:
    """The one shuffle of the training rows; every subset is a prefix of it."""
    shuffled = list(rows)
    random.Random(f"subsets-{seed}").shuffle(shuffled)
    return shuffled


def subset(train_rows: list[dict], n: int) -> list[dict]:
    """The first n prepared training rows (the size-n subset); n=0 gives none."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"subset size must be a non-negative int, got {n!r}")
    if n > len(train_rows):
        raise ValueError(f"asked for a subset of n={n} training rows, but there are only {len(train_rows)}")
    return list(train_rows[:n])


def _generator_record(source_cfg: dict, seed: int) -> dict:
    # The code's hash makes the manifest (and so the rule's provenance) change with the generator.
    return {
        "function": "d2lora.data.synthetic.generate",
        "kind": source_cfg.get("kind"),
        "rows": source_cfg.get("rows"),
        "seed": seed,
        "split": source_cfg.get("split"),
        "code_sha256": sha256_file(inspect.getfile(synthetic)),
    }


def _load_split(source_cfg: dict, form: str, prompt_template: str | None, seed: int) -> tuple[list[dict], dict]:
    """Canonical rows of one split and the manifest's record of where they came from."""
    raw, files = load_raw(source_cfg, seed)
    fmt = source_format(source_cfg)
    rows, dropped = map_rows(raw, fmt, form, prompt_template, source_name(source_cfg), source_origin(source_cfg))
    record = {
        "config": source_cfg,
        "format": fmt,
        "form": form,
        "rows": len(rows),
        "rows_read": len(raw),
        "files": [{"path": str(path), "sha256": sha256_file(path)} for path in files],
    }
    if fmt in DROP_RULES:
        record["dropped"] = {"rows": dropped, "rule": DROP_RULES[fmt]}
    if source_cfg.get("source") == "synthetic":
        record["generator"] = _generator_record(source_cfg, seed)
    return rows, record


def _write_folder(out: Path, prepared: dict[str, list[dict]], manifest: dict) -> None:
    with staged_dir(out) as tmp:
        for split, rows in prepared.items():
            write_jsonl(tmp / SPLIT_FILES[split], rows)
        manifest["files"] = {SPLIT_FILES[s]: sha256_file(tmp / SPLIT_FILES[s]) for s in prepared}
        write_json(tmp / MANIFEST, manifest)


def _check_grid(role: str, train: list[dict] | None, max_n: int, origin: str) -> None:
    if max_n and train is None:
        raise ValueError(f"role {role}: the grid asks for n={max_n} but this role has no training data")
    if train is not None and max_n > len(train):
        raise ValueError(
            f"role {role}: the grid asks for n={max_n} but the training data has only {len(train)} rows ({origin})"
        )


def prepare_role(role: str, role_cfg: dict, out_dir: str | os.PathLike, seed: int, max_n: int = 0) -> dict:
    """Prepare `role` from its sources into `out_dir`; returns the manifest written there.

    `max_n` is the largest training subset the experiment grid will take; asking for more
    rows than the source has fails here rather than deep inside training.
    """
    forms = _role_forms(role, role_cfg)
    template = role_cfg.get("prompt_template")
    prepared: dict[str, list[dict]] = {}
    sources: dict[str, dict] = {}
    for split, form in forms.items():
        source_cfg = dict(role_cfg[split])
        if source_cfg.get("source") == "synthetic":
            # A synthetic source generates the split of the slot it sits in (train or eval), which
            # keeps the two disjoint by construction.
            source_cfg.setdefault("split", split)
        prepared[split], sources[split] = _load_split(source_cfg, form, template, seed)
    if "train" in prepared:
        prepared["train"] = subset_order(prepared["train"], seed)
    _check_grid(role, prepared.get("train"), max_n, source_origin(role_cfg["train"]) if "train" in forms else "")
    manifest = {
        "role": role,
        "seed": seed,
        "max_n": max_n,
        "prompt_template": template,
        "forms": forms,
        "counts": {split: len(rows) for split, rows in prepared.items()},
        "sources": sources,
        "subset_rule": SUBSET_RULE,
    }
    _write_folder(Path(out_dir), prepared, manifest)
    return manifest


def load_prepared(folder: str | os.PathLike, split: str) -> list[dict]:
    """Rows of one prepared split, validated against the form its manifest records."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    if split not in manifest.get("forms", {}):
        raise DataFileError(f"{folder / MANIFEST}: role {manifest.get('role')} has no {split!r} split")
    path = folder / SPLIT_FILES[split]
    rows = validate_rows(read_jsonl(path), manifest["forms"][split], path)
    if len(rows) != manifest["counts"][split]:
        raise DataFileError(f"{path}: {len(rows)} rows, but {folder / MANIFEST} records {manifest['counts'][split]}")
    return rows
