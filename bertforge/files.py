"""File helpers shared by every stage that writes something a crash must not leave half-written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            sha.update(block)
    return sha.hexdigest()


def fsync_path(path: Path) -> None:
    """Flushes a file or a directory to disk (so a rename never exposes unwritten data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any, *, indent: int = 1, sort_keys: bool = False) -> None:
    """Writes JSON under a temporary name beside `path`, then renames it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
