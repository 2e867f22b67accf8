"""SIGKILL at random moments of `pretrain` (during steps, right after a step that evaluates, inside a checkpoint
write), `prepare` and `finetune`: nothing complete-looking is ever half-written, every checkpoint on disk verifies,
`--resume` starts from the newest complete checkpoint and, on the CPU, ends bit-identical to an uninterrupted run.

Trials: BERTFORGE_FAULT_TRIALS (3 by default; `BERTFORGE_FAULT_TRIALS=20 python -m pytest tests/faults` for the full
run). Each trial's outcome is appended to the file named by BERTFORGE_FAULT_REPORT when set (figures for docs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bertforge import checkpoint
from bertforge.cli import main
from conftest import check_ok, cli_command, cli_env, fault_trials, run_cli

STEPS, SAVE_EVERY, EVAL_EVERY = 14, 2, 3
FLAGS = ["--model", "tiny", "--batch-size", "4", "--max-steps", str(STEPS), "--lr", "1e-3", "--dropout", "0.1",
         "--dynamic-masking", "--warmup-steps", "2", "--log-every", "1", "--save-every", str(SAVE_EVERY),
         "--eval-every", str(EVAL_EVERY), "--keep-last", "2", "--device", "cpu"]
PHASES = ("step", "eval", "save")
SAVE_DELAY = 0.4  # seconds each checkpoint save sleeps between its files and meta.json
# `python -m bertforge ARGS` whose checkpoint saves sleep SAVE_DELAY s after writing optimizer.pt (torch.save has
# no other caller in a run), so that a kill lands inside the write window reliably.
SLOW_SAVE_CLI = ("import sys, time, torch\n"
                 "from bertforge.cli import main\n"
                 "save = torch.save\n"
                 "def slow_save(*args, **kwargs):\n"
                 "    save(*args, **kwargs)\n"
                 f"    time.sleep({SAVE_DELAY})\n"
                 "torch.save = slow_save\n"
                 "raise SystemExit(main(sys.argv[1:]))\n")


def _report(record: dict) -> None:
    path = os.environ.get("BERTFORGE_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _train_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the line being written when the process died
            continue
        if "loss" in record and "split" not in record and "event" not in record:
            steps.append(record["step"])
    return steps


def _wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> bool:
    """Polls `condition` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the run neither reached the kill point nor ended")


