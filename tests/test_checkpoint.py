"""Checkpoints: round trip, atomicity under a failing or SIGKILLed save, verification, pruning, safe loading."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bertforge import checkpoint
from bertforge.errors import BertforgeError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _state(model: nn.Module) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()}


def _save(run: Path, step: int, seed: int = 0) -> Path:
    model = _model(seed)
    return checkpoint.save_checkpoint(run, step, model=model, state=_state(model),
                                      meta={"instances": 10 * step, "epoch": 0})


def test_round_trip_restores_weights_state_and_meta(tmp_path):
    model = _model(1)
    state = _state(model)
    path = checkpoint.save_checkpoint(tmp_path, 42, model=model, state=state, meta={"instances": 420, "epoch": 3})
    assert path == tmp_path / "checkpoints" / "step_0000042"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt"]
    fresh = _model(2)
    loaded, meta = checkpoint.load_checkpoint(path, fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert meta["step"] == 42 and meta["instances"] == 420 and meta["epoch"] == 3
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt"}
    assert meta["files"]["optimizer.pt"]["bytes"] == (path / "optimizer.pt").stat().st_size
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    torch.load(path / "optimizer.pt", weights_only=True)  # nothing but tensors and plain containers


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


def test_latest_ignores_temporary_and_incomplete_folders(tmp_path):
    assert checkpoint.latest_complete_checkpoint(tmp_path) is None
    _save(tmp_path, 5)
    newest = _save(tmp_path, 10)
    (tmp_path / "checkpoints" / ".tmp-step_0000020").mkdir()
    (tmp_path / "checkpoints" / "step_0000030").mkdir()  # no meta.json: never complete
    assert checkpoint.latest_complete_checkpoint(tmp_path) == newest


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    previous = _save(tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)  # the weights are written, the optimizer state fails
    with pytest.raises(BertforgeError, match="cannot write checkpoint .*step_0000002 .No space left on device") as info:
        _save(tmp_path, 2)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]
    assert checkpoint.latest_complete_checkpoint(tmp_path) == previous
    checkpoint.load_checkpoint(previous, _model())


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path):
    previous = _save(tmp_path, 1)
    partial = tmp_path / "checkpoints" / ".tmp-step_0000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert checkpoint.latest_complete_checkpoint(tmp_path) == previous
    checkpoint.remove_partial_checkpoints(tmp_path)
    assert not partial.exists() and previous.exists()


_SAVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from bertforge import checkpoint
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    for step in range(1, 10_000):
        checkpoint.save_checkpoint(sys.argv[1], step, model=model, state={"optimizer": optimizer.state_dict()},
                                   meta={"instances": step})
        print(step, flush=True)
""")


def test_sigkill_during_saves_never_leaves_a_corrupt_checkpoint(tmp_path):
    rng = random.Random(7)
    for trial in range(3):
        run = tmp_path / f"run{trial}"
        process = subprocess.Popen([sys.executable, "-c", _SAVER, str(run)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "1"  # one checkpoint is complete
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = checkpoint.latest_complete_checkpoint(run)  # verifies sizes and sha256
        assert latest is not None
        state, meta = checkpoint.load_checkpoint(latest, nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]))
        assert meta["instances"] == meta["step"] and "optimizer" in state


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_a_damaged_newest_checkpoint_is_refused_by_name(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    if damage == "meta":
        (newest / "meta.json").write_text("{not json")
    else:
        weights = newest / "model.safetensors"
        data = bytearray(weights.read_bytes())
        if damage == "flip":
            data[-5] ^= 0x01
        weights.write_bytes(bytes(data if damage == "flip" else data[:-10]))
    with pytest.raises(BertforgeError, match="step_0000002 is corrupt") as info:
        checkpoint.latest_complete_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and "move it away" in str(info.value)


def test_keep_last_prunes_the_oldest_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    (tmp_path / "checkpoints" / "step_0000009").mkdir()  # incomplete: neither counted nor deleted
    deleted = checkpoint.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["step_0000003", "step_0000002", "step_0000001"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_0000004", "step_0000005", "step_0000009"]
    assert checkpoint.latest_complete_checkpoint(tmp_path).name == "step_0000005"
    with pytest.raises(BertforgeError, match="at least 1"):
        checkpoint.prune_checkpoints(tmp_path, 0)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path, 1)
    torch.save({"optimizer": _Exploit()}, path / "optimizer.pt")
    meta = json.loads((path / "meta.json").read_text())  # make the checksums agree: only the content is hostile
    meta["files"]["optimizer.pt"] = {"bytes": (path / "optimizer.pt").stat().st_size,
                                     "sha256": checkpoint.sha256_file(path / "optimizer.pt")}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BertforgeError, match="cannot load .*optimizer.pt safely"):
        checkpoint.load_checkpoint(path, _model())
    assert not (tmp_path / "PWNED").exists()


def test_weights_of_another_model_are_refused(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(BertforgeError, match="does not fit this model"):
        checkpoint.load_checkpoint(path, nn.Sequential(nn.Linear(8, 3)))
