"""An output folder's lifecycle, for every stage that writes one (tokenizer, DATA, run, demo, model folder).

`check_out` decides whether --out is new, holds the stage's own earlier output (an `OutKind` recognises it: the
stage resumes or, with --overwrite, replaces it) or anything else (refused: bertforge never overwrites what it did
not write). `publish_file` / `publish_dir` rename a finished temporary file or folder into place once it is on disk
(fsync), so a crash leaves the complete old version or the complete new one, never a half-written one. The
settings that define a run are its config dataclass's fields not declared `may_change`; a resumed run keeps them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError

from bertforge.errors import BertforgeError

_HASH_CHUNK = 1 << 20
_FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
_MAY_CHANGE = "may_change"


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


def read_json(path: Path, *, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a missing or unreadable file, or one holding anything but an object, is one
    BertforgeError that ends with what to do (`fix`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BertforgeError(f"{path} does not exist; {fix}") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
        raise BertforgeError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise BertforgeError(f"{path} must hold a JSON object; {fix}")
    return data


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


@contextmanager
def writing_dir(out: Path, *, what: str, then: str, tmp: Path | None = None) -> Iterator[Path]:
    """A fresh temporary folder (`tmp`, default a hidden sibling of `out`) to write into; `publish_dir` at the end.

    On any failure the folder is removed; a failed write (disk full, read-only or vanished folder) becomes one
    line: "cannot write {what} {out} ({reason}); {then}".
    """
    tmp = tmp or out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        publish_dir(tmp, out)
    except (OSError, RuntimeError, SafetensorError) as exc:
        reason = write_failure_reason(exc, tmp.parent)  # measured before the partial folder frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertforgeError(f"cannot write {what} {out} ({reason}); {then}") from None
    except BaseException:  # Ctrl-C or a refusal: never a half-written folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_failure_reason(exc: BaseException, folder: Path) -> str:
    """A short reason for a failed write. torch.save reports a full disk as a RuntimeError ("unexpected pos")
    and safetensors as a SafetensorError, so the free space is checked to name the real cause."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        full = shutil.disk_usage(folder).free < _FULL_DISK_BYTES
    except OSError:
        full = False
    return "No space left on device" if full or "No space left" in text else text


def publish_dir(tmp: Path, out: Path) -> None:
    """Renames the finished folder `tmp` to `out` once everything in it is on disk.

    An earlier folder at `out` (the caller has checked it may go) is first moved aside under a `.tmp-old-*`
    name and deleted after the rename, so `out` is never missing or mixed.
    """
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that hold them
        fsync_path(path)
    fsync_path(tmp)
    old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{out.name}-", dir=out.parent)) if out.exists() else None
    if old is not None:
        os.replace(out, old)  # onto the empty folder just made: a unique name
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old)


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
