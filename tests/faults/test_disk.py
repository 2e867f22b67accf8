"""A full disk or an unwritable run folder while `pretrain` saves: a one-line message, a non-zero exit, the previous
checkpoint intact and no partial folder left. Injected as the OS error (works anywhere, also as root, where chmod
does not block writes) and, where this process may mount one, with a real, tiny tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import safetensors.torch

from bertforge import checkpoint
from bertforge.cli import main
from conftest import run_cli

FLAGS = ["--model", "tiny", "--batch-size", "4", "--max-steps", "6", "--save-every", "2", "--eval-every", "100",
         "--keep-last", "3", "--device", "cpu"]


def _assert_previous_checkpoint_intact(run: Path, step: int) -> None:
    newest = checkpoint.latest_complete_checkpoint(run)
    assert newest is not None and newest.name == f"step_{step:07d}"
    checkpoint.verify_checkpoint(newest)
    assert not list((run / "checkpoints").glob(".tmp-*")), "a partial checkpoint folder was left behind"


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_save_is_one_line_and_keeps_the_previous_checkpoint(error, synthetic_data, tmp_path, monkeypatch,
                                                                       capsys):
    run = tmp_path / "RUN"
    real_save = safetensors.torch.save_model
    calls = []

    def failing_second_save(model, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the step-4 checkpoint: the disk fills up (or turns read-only) mid-write
            real_save(model, filename, *args, **kwargs)
            raise OSError(error, os.strerror(error), filename)
        return real_save(model, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_model", failing_second_save)
    status = main(["pretrain", "--data", str(synthetic_data), "--out", str(run), *FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("bertforge: error: cannot write checkpoint") and os.strerror(error) in err[-1]
    assert "--resume" in err[-1] and "Traceback" not in "\n".join(err)
    _assert_previous_checkpoint_intact(run, 2)
    monkeypatch.setattr(safetensors.torch, "save_model", real_save)
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), "--resume"]) == 0  # space freed
    assert checkpoint.latest_complete_checkpoint(run).name == "step_0000006"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"bertforge-{uuid.uuid4().hex[:6]}",
                             str(path)], capture_output=True)
    return result.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_keeps_the_previous_checkpoint(synthetic_data, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "9m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-error test covers the behaviour")
    try:
        run = disk / "RUN"  # one tiny-model checkpoint is ~6 MB: the first fits, the second cannot
        result = run_cli("pretrain", "--data", synthetic_data, "--out", run, *FLAGS)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2, result.stderr[-2000:]
        assert last.startswith("bertforge: error: ") and "No space left on device" in last, last
        assert "Traceback" not in result.stderr
        _assert_previous_checkpoint_intact(run, 2)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_during_export_leaves_no_half_written_model_folder(run_dir, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from bertforge import hf

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf, "save_file", full)
    out = tmp_path / "exported"
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bertforge: error: cannot write model folder {out} (No space left on device)")
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
