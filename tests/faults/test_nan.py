"""Non-finite losses in a real `bertforge pretrain` (the CLI, in process): a NaN injected into chosen batches' loss
is skipped and reported; K (= 5) in a row stop the run with the last checkpoint intact; `--on-nan rollback` reloads
the last good checkpoint, skips the offending batches and finishes with finite weights. NaN *weights* (through
--init) are covered by tests/test_pretrain.py::test_non_finite_weights_stop_the_run_with_a_message.

Each survived injection is appended to BERTFORGE_FAULT_REPORT when set (figures for docs/faults.md)."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from bertforge import checkpoint
from bertforge.cli import main
from bertforge.monitor import read_metrics

pretrain_module = importlib.import_module("bertforge.pretrain")  # `bertforge.pretrain` is also the function
FLAGS = ["--model", "tiny", "--batch-size", "4", "--max-steps", "14", "--save-every", "2", "--eval-every", "100",
         "--log-every", "1", "--keep-last", "10", "--device", "cpu"]


def _poison(monkeypatch, bad_calls: set[int]) -> list[int]:
    """Makes the training loss NaN on the given (1-based) loss calls; returns the list of calls made."""
    real = pretrain_module.pretraining_loss
    calls: list[int] = []

    def loss(model, batch, totals):
        calls.append(len(calls) + 1)
        value, stats = real(model, batch, totals)
        return (value * float("nan"), stats) if calls[-1] in bad_calls else (value, stats)

    monkeypatch.setattr(pretrain_module, "pretraining_loss", loss)
    return calls


def _report(kind: str, survived: bool) -> None:
    if os.environ.get("BERTFORGE_FAULT_REPORT"):
        with open(os.environ["BERTFORGE_FAULT_REPORT"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"nan": kind, "survived": survived}) + "\n")


def _finite_model(run) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(run / "model" / "model.safetensors").values())


def test_isolated_nan_steps_are_skipped_reported_and_the_run_finishes(synthetic_data, tmp_path, monkeypatch,
                                                                    capsys):
    run = tmp_path / "RUN"
    _poison(monkeypatch, {3, 9})
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS]) == 0
    err = capsys.readouterr().err
    assert "step 3: non-finite loss or gradient (nan); the update was skipped" in err
    assert "step 9: non-finite loss or gradient (nan)" in err
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "nonfinite_loss"] == [3, 9]
    assert _finite_model(run)
    _report("isolated", True)


def test_k_nan_steps_in_a_row_stop_with_the_last_checkpoint_intact(synthetic_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "RUN"
    _poison(monkeypatch, set(range(5, 10)))
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bertforge: error: the loss was not finite for 5 steps in a row"), last
    assert "step_0000004" in last and "Traceback" not in last
    newest = checkpoint.latest_complete_checkpoint(run)
    assert newest.name == "step_0000004" and checkpoint.verify_checkpoint(newest)["step"] == 4
    monkeypatch.undo()  # the cause is gone: the run resumes from its last good checkpoint and finishes
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), "--resume"]) == 0
    assert _finite_model(run)
    _report("stop_then_resume", True)


@pytest.mark.parametrize("bad", [range(5, 10), range(3, 8)])
def test_rollback_reloads_the_last_good_checkpoint_skips_the_batches_and_goes_on(bad, synthetic_data, tmp_path,
                                                                                 monkeypatch, capsys):
    run = tmp_path / "RUN"
    calls = _poison(monkeypatch, set(bad))
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS, "--on-nan", "rollback"]) == 0
    err = capsys.readouterr().err
    good = max(s for s in range(0, bad.start, 2))  # the checkpoint before the first bad step
    assert f"rolled back to {run / 'checkpoints' / f'step_{good:07d}'}" in err
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "rollback"] == [good]
    assert max(r["step"] for r in records if "loss" in r and "event" not in r) == 14
    # the loop repeated the steps after the good checkpoint on fresh batches: more loss calls than steps
    assert len(calls) == 14 + (bad.stop - 1 - good)
    assert _finite_model(run)
    _report("rollback", True)


def test_rollback_can_lower_the_learning_rate(synthetic_data, tmp_path, monkeypatch, capsys):
    runs = {}
    for name, extra in (("plain", []), ("halved", ["--nan-lr-factor", "0.5"])):
        run = tmp_path / name
        _poison(monkeypatch, set(range(5, 10)))
        assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS, "--on-nan", "rollback",
                     *extra]) == 0
        runs[name] = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r and "event" not in r}
        assert _finite_model(run)
    assert "learning rate x0.5" in capsys.readouterr().err
    # after the rollback every step runs at half the rate the plain rollback uses
    assert runs["halved"][12] == pytest.approx(0.5 * runs["plain"][12])
    assert runs["halved"][1] == pytest.approx(runs["plain"][1])
