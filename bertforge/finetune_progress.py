"""What a fine-tuning run keeps on disk so that an interrupted one continues instead of starting again.

    DIR/runs/config.json            the settings that define the run, and the sha256 of its train and dev files
    DIR/runs/seed_S/progress.json   per-epoch dev metrics so far, the best epoch, whether the seed finished
    DIR/runs/seed_S/best.safetensors  the best epoch's weights so far
    DIR/runs/seed_S/checkpoints/    the shared loop's checkpoints (removed once the seed finishes)

`--resume` continues every unfinished seed from its newest checkpoint (finished seeds are only re-evaluated).
Running the same command again over a run that was killed does the same; nothing trained is ever cleared
without `--overwrite`.
Every file here is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bertforge import checkpoint
from bertforge.errors import BertforgeError
from bertforge.run_folder import (OutKind, changed_setting, check_out, publish_file, run_settings, sha256_file,
                                 write_json_atomic)

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


def write_progress(run_dir: Path, history: list[dict[str, Any]], best: dict[str, Any] | None, *,
                   finished: bool = False, stop_reason: str | None = None) -> None:
    """history: [{epoch, step, metrics}], metrics numeric; best: {epoch, step, score} or None."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / PROGRESS_FILE, {"history": history, "best": best, "finished": finished,
                                                "stop_reason": stop_reason}, indent=1, sort_keys=False)


def save_best(run_dir: Path, state: dict[str, torch.Tensor]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (BEST_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    publish_file(tmp, run_dir / BEST_FILE)


def load_best(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / BEST_FILE))


def _unfinished(out: Path, seeds: list[int]) -> list[int]:
    return [s for s in seeds if not (read_progress(seed_dir(out, s)) or {}).get("finished")]


def _has_progress(out: Path, seeds: list[int]) -> bool:
    """Whether any seed finished, kept a best epoch or wrote a checkpoint: work --overwrite would throw away."""
    for seed in seeds:
        run_dir = seed_dir(out, seed)
        if (run_dir / BEST_FILE).is_file() or checkpoint.latest_complete_checkpoint(run_dir) is not None:
            return True
    return False


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
