"""File lists with sizes and SHA-256 checksums: proof that a directory is what was written.

A training checkpoint records every file it holds in ``checkpoint.json`` (written last, after
every listed file has been fsynced), so a truncated, overwritten or missing file is found before
anything reads it: a resume skips such a checkpoint, and evaluation and export refuse it, instead
of loading garbage. Directories without a list (plain model directories, checkpoints written
before lists existed) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .layout import MANIFEST_FILE

CHUNK_BYTES = 1 << 20

FileList = dict[str, dict[str, Any]]
"""Relative POSIX path → {"size": bytes, "sha256": hex digest}."""


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and what is wrong."""


def digest(path: Path, durable: bool = False) -> dict[str, Any]:
    """Size and SHA-256 of a file; ``durable`` first makes its contents reach the disk (fsync):
    a list being written must only ever describe bytes that a power loss cannot take back."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        if durable:
            os.fsync(handle.fileno())
        while chunk := handle.read(CHUNK_BYTES):
            sha.update(chunk)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def list_files(directory: Path, skip: Iterable[str] = (MANIFEST_FILE,)) -> FileList:
    """Every file under ``directory`` (but ``skip``), fsynced, with its size and checksum."""
    skipped = set(skip)
    return {path.relative_to(directory).as_posix(): digest(path, durable=True)
            for path in sorted(directory.rglob("*"))
            if path.is_file() and path.relative_to(directory).as_posix() not in skipped}


def read_manifest_json(directory: Path) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of ``directory``; ManifestError if it is not JSON."""
    path = directory / MANIFEST_FILE
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: unreadable ({type(error).__name__}); the checkpoint is "
                            "damaged") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a checkpoint manifest (expected a JSON object)")
    return data


def problem(directory: Path, files: FileList, names: Iterable[str] | None = None) -> str | None:
    """What is wrong with ``directory`` against its file list (None: intact), checking only
    ``names`` (and files under them) when given."""
    chosen = [name for name in files
              if names is None or any(name == n or name.startswith(f"{n}/") for n in names)]
    for name in chosen:
        path = directory / name
        expected = files[name]
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written (truncated?)"
        if digest(path)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum (overwritten or corrupt)"
    return None
