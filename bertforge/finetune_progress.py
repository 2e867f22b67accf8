"""What a fine-tuning run keeps on disk so that an interrupted one continues instead of starting again.

    DIR/runs/config.json            the settings that define the run, and the sha256 of its train and dev files
    DIR/runs/seed_S/progress.json   per-epoch dev metrics so far, the best epoch, whether the seed finished
    DIR/runs/seed_S/checkpoints/    the shared loop's checkpoints, each with the dev evaluations, best epoch and
                                    best weights so far (`SeedRun`); removed once the seed finishes
    DIR/runs/seed_S/best.safetensors  the best epoch's weights, once the seed finished

`--resume` continues every unfinished seed from its newest checkpoint (finished seeds are only re-evaluated).
Running the same command again over a run that was killed does the same; nothing trained is ever cleared
without `--overwrite`.
Every file here is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bertforge import checkpoint, distributed
from bertforge.errors import BertforgeError
from bertforge.run_folder import (OutKind, changed_setting, check_out, publish_file, run_settings, sha256_file,
                                 write_json_atomic)
from bertforge.tasks.base import Evaluation

RECORD_FILE = "config.json"       # under DIR/runs/
PROGRESS_FILE = "progress.json"   # under DIR/runs/seed_S/
BEST_FILE = "best.safetensors"    # under DIR/runs/seed_S/


def seed_dir(out: Path, seed: int) -> Path:
    return out / "runs" / f"seed_{seed}"


def run_record(config: Any) -> dict[str, Any]:
    """The run-defining settings of a FinetuneConfig, with the content hashes of its train and dev files."""
    return {**run_settings(config), "seeds": list(config.seeds or (config.seed,)),
            "train_sha256": sha256_file(Path(config.train)), "dev_sha256": sha256_file(Path(config.dev))}


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / PROGRESS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers among an evaluation's metrics (what the history and metrics.json keep)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class BestEpoch:
    """A seed's best dev evaluation so far (as progress.json and checkpoints record it)."""

    epoch: int
    step: int
    score: float


class SeedRun:
    """One seed's run: its dev evaluations (per-epoch history, best epoch, best weights on the CPU), how it ended.

    The loop keeps the evaluations in every checkpoint (`state_dict`, `load_state_dict`), so a resumed seed goes on
    with those it had at that checkpoint. Rank 0 also writes them to progress.json after each evaluation, and the
    best weights to best.safetensors once the seed finishes.
    """

    def __init__(self, seed: int, run_dir: Path, main_metric: str, steps_per_epoch: int) -> None:
        self.seed, self.run_dir, self.main_metric, self.steps_per_epoch = seed, run_dir, main_metric, steps_per_epoch
        self.history: list[dict[str, Any]] = []  # [{epoch, step, metrics}]
        self.best: BestEpoch | None = None
        self.best_weights: dict[str, torch.Tensor] = {}
        self.best_evaluation: Evaluation | None = None  # None when read back from disk (evaluated again)
        self.stop_reason, self.step = "", 0  # where it ended and why: "max_steps" | "signal"

    def record(self, model: nn.Module, evaluation: Evaluation) -> dict[str, float]:
        """Adds the dev evaluation of `model` at the end of the next epoch; returns what the loop logs."""
        epoch = len(self.history) + 1
        step = epoch * self.steps_per_epoch
        metrics = numeric_metrics(evaluation.metrics)
        self.history.append({"epoch": epoch, "step": step, "metrics": metrics})
        score = evaluation.metrics.get(self.main_metric, -math.inf)
        if score > (self.best.score if self.best else -math.inf):  # the first epoch wins ties: fewer updates
            self.best, self.best_evaluation = BestEpoch(epoch, step, score), evaluation
            self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if distributed.is_main():
            self._write(finished=False)
        return {"epoch": epoch, **metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best and asdict(self.best), "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise BertforgeError(f"the checkpoints in {self.run_dir} were written by an older bertforge that kept "
                                 "the best epoch elsewhere; start the run again with --overwrite")
        self.history = state["history"]
        self.best, self.best_evaluation = BestEpoch(**state["best"]) if state["best"] else None, None
        self.best_weights = {k: v.cpu() for k, v in state["best_weights"].items()}

    def load_finished(self) -> bool:
        """Reads back a seed that finished; False when it has not."""
        saved = read_progress(self.run_dir)
        if saved is None or not saved["finished"]:
            return False
        self.history, self.best, self.stop_reason = saved["history"], BestEpoch(**saved["best"]), saved["stop_reason"]
        self.best_weights = load_file(str(self.run_dir / BEST_FILE))
        return True

    def finish(self) -> None:
        """Rank 0: keeps the best weights and the record of a finished seed, and deletes its checkpoints."""
        tmp = self.run_dir / (BEST_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in self.best_weights.items()}, str(tmp))
        publish_file(tmp, self.run_dir / BEST_FILE)
        self._write(finished=True)
        shutil.rmtree(self.run_dir / checkpoint.CHECKPOINTS_DIR, ignore_errors=True)

    def _write(self, *, finished: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"history": self.history, "best": self.best and asdict(self.best), "finished": finished,
                  "stop_reason": self.stop_reason if finished else None}
        write_json_atomic(self.run_dir / PROGRESS_FILE, record, indent=1, sort_keys=False)


