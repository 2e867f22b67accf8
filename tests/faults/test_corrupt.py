"""Damaged files that bertforge wrote (a model folder's model.safetensors, a checkpoint's files, a DATA shard, the
manifest) are detected by size or checksum and named in a one-line error: never loaded as if valid. Third-party
folders carry no checksums: there, truncation (what the safetensors format itself reveals) is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bertforge.cli import main


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _flip_tail(path: Path) -> None:
    """Flips one bit near the end: inside the tensor data (or array data), not the header."""
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_digit(path: Path) -> None:
    """Changes one digit of a JSON file so that it stays valid JSON (only a checksum can tell)."""
    text = path.read_text(encoding="utf-8")
    at = next(i for i, c in enumerate(text) if c.isdigit() and i > len(text) // 3)
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:], encoding="utf-8")


DAMAGE = {"truncate": _truncate, "flip": _flip_tail, "digit": _flip_digit}


def _one_line_error(capsys, status: int) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status != 0
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("bertforge: error: "), err
    return err[-1]


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    copy = tmp_path / "RUN"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture
def data_copy(data_dir, tmp_path) -> Path:
    copy = tmp_path / "DATA"
    shutil.copytree(data_dir, copy)
    return copy


@pytest.mark.parametrize("damage, expected", [("truncate", "damaged or incomplete"), ("flip", "fails its checksum")])
@pytest.mark.parametrize("command", ["fill-mask", "export", "evaluate"])
def test_a_damaged_exported_model_is_named_and_refused(command, damage, expected, run_copy, data_dir, tmp_path,
                                                       capsys):
    weights = run_copy / "model" / "model.safetensors"
    DAMAGE[damage](weights)
    args = {"fill-mask": ["fill-mask", "--model", str(run_copy), "the [MASK] ."],
            "export": ["export", "--model", str(run_copy), "--out", str(tmp_path / "copy")],
            "evaluate": ["evaluate", "--model", str(run_copy), "--data", str(data_dir)]}[command]
    message = _one_line_error(capsys, main(args))
    assert str(weights) in message and expected in message
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_named_on_resume_and_on_export(name, damage, run_copy, data_dir, tmp_path, capsys):
    step = run_copy / "checkpoints" / "step_0000002"
    DAMAGE[damage](step / name)
    message = _one_line_error(capsys, main(["pretrain", "--data", str(data_dir), "--out", str(run_copy),
                                            "--resume"]))
    assert f"checkpoint {step} is corrupt ({name}" in message and "move it away" in message
    if name == "model.safetensors":  # loading the checkpoint folder itself as a model verifies it too
        message = _one_line_error(capsys, main(["export", "--model", str(step), "--out", str(tmp_path / "x")]))
        assert f"checkpoint {step} is corrupt" in message
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("command", ["pretrain", "inspect"])
def test_a_damaged_shard_is_named(command, damage, data_copy, tmp_path, capsys):
    shard = data_copy / "train" / "shard_00000.tokens.bin"
    DAMAGE[damage](shard)
    args = {"pretrain": ["pretrain", "--data", str(data_copy), "--out", str(tmp_path / "RUN"), "--model", "tiny",
                         "--max-steps", "1"],
            "inspect": ["inspect", str(data_copy), "--verify"]}[command]
    message = _one_line_error(capsys, main(args))
    assert str(shard) in message and ("corrupt" in message or "truncated or damaged" in message)
    assert not (tmp_path / "RUN").exists()


@pytest.mark.parametrize("damage", ["truncate", "digit"])
def test_a_damaged_manifest_is_named(damage, data_copy, tmp_path, capsys):
    manifest = data_copy / "manifest.json"
    DAMAGE[damage](manifest)
    for args in (["inspect", str(data_copy)],
                 ["pretrain", "--data", str(data_copy), "--out", str(tmp_path / "RUN"), "--model", "tiny"]):
        message = _one_line_error(capsys, main(args))
        assert str(manifest) in message
    assert not (tmp_path / "RUN").exists()


def test_a_truncated_third_party_model_is_refused(tmp_path, tokenizer_dir, capsys):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hub"
    config = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    transformers.BertForPreTraining(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json"):
        shutil.copy(tokenizer_dir / name, folder)
    assert main(["fill-mask", "--model", str(folder), "the [MASK] ."]) == 0  # intact: loads
    capsys.readouterr()
    _truncate(folder / "model.safetensors")
    message = _one_line_error(capsys, main(["fill-mask", "--model", str(folder), "the [MASK] ."]))
    assert str(folder / "model.safetensors") in message and "damaged or incomplete" in message
    # no record in a third-party file: bertforge adds none when only reading it
    assert "bertforge" not in json.dumps(json.loads((folder / "config.json").read_text()))
