"""bertforge.run_folder: the --out decision, atomic publishing and the run record, on real folders."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import pytest

from bertforge.errors import BertforgeError
from bertforge.run_folder import (OutKind, changed_setting, check_out, may_change, publish_dir, run_settings,
                                  writing_dir)

KIND = OutKind(noun="a thing", foreign="holds other files, not a thing", resumable=True,
               is_ours=lambda path: (path / "thing.json").is_file())


def test_check_out_tells_new_ours_and_foreign_apart(tmp_path):
    assert check_out(tmp_path / "new", KIND, overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty", KIND, overwrite=False) is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(BertforgeError, match="is a file"):
        check_out(tmp_path / "file", KIND, overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BertforgeError, match="holds other files, not a thing"):
        check_out(foreign, KIND, overwrite=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "thing.json").write_text("{}")
    with pytest.raises(BertforgeError, match="already holds a thing; pass --resume .* or --overwrite"):
        check_out(ours, KIND, overwrite=False)
    assert check_out(ours, KIND, overwrite=True) is True
    assert check_out(ours, KIND, overwrite=False, resume=True) is True


def test_publish_dir_replaces_an_earlier_folder_whole(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "new.txt").write_text("new")
    publish_dir(tmp, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["sub", "sub/new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither tmp nor the moved-aside old folder


def test_writing_dir_publishes_or_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with writing_dir(out, what="thing", then="try again") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(BertforgeError, match=r"^cannot write thing .*out \(No space left on device\); try again$"):
        with writing_dir(out, what="thing", then="try again") as tmp:
            (tmp / "b.txt").write_text("b")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a.txt").is_file()


@dataclass(frozen=True, kw_only=True)
class _Config:
    out: Path = may_change()
    lr: float = 0.1
    seeds: tuple[int, ...] = (1, 2)
    device: str = may_change("cpu")


def test_the_run_record_holds_the_fields_not_declared_may_change():
    config = _Config(out=Path("/x"), lr=0.2)
    record = run_settings(config)
    assert record == {"lr": 0.2, "seeds": [1, 2]}  # as JSON reads it back
    assert changed_setting(record, run_settings(_Config(out=Path("/y"), device="cuda")), config) == ("lr", 0.2, 0.1)
    assert changed_setting({"lr": 0.2}, record, config) is None  # a missing setting counts as its default
    assert changed_setting({"lr": 0.2}, run_settings(_Config(out=Path("/x"), lr=0.2, seeds=(3,))), config) == \
        ("seeds", [1, 2], [3])
