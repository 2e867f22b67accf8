"""The start-up table of `bertforge serve`: every model and run it offers, loaded once, looked up by name.

Requests name a model or run; the server finds it here and never builds a path from a request. Models load
through the same functions as `bertforge fill-mask` / `nsp` (`model_folder.load_model`) and `bertforge predict`
(`finetune.read_task_record` + `finetune.load_task_model`), so a folder serves exactly as it predicts.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertforge import model_folder
from bertforge.finetune import TASK_FILE, load_task_model, read_task_record
from bertforge.checkpoint import CHECKPOINTS_DIR
from bertforge.errors import BertforgeError
from bertforge.monitor import METRICS_FILE
from bertforge.pretrain import CONFIG_FILE
from bertforge.tasks import TASKS, TaskOptions
from bertforge.tokenizer import Tokenizer

PRETRAINING = "pretraining"  # the kind of a model with MLM and NSP heads; fine-tuned ones are named by their task


@dataclass
class ServedModel:
    """One loaded model. `lock` lets one request at a time use it (the others queue), so concurrent requests
    never interleave on the same weights or device memory."""

    name: str
    kind: str                    # "pretraining" | "classify" | "ner" | "qa"
    path: Path                   # as given on the command line
    model: nn.Module             # eval mode, on `device`
    tokenizer: Tokenizer
    device: torch.device
    max_seq_len: int             # the fine-tuning window, or the position table of a pre-trained model
    notes: list[str] = field(default_factory=list)
    task: Any = None             # fine-tuned: the task with its label names and options
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind, "path": str(self.path), "notes": self.notes}
        if self.task is not None and self.task.label_names:
            entry["labels"] = list(self.task.label_names)
        if self.kind == "classify":
            entry["text_count"] = self.task.text_count
        return entry


@dataclass(frozen=True)
class ServedRun:
    """A training run folder whose metrics.jsonl the server reads on each request (it may still be training)."""

    name: str
    path: Path

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path)}

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def config(self) -> dict[str, Any] | None:
        """The run's config.json, or None when it has none or it cannot be read (being rewritten, damaged): the
        page then shows the curves without it."""
        path = self.path / CONFIG_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def checkpoints(self) -> list[str]:
        """Names of the run's complete checkpoints (those with meta.json), oldest first."""
        folder = self.path / CHECKPOINTS_DIR
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "meta.json").is_file())


def split_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` is named by its folder (a trailing slash ignored)."""
    name, sep, folder = spec.partition("=")
    if sep and name and "/" not in name:
        return name, Path(folder)
    path = Path(spec)
    return path.resolve().name, path


def load_served_model(name: str, path: Path, device: torch.device) -> ServedModel:
    """A pre-trained (run, checkpoint, Hugging Face) or fine-tuned folder, on `device` in eval mode."""
    folder = model_folder.resolve_model_dir(path)
    if (folder / TASK_FILE).is_file():
        folder, record = read_task_record(folder)
        task = TASKS[record["task"]](TaskOptions(**record["options"]), **record["state"])
        model, tokenizer, notes = load_task_model(folder, task.architecture, None, record["max_seq_len"])
        return ServedModel(name, record["task"], path, model.to(device).eval(), tokenizer, device,
                           record["max_seq_len"], notes, task)
    loaded = model_folder.load_model(path)
    return ServedModel(name, PRETRAINING, path, loaded.model.to(device).eval(), loaded.tokenizer(),
                       device, loaded.config.max_position_embeddings, loaded.notes)


def check_run(name: str, path: Path) -> ServedRun:
    """A run folder: one with metrics.jsonl, or a pre-training run's config.json (no metrics logged yet)."""
    if not path.is_dir():
        raise BertforgeError(f"run folder {path} does not exist")
    if not (path / METRICS_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        raise BertforgeError(f"{path} is not a run folder (no {METRICS_FILE} or {CONFIG_FILE}); pass the --out "
                             "folder of `bertforge pretrain` (or a fine-tuning run's runs/seed_S)")
    return ServedRun(name, path)


@dataclass
class Table:
    """Everything one server offers, by name."""

    models: dict[str, ServedModel]
    runs: dict[str, ServedRun]


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BertforgeError(f"two {what}s are named {name!r}; name them apart with --{what} NAME=DIR")
        seen.add(name)


def load_table(model_specs: list[str], run_specs: list[str], device: torch.device) -> Table:
    """Load every `--model [NAME=]DIR` and check every `--run [NAME=]DIR`; any bad folder is a BertforgeError
    before anything is served."""
    if not model_specs and not run_specs:
        raise BertforgeError("nothing to serve: give at least one --model DIR or --run RUN_DIR")
    models = [split_spec(spec) for spec in model_specs]
    runs = [split_spec(spec) for spec in run_specs]
    _unique([name for name, _ in models], "model")
    _unique([name for name, _ in runs], "run")
    return Table({name: load_served_model(name, path, device) for name, path in models},
                 {name: check_run(name, path) for name, path in runs})
