"""benchmarks/domain_adaptation.py (issue 15): the parts that decide what is compared and what a re-run redoes.

The whole protocol takes CPU-hours; these tests check its data splits (the IMDB dev set is fixed and disjoint from
training, the Chinese domain corpus holds no ChnSentiCorp dev/test review) and its resumption rule (a benchmarked
model is never redone; a model is rebuilt only while a benchmark still needs it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("domain_adaptation", ROOT / "benchmarks" / "domain_adaptation.py")
da = importlib.util.module_from_spec(SPEC)
sys.modules["domain_adaptation"] = da
SPEC.loader.exec_module(da)

needs_data = pytest.mark.skipif(not da.DATA.is_dir(), reason="needs ../shared/data")


def test_review_line_breaks_become_paragraphs() -> None:
    assert da.clean_review("Great.<br /><br />Really.<br />Yes") == "Great.\n\nReally.\nYes"


def _rows(path: Path) -> list[dict]:
    """JSON lines split at "\n" only, as the readers do (str.splitlines would also split at U+2028 in a review)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@needs_data
def test_the_imdb_split_is_fixed_and_disjoint(tmp_path: Path) -> None:
    train, dev = da.imdb_task_files(tmp_path / "a", 300, dev=500)
    train_rows, dev_rows = _rows(train), _rows(dev)
    assert len(train_rows) == 300 and len(dev_rows) == 500
    assert not {r["id"] for r in train_rows} & {r["id"] for r in dev_rows}
    assert {r["label"] for r in dev_rows} == {"pos", "neg"}
    assert not any("<br />" in r["text"] for r in train_rows + dev_rows)
    # a smaller training slice elsewhere keeps the same dev set and is the start of the same training order
    small_train, small_dev = da.imdb_task_files(tmp_path / "b", 100, dev=500)
    assert small_dev.read_text() == dev.read_text()
    assert _rows(small_train) == train_rows[:100]


@needs_data
def test_the_shopping_corpus_leaves_out_chnsenticorp_dev_and_test(tmp_path: Path) -> None:
    import csv
    import gzip

    corpus, stats = da.shopping_reviews(tmp_path)
    kept = {row["text"] for row in _rows(corpus)}
    assert stats["kept"] == len(_rows(corpus))
    assert stats["left_out_in_chnsenticorp_dev_test"] > 0
    assert stats["kept"] + stats["left_out_in_chnsenticorp_dev_test"] == stats["reviews"]
    for split in ("dev", "test"):
        with gzip.open(da.CHNSENTICORP / f"{split}.tsv.gz", "rt", encoding="utf-8") as handle:
            held = {row["text_a"].strip() for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)}
        assert not kept & held


def _record_model(record: "da.Record", name: str, folder: Path) -> None:
    (folder / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    record.save_job(name, {"model": str(folder)})


def test_a_rerun_redoes_only_what_a_missing_benchmark_needs(tmp_path: Path) -> None:
    record = da.Record(tmp_path / "record")
    everything = [job.name for job in da.needed(record, tmp_path)]
    assert everything == [job.name for job in da.JOBS]  # nothing done: every job, in the scheduler's order

    for job in da.JOBS:  # every benchmark recorded: nothing to do, even with every model lost
        if job.run is None:
            (record.folder / f"{job.name}.json").write_text('{"cells": []}')
    assert da.needed(da.Record(record.folder), tmp_path) == []

    (record.folder / "bench_en_dapt.json").unlink()  # one benchmark missing, its models lost (a new machine)
    _record_model(record, "wiki", tmp_path / "gone" / "wiki")
    (tmp_path / "gone" / "wiki" / "config.json").unlink()
    assert [job.name for job in da.needed(da.Record(record.folder), tmp_path)] == ["wiki", "dapt", "bench_en_dapt"]

    _record_model(record, "wiki", tmp_path / "kept" / "wiki")  # the model still on disk is reused
    assert [job.name for job in da.needed(da.Record(record.folder), tmp_path)] == ["dapt", "bench_en_dapt"]