def _kill_pretrain(run: Path, data: Path, phase: str, rng: random.Random) -> bool:
    """Starts `bertforge pretrain` and SIGKILLs it in `phase`; False if it finished before the kill point."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_CLI, "pretrain", "--data", str(data), "--out",
                                str(run), *FLAGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        if phase == "step":
            target = rng.randint(1, STEPS - 1)
            reached = _wait_for(lambda: len(_train_steps(run)) >= target, process)
            time.sleep(rng.uniform(0, 0.3))
        elif phase == "eval":  # the train line of an evaluating step is logged just before the evaluation
            target = rng.choice(range(EVAL_EVERY, STEPS, EVAL_EVERY))
            reached = _wait_for(lambda: target in _train_steps(run), process)
            time.sleep(rng.uniform(0, 0.02))
        else:  # inside a checkpoint write: its .tmp-step_* folder exists
            skip = rng.randint(0, STEPS // SAVE_EVERY - 2)
            seen: set[str] = set()

            def writing() -> bool:
                folders = {p.name for p in (run / "checkpoints").glob(".tmp-step_*")} if \
                    (run / "checkpoints").is_dir() else set()
                seen.update(folders)
                return bool(folders) and len(seen) > skip

            reached = _wait_for(writing, process)
            time.sleep(rng.uniform(0, SAVE_DELAY))
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    return reached


def _corrupt_checkpoints(run: Path) -> list[str]:
    """Every `step_*` folder that holds meta.json but fails verification (there must be none)."""
    bad = []
    for path in sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []:
        if (path / checkpoint.META_FILE).is_file():
            try:
                checkpoint.verify_checkpoint(path)
            except Exception as exc:  # noqa: BLE001 - counted, then asserted to be zero
                bad.append(f"{path.name}: {exc}")
    return bad


@pytest.fixture(scope="module")
def reference(synthetic_data, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must equal bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "RUN"
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS]) == 0
    return run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(fault_trials()))
def test_sigkill_then_resume_ends_bit_identical(trial, synthetic_data, reference, tmp_path, monkeypatch):
    rng = random.Random(1000 + trial)
    phase = PHASES[trial % len(PHASES)]
    run = tmp_path / "RUN"
    killed = _kill_pretrain(run, synthetic_data, phase, rng)
    corrupt = _corrupt_checkpoints(run)
    newest = checkpoint.latest_complete_checkpoint(run) if not corrupt else None
    loaded: list[Path] = []
    original = checkpoint.load_checkpoint

    def recording(path, *args, **kwargs):
        loaded.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checkpoint", recording)
    status = main(["pretrain", "--data", str(synthetic_data), "--out", str(run), "--resume"]) \
        if (run / "config.json").is_file() else \
        main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS])
    ours, theirs = _weights(run), _weights(reference)
    identical = status == 0 and ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    _report({"trial": trial, "phase": phase, "killed": killed, "resumed_from": newest.name if newest else None,
             "identical": identical, "corrupt": len(corrupt)})
    assert not corrupt, corrupt
    assert status == 0
    assert loaded[:1] == ([newest] if newest else []), (loaded, newest)  # the newest complete one, first
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert identical
    assert _train_steps(run) == _train_steps(reference)


@pytest.mark.slow
def test_sigkill_during_prepare_leaves_nothing_that_looks_complete(corpus_file, tokenizer_dir, tmp_path):
    out = tmp_path / "DATA"
    args = ("prepare", corpus_file, "--tokenizer", tokenizer_dir, "--out", out, "--max-seq-len", "32",
            "--dupe-factor", "20", "--workers", "1", "--quiet")
    rng = random.Random(7)
    killed_midway = 0
    for _ in range(4):
        process = subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=cli_env())
        deadline = time.monotonic() + 120
        # wait until it writes its first files beside --out, then kill at a random moment
        while not any(p.name != out.name for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if out.exists():  # finished, or killed after the atomic rename: what is there is complete and verifies
            check_ok(run_cli("inspect", out, "--verify", "-n", "1"))
            shutil.rmtree(out)
        else:
            killed_midway += 1
        if killed_midway >= 2:
            break
    assert killed_midway, "prepare finished before every kill: the test did not kill it"
    check_ok(run_cli(*args, *(["--overwrite"] if out.exists() else [])))  # the re-run succeeds
    check_ok(run_cli("inspect", out, "--verify", "-n", "1"))


def _classification_files(root: Path) -> tuple[Path, Path]:
    rows = ["sentence\tlabel"] + [f"{'good fine great' if i % 2 else 'bad poor awful'} film number {i}\t{i % 2}"
                                  for i in range(64)]
    train, dev = root / "train.tsv", root / "dev.tsv"
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    dev.write_text("\n".join(rows[:17]) + "\n", encoding="utf-8")
    return train, dev


@pytest.mark.slow
def test_sigkill_during_finetune_leaves_nothing_that_looks_complete(run_dir, tmp_path):
    train, dev = _classification_files(tmp_path)
    out = tmp_path / "FT"
    args = ("finetune", "classify", "--model", run_dir, "--train", train, "--dev", dev, "--out", out,
            "--epochs", "3", "--batch-size", "4", "--max-seq-len", "32", "--device", "cpu")
    process = subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=cli_env())
    deadline = time.monotonic() + 120
    while not (out / "runs").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "metrics.json").exists(), "a killed fine-tuning run left a metrics.json"
    assert not (out / "model" / "finetune.json").exists()
    assert process.returncode != 0, "finetune finished before the kill: the test did not kill it"
    check_ok(run_cli(*args))  # the same command continues the killed run (or starts again if it had no checkpoint)
    assert json.loads((out / "metrics.json").read_text())["task"] == "classify"
    check_ok(run_cli("predict", "--model", out, "--input", dev, "--out", tmp_path / "pred.tsv"))


def test_finetune_reruns_over_what_a_killed_run_left_without_overwrite(run_dir, tmp_path):
    train, dev = _classification_files(tmp_path)
    out = tmp_path / "FT"
    (out / "runs" / "seed_42").mkdir(parents=True)  # what a run killed in its first epoch leaves
    check_ok(run_cli("finetune", "classify", "--model", run_dir, "--train", train, "--dev", dev, "--out", out,
                     "--epochs", "1", "--batch-size", "8", "--max-seq-len", "32", "--device", "cpu"))

