"""An output folder's lifecycle, for every stage that writes one (tokenizer, DATA, run, demo, model folder).

Opening --out: `check_out` decides whether a folder is new, holds the stage's own earlier output (which the
stage resumes or, with --overwrite, replaces) or holds anything else (refused: bertforge never overwrites what it
did not write). Each stage describes what it writes with an `OutKind`.

Publishing: a file or folder is written under a temporary name beside its final one, flushed to disk (fsync)
and renamed into place, then the parent folder is flushed, so a crash at any moment leaves either the complete
old version or the complete new one, never something half-written that looks complete.

The run record: the settings that define a run are the fields of its config dataclass not declared
`may_change` (where it runs, how often it saves, ...). A resumed run must keep them; `changed_setting` says
which one differs from the recorded run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bertforge.errors import BertforgeError

_HASH_CHUNK = 1 << 20
_MAY_CHANGE = "may_change"


# ---------------------------------------------------------------------------------------------- opening --out

@dataclass(frozen=True)
class OutKind:
    """What one stage writes to --out: how errors name it and how to recognise it."""

    noun: str                          # as in "--out X already holds a run"
    foreign: str                       # a folder of anything else, as in "--out X exists and is not a model folder"
    is_ours: Callable[[Path], bool]
    resumable: bool = False            # the stage can continue what it wrote (--resume)


def check_out(out: Path, kind: OutKind, *, overwrite: bool, resume: bool = False) -> bool:
    """Refuses an --out that is a file, holds something else, or holds the stage's own output unasked.

    Returns True when `out` holds the stage's own earlier output (allowed by `overwrite` or `resume`: the caller
    replaces or continues it), False when it is absent or an empty folder.
    """
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_file():
        raise BertforgeError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and not any(out.iterdir()):
        return False
    if not kind.is_ours(out):
        raise BertforgeError(f"--out {out} {kind.foreign}; choose an empty or new folder (bertforge never "
                             "overwrites it)")
    if not (overwrite or resume):
        again = "--resume to continue it or --overwrite to start over (deleting it)" if kind.resumable else \
            "--overwrite to replace it"
        raise BertforgeError(f"--out {out} already holds {kind.noun}; pass {again}")
    return True


# ---------------------------------------------------------------------------------------------- publishing

def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            sha.update(block)
    return sha.hexdigest()


def fsync_path(path: Path) -> None:
    """Flushes a file or a folder to disk (so a rename never exposes unwritten data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Writes JSON as every bertforge file holds it: UTF-8, non-ASCII kept, one trailing newline."""
    path.write_text(json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def write_json_atomic(path: Path, value: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """`write_json` under a temporary name beside `path`, then `publish_file`."""
    tmp = path.with_name(path.name + ".tmp")
    write_json(tmp, value, indent=indent, sort_keys=sort_keys)
    publish_file(tmp, path)


def publish_file(tmp: Path, path: Path) -> None:
    """Renames the finished file `tmp` to `path` (replacing any file there) once both are on disk."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def publish_dir(tmp: Path, out: Path) -> None:
    """Renames the finished folder `tmp` to `out` once everything in it is on disk.

    An earlier folder at `out` (the caller has checked it may go) is first moved aside under a `.tmp-old-*`
    name and deleted after the rename, so `out` is never missing or mixed.
    """
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that hold them
        fsync_path(path)
    fsync_path(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{out.name}-", dir=out.parent))
        os.replace(out, old)  # onto the empty folder just made: a unique name
        os.replace(tmp, out)
        fsync_path(out.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
        fsync_path(out.parent)


# ---------------------------------------------------------------------------------------------- the run record

def may_change(default: Any = dataclasses.MISSING) -> Any:
    """A config field that may differ between the sessions of one run (it does not define the run)."""
    return dataclasses.field(default=default, metadata={_MAY_CHANGE: True})


def as_json(value: Any) -> Any:
    """`value` as JSON stores and reads it back: paths as strings, tuples as lists."""
    return json.loads(json.dumps(value, default=str))


def run_settings(config: Any) -> dict[str, Any]:
    """The settings that define the run a config dataclass describes (every field not declared `may_change`)."""
    return as_json({f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                    if not f.metadata.get(_MAY_CHANGE)})


def changed_setting(saved: dict[str, Any], record: dict[str, Any], config: Any) -> tuple[str, Any, Any] | None:
    """The first entry of `record` that differs from the recorded run `saved`: (name, before, now), or None.

    A setting that `saved` lacks (recorded before the setting existed) counts as its default in `config`'s class.
    """
    defaults = as_json({f.name: f.default for f in dataclasses.fields(config)
                        if f.default is not dataclasses.MISSING})
    for name, now in record.items():
        before = saved.get(name, defaults.get(name))
        if before != now:
            return name, before, now
    return None
