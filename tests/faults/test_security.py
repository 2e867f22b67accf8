"""Loading never runs code from a file, and paths read from files never send a write outside `--out`.

API-level pickle refusals are in tests/test_checkpoint.py and tests/test_hf.py; these go through the real CLI: a
crafted optimizer.pt in a checkpoint (checksums made to agree, so only the content is hostile) on `--resume`, and a
crafted pytorch_model.bin in a model folder, each of which would create a marker file if unpickled."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bertforge import checkpoint
from bertforge.cli import main
from bertforge.data.shards import manifest_checksum
from conftest import run_cli


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1].startswith("bertforge: error: "), lines
    return lines[-1]


def test_a_hostile_optimizer_state_in_a_checkpoint_is_refused_on_resume(run_dir, data_dir, tmp_path):
    run = tmp_path / "RUN"
    shutil.copytree(run_dir, run)
    step = checkpoint.latest_complete_checkpoint(run)
    marker = tmp_path / "PWNED"
    torch.save({"optimizer": _Exploit(marker)}, step / checkpoint.STATE_FILE)
    meta = json.loads((step / checkpoint.META_FILE).read_text())
    meta["files"][checkpoint.STATE_FILE] = {"bytes": (step / checkpoint.STATE_FILE).stat().st_size,
                                            "sha256": checkpoint.sha256_file(step / checkpoint.STATE_FILE)}
    (step / checkpoint.META_FILE).write_text(json.dumps(meta))
    message = _one_line(run_cli("pretrain", "--data", data_dir, "--out", run, "--resume"))
    assert f"cannot load {step / checkpoint.STATE_FILE} safely" in message
    assert not marker.exists()


def test_a_hostile_pytorch_model_bin_is_refused(run_dir, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(run_dir / "model", folder)
    state = load_file(folder / "model.safetensors")
    marker = tmp_path / "PWNED"
    state["payload"] = _Exploit(marker)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    for args in (["fill-mask", "--model", folder, "the [MASK] ."], ["export", "--model", folder, "--out",
                                                                   tmp_path / "out"]):
        message = _one_line(run_cli(*args))
        assert "refused for safety" in message and str(folder / "pytorch_model.bin") in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_run_config_naming_another_folder_cannot_move_the_writes(run_dir, data_dir, tmp_path, capsys):
    """--resume takes settings from RUN/config.json, but never where to write: that is --out alone."""
    run = tmp_path / "inside" / "RUN"
    shutil.copytree(run_dir, run)
    for step in sorted((run / "checkpoints").glob("step_*"))[1:]:
        shutil.rmtree(step)  # resume from step 1: the run has work left to write
    shutil.rmtree(run / "model")
    config = json.loads((run / "config.json").read_text())
    config["pretrain"]["out"] = "../../escaped"
    (run / "config.json").write_text(json.dumps(config))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "inside" not in p.parts)
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--resume"]) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "inside" not in p.parts) == before
    assert not (tmp_path / "escaped").exists() and (run / "model" / "model.safetensors").is_file()


def test_a_sharded_index_cannot_point_outside_the_model_folder(run_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(run_dir / "model", folder)
    shutil.move(folder / "model.safetensors", tmp_path / "outside.safetensors")
    weight_map = {name: "../outside.safetensors" for name in load_file(tmp_path / "outside.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert main(["fill-mask", "--model", str(folder), "the [MASK] ."]) == 2
    err = capsys.readouterr().err.strip()
    assert "'../outside.safetensors' as a shard" in err and len(err.splitlines()) == 1


def test_overwrite_deletes_only_inside_out_whatever_the_manifest_lists(corpus_file, tokenizer_dir, data_dir,
                                                                       tmp_path):
    """A DATA folder's manifest lists its files; --overwrite must not follow names that lead outside it."""
    out = tmp_path / "DATA"
    shutil.copytree(data_dir, out)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append({"name": "../precious.txt", "bytes": 7, "sha256": "0" * 64})
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("prepare", corpus_file, "--tokenizer", tokenizer_dir, "--out", out, "--max-seq-len", "32",
                     "--dupe-factor", "1", "--workers", "1", "--quiet", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert precious.read_text() == "keep me"
    assert "../precious.txt" not in (out / "manifest.json").read_text()


@pytest.mark.parametrize("name", ["../x.bin", "/etc/passwd"])
def test_a_manifest_naming_files_outside_data_is_refused(name, data_dir, tmp_path, capsys):
    out = tmp_path / "DATA"
    shutil.copytree(data_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].append({"name": name, "bytes": 1, "sha256": "0" * 64})
    manifest["manifest_sha256"] = manifest_checksum(manifest)  # a deliberate edit, not damage: checksums agree
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.json" in err and name in err and len(err.splitlines()) == 1
