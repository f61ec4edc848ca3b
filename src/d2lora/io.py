"""File helpers shared by every stage: atomic writes, JSONL with located errors, hashing.

Every writer goes through a temporary file in the same directory and `os.replace`, so a
reader (or a later rule) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and, where known, the line."""


def canonical_json(obj: Any) -> str:
    """One text per value: keys sorted, no whitespace, non-JSON values as str(). What every
    content hash in the project (configs, manifests' params, resume fingerprints) is taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `path`; on success it replaces `path`, on failure it is removed.

    Folder outputs (model, adapters, prepared data) are built whole before they appear under their
    final name, so a killed job never leaves a folder that a later rule would take as finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{path}: exists and is not a folder")
            # A non-empty folder cannot be renamed over; move the old one aside first.
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old)
        else:
            os.rename(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line or a line that is not an object names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: file does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{lineno}: malformed JSON: {err.msg}") from err
            if not isinstance(row, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under a directory (or of one file), keyed by relative path."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {
        str(p.relative_to(path)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def write_tsv(frame, path: str | os.PathLike) -> None:
    """A pandas DataFrame as TSV, atomically, with stable line endings."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n")