def _unfinished(out: Path, seeds: list[int]) -> list[int]:
    return [s for s in seeds if not (read_progress(seed_dir(out, s)) or {}).get("finished")]


def _has_progress(out: Path, seeds: list[int]) -> bool:
    """Whether any seed finished or wrote a checkpoint: work --overwrite would throw away."""
    return any((seed_dir(out, s) / BEST_FILE).is_file() or
               checkpoint.latest_complete_checkpoint(seed_dir(out, s)) is not None for s in seeds)


def describe_change(saved: dict[str, Any], record: dict[str, Any], config: Any) -> str | None:
    """How the settings differ from the saved run's (None: the same run)."""
    change = changed_setting(saved, record, config)
    if change is None:
        return None
    name, before, now = change
    if name.endswith("_sha256"):
        return f"the {name.removesuffix('_sha256')} file changed since the run started"
    return f"{name} was {before!r}, now {now!r}"


def prepare_out(out: Path, record: dict[str, Any], *, resume: bool, overwrite: bool,
                outputs: tuple[str, ...], config: Any) -> bool:
    """Rank 0's checks of DIR before any work; True when the run continues what DIR holds.

    --resume: the settings must be unchanged and a seed unfinished. Otherwise a finished run, or one stopped by a
    signal (it exported its best epoch), is refused unless --overwrite; a killed run with the same settings
    continues; one with other settings is refused unless --overwrite. Whatever is cleared, the settings of this
    run are recorded first thing.
    """
    kind = OutKind(noun="a fine-tuning run", foreign="holds other files, not a fine-tuning run", resumable=True,
                   is_ours=lambda path: any((path / name).exists() for name in outputs))
    check_out(out, kind, overwrite=overwrite, resume=True)  # a file or others' folder; the rest is decided here
    saved_path = out / "runs" / RECORD_FILE
    saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
    seeds = record["seeds"]
    if resume:
        if saved is None:
            raise BertforgeError(f"{out} holds no fine-tuning run to resume (runs/{RECORD_FILE} missing); start it "
                                 "without --resume")
        changed = describe_change(saved, record, config)
        if changed:
            raise BertforgeError(f"--resume continues {out} unchanged, but {changed}; pass --overwrite to start "
                                 "a new run instead")
        if not _unfinished(out, seeds):
            raise BertforgeError(f"{out} is finished (every seed ran to its last epoch); nothing to resume")
        return True
    present = [name for name in outputs if (out / name).exists()]
    interrupted = saved is not None and _unfinished(out, saved.get("seeds", seeds)) and \
        _has_progress(out, saved.get("seeds", seeds))
    if not overwrite:
        if (out / "metrics.json").exists() and interrupted:
            raise BertforgeError(f"{out} holds a fine-tuning run that stopped early ({', '.join(present)}); pass "
                                 "--resume to continue it, or --overwrite or another --out to start again")
        if (out / "metrics.json").exists():
            raise BertforgeError(f"{out} already holds a fine-tuning run ({', '.join(present)}); pass "
                                 "--overwrite or choose another --out")
        if interrupted:
            changed = describe_change(saved, record, config)
            if changed:
                raise BertforgeError(f"{out} holds an interrupted fine-tuning run with other settings ({changed}); "
                                     "pass --overwrite to start again or choose another --out")
            print(f"bertforge: {out} holds an interrupted run of this command; continuing it (--overwrite starts "
                  "again)", file=sys.stderr)
            return True
        if present:
            print(f"bertforge: {out} holds what an interrupted run left before its first checkpoint "
                  f"({', '.join(present)}); starting again", file=sys.stderr)
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, record, indent=1, sort_keys=False)
    return False
