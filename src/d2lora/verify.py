"""Re-hash a results folder against its manifests and list everything that no longer matches.

    python -m d2lora.verify results/          # exit code 0: all match; 1: something does not

Checked:
- every result manifest (`manifest.json` in an adapter folder or beside `scores.json`, written by
  d2lora.manifests.build_manifest): each output file's sha256; for an adapter folder also files
  the manifest does not list; each input's sha256 (an input that changed since makes the result
  stale: it was made from something that no longer exists);
- the data manifests (`results/data/<role>/manifest.json`: the prepared files), the on-policy
  manifests (`results/onpolicy/<task>/manifest.json`: the pair file) and the base model's
  `source.json` (every weight and tokenizer file);
- that every `scores.json` and every adapter folder has a manifest at all.
An input that cannot be found (a local data file on another machine) is listed as a note and
does not fail the check. Hidden files (staging folders, partial-result sidecars) and training
checkpoint folders (`*.checkpoints`, present only while a job runs or after it was killed) are
not results and are skipped.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from d2lora.io import DataFileError, read_json, sha256_file
from d2lora.manifests import MANIFEST_NAME

FAILURES = ("CHANGED", "MISSING", "UNLISTED", "STALE-INPUT", "NO-MANIFEST", "BAD-MANIFEST")


@dataclass(frozen=True)
class Finding:
    status: str  # one of FAILURES, or NOTE
    path: str
    detail: str

    @property
    def fails(self) -> bool:
        return self.status in FAILURES

    def __str__(self) -> str:
        return f"{self.status:<12} {self.path}  {self.detail}"


def _skipped(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(part.startswith(".") or part.endswith(".checkpoints") for part in parts)


def _check_file(path: Path, expected: str, manifest: Path, findings: list[Finding]) -> int:
    if not path.is_file():
        findings.append(Finding("MISSING", str(path), f"listed in {manifest}"))
        return 0
    actual = sha256_file(path)
    if actual != expected:
        findings.append(
            Finding("CHANGED", str(path), f"sha256 {actual[:12]}... but {manifest} says {expected[:12]}...")
        )
    return 1


def _resolve_input(recorded: str, root: Path) -> Path | None:
    """A manifest's input path as the job saw it (relative to the workflow's folder, usually)."""
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [root.parent / path, path, root / path]
    return next((c for c in candidates if c.exists()), None)


def _check_inputs(manifest: dict, manifest_path: Path, root: Path, findings: list[Finding]) -> int:
    checked = 0
    for name, record in manifest.get("inputs", {}).items():
        found = _resolve_input(record["path"], root)
        if found is None:
            findings.append(
                Finding("NOTE", record["path"], f"input '{name}' of {manifest_path} not found; not checked")
            )
            continue
        expected = {"": record["sha256"]} if "sha256" in record else record.get("files", {})
        for rel, sha in expected.items():
            path = found / rel if rel else found
            checked += 1
            if not path.is_file():
                findings.append(Finding("STALE-INPUT", str(path), f"input '{name}' of {manifest_path} is gone"))
            elif sha256_file(path) != sha:
                findings.append(
                    Finding(
                        "STALE-INPUT",
                        str(path),
                        f"input '{name}' changed since {manifest_path.parent} was made from it",
                    )
                )
        if "files" in record and found.is_dir() and not (found / "source.json").is_file():
            extra = sorted(
                str(p.relative_to(found))
                for p in found.rglob("*")
                if p.is_file() and not p.name.startswith(".") and str(p.relative_to(found)) not in expected
            )
            for rel in extra:
                findings.append(
                    Finding(
                        "STALE-INPUT", str(found / rel), f"input '{name}' of {manifest_path} gained this file since"
                    )
                )
    return checked


def _check_result_manifest(manifest: dict, path: Path, root: Path, findings: list[Finding]) -> int:
    folder = path.parent
    checked = 0
    for name, sha in sorted(manifest.get("outputs", {}).items()):
        checked += _check_file(folder / name, sha, path, findings)
    if manifest.get("outputs_scope") == "folder":
        listed = set(manifest.get("outputs", {})) | {MANIFEST_NAME}
        for extra in sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if extra not in listed:
                findings.append(Finding("UNLISTED", str(folder / extra), f"not in {path}"))
    return checked + _check_inputs(manifest, path, root, findings)


def _check_listing(files: dict, folder: Path, manifest: Path, findings: list[Finding]) -> int:
    return sum(_check_file(folder / name, sha, manifest, findings) for name, sha in sorted(files.items()))


def verify(root: str | Path) -> tuple[list[Finding], int]:
    """(findings, number of files checked) for a results folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    findings: list[Finding] = []
    checked = 0
    for path in sorted(root.rglob(MANIFEST_NAME)):
        if _skipped(path, root):
            continue
        try:
            manifest = read_json(path)
        except DataFileError as err:
            findings.append(Finding("BAD-MANIFEST", str(path), str(err)))
            continue
        if not isinstance(manifest, dict):
            findings.append(Finding("BAD-MANIFEST", str(path), "not a JSON object"))
        elif "manifest_version" in manifest and "outputs" in manifest:
            checked += _check_result_manifest(manifest, path, root, findings)
        elif "role" in manifest and isinstance(manifest.get("files"), dict):  # results/data/<role>/
            checked += _check_listing(manifest["files"], path.parent, path, findings)
        elif isinstance(manifest.get("output"), dict) and "sha256" in manifest["output"]:  # results/onpolicy/<task>/
            output = manifest["output"]
            checked += _check_file(path.parent / Path(output["path"]).name, output["sha256"], path, findings)
        else:
            findings.append(Finding("NOTE", str(path), "manifest of an unknown kind; not checked"))
    for path in sorted(root.rglob("source.json")):
        if not _skipped(path, root):
            record = read_json(path)
            checked += _check_listing(record.get("files", {}), path.parent, path, findings)
    results = [p.parent for p in root.rglob("scores.json")] + [
        p.parent for p in root.rglob("adapter_model.safetensors")
    ]
    for folder in sorted(set(results)):
        if not _skipped(folder, root) and not (folder / MANIFEST_NAME).is_file():
            findings.append(Finding("NO-MANIFEST", str(folder), f"a result without {MANIFEST_NAME}"))
    return findings, checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2lora.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default="results", help="the results folder (default: results)")
    args = parser.parse_args(argv)
    findings, checked = verify(args.results)
    for finding in findings:
        print(finding)
    failures = [f for f in findings if f.fails]
    print(
        f"{args.results}: {checked} files checked, {len(failures)} do not match their manifests"
        + (f", {len(findings) - len(failures)} notes" if len(findings) > len(failures) else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
