"""Run-folder layout and atomic, verifiable checkpoints.

    RUN/config.json                          resolved run config (+ model config)
    RUN/checkpoints/step_NNNNNNN/            model.safetensors, optimizer.pt, meta.json
    RUN/model/                               the final model (Hugging Face layout)

A checkpoint is written into `RUN/checkpoints/.tmp-step_NNNNNNN/`, every file is fsynced, `meta.json`
(written last) records the size and sha256 of the other files, and only then is the folder renamed
into place: a crash at any moment leaves either the complete folder or a `.tmp-*` one that is ignored.

Policy for damaged checkpoints: a `step_*` folder without `meta.json` cannot come from our own writer
(the rename happens after meta.json is synced) and is ignored as incomplete; a folder whose meta.json
is unreadable or whose files do not match their recorded size/sha256 is *corrupt* and is refused with
a one-line error naming it, never skipped silently (resuming from an older step without telling the
user would hide lost work; the user moves the folder away to resume from the previous one).

Weights load through safetensors and the rest through `torch.load(weights_only=True)`: loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.run_folder import sha256_file, write_json, writing_dir

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "optimizer.pt"
META_FILE = "meta.json"
CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states, as lists and tensors only."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, state: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Atomically writes `RUN/checkpoints/step_NNNNNNN/` and returns it.

    model: the plain module (not DDP- or compile-wrapped); tied weights are stored once.
    state: optimizer/scheduler/scaler/RNG state, tensors and plain containers only (-> optimizer.pt).
    meta: JSON-serialisable facts (data position, epoch, config, ...) stored in meta.json with
    `step`, the format version and each file's size and sha256.
    """
    final = checkpoint_dir(run_dir, step)
    then = "free space or fix the folder, then resume from the previous checkpoint with --resume"
    with writing_dir(final, what="checkpoint", then=then, tmp=final.parent / f".tmp-{final.name}") as tmp:
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                 for name in (MODEL_FILE, STATE_FILE)}
        write_json(tmp / META_FILE, {"format_version": CHECKPOINT_FORMAT, "step": step, **meta, "files": files})
    return final  # (an earlier save of this step, by a resumed run that stops where it started, is replaced)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Checks meta.json and every file's size and sha256; returns the meta dict or raises BertforgeError."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BertforgeError(f"checkpoint {path} is corrupt ({META_FILE}: {exc}); "
                             "move it away to resume from the previous checkpoint") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != expected["bytes"]:
            raise BertforgeError(f"checkpoint {path} is corrupt ({name} is missing or has the wrong size); "
                                 "move it away to resume from the previous checkpoint")
        if sha256_file(file) != expected["sha256"]:
            raise BertforgeError(f"checkpoint {path} is corrupt ({name} fails its sha256 check); "
                                 "move it away to resume from the previous checkpoint")
    return meta


def latest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest `step_*` folder that holds meta.json, verified; None if there is none.

    `.tmp-*` folders (saves cut short) and folders without meta.json are ignored; a newest complete
    folder that fails verification raises BertforgeError naming it (see the module docstring).
    """
    for _, path in _step_dirs(Path(run_dir)):
        if (path / META_FILE).is_file():
            verify_checkpoint(path)
            return path
    return None


def load_checkpoint(path: str | Path, model: nn.Module, *, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verifies `path`, loads its weights into `model` (strict) and returns (state, meta)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path / MODEL_FILE), strict=False,
                                                           device=str(device))
    except RuntimeError as exc:
        raise BertforgeError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise BertforgeError(f"checkpoint {path} does not fit this model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    try:
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except Exception as exc:  # an unpickling refusal or a damaged file: never execute, say which file
        raise BertforgeError(f"cannot load {path / STATE_FILE} safely: {str(exc).splitlines()[0]}") from None
    return state, meta


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Deletes all but the newest `keep_last` (>= 1) checkpoints that hold meta.json; returns the deleted.

    Each is renamed to a `.tmp-*` name before deletion, so a crash mid-delete never leaves a
    half-deleted folder that looks like a checkpoint.
    """
    if keep_last < 1:
        raise BertforgeError(f"--keep-last must be at least 1, got {keep_last}")
    complete = [path for _, path in _step_dirs(Path(run_dir)) if (path / META_FILE).is_file()]
    deleted = []
    for path in complete[keep_last:]:
        doomed = path.parent / f".tmp-del-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        deleted.append(path)
    return deleted


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Deletes `.tmp-*` leftovers of saves cut short (only the single writer calls this)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
