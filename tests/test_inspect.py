"""`bertforge inspect` through the CLI entry point on DATA folders built with our own ShardWriter."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bertforge.cli import main
from test_shards import MASK, build_data, make_vocab, random_instances

VOCAB = 500
FIELDS = ["tokens", "segment_ids", "is_random_next", "masked_lm_positions", "masked_lm_labels"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(21)
    splits = {"train": random_instances(rng, 120, VOCAB), "validation": random_instances(rng, 9, VOCAB)}
    counts = {"documents": 40, "sentences": 400, "tokens": 9000, "unk_tokens": 90, "truncated_instances": 33}
    out = build_data(tmp_path_factory.mktemp("inspect") / "DATA", splits, VOCAB, shard_instances=50,
                     manifest={"counts": counts, "options": {"max_seq_len": 64, "max_predictions": 8,
                                                             "masked_lm_prob": 0.15, "short_seq_prob": 0.1}})
    return out, splits


def reference_record(inst) -> dict:
    """What Google's generator writes for this instance (tokens after masking, labels as strings)."""
    vocab = make_vocab(VOCAB)
    ids = list(inst.ids)
    for position, replacement in zip(inst.masked_positions, inst.replacement_ids):
        ids[position] = replacement
    return {"tokens": [vocab[i] for i in ids],
            "segment_ids": [0] * inst.a_len + [1] * (len(ids) - inst.a_len),
            "is_random_next": inst.is_random_next,
            "masked_lm_positions": inst.masked_positions,
            "masked_lm_labels": [vocab[i] for i in inst.masked_ids]}


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_all_instances_in_stored_order(data, capsys):
    path, splits = data
    status, out, err = run(capsys, path, "--json", "-n", "0")
    assert status == 0 and err == ""
    records = [json.loads(line) for line in out.splitlines()]
    assert all(list(record) == FIELDS for record in records)
    assert records == [reference_record(inst) for inst in splits["train"]]


def test_json_offset_count_and_split(data, capsys):
    path, splits = data
    status, out, _ = run(capsys, path, "--json", "-n", "3", "--offset", "48")
    assert [json.loads(line) for line in out.splitlines()] == [reference_record(i) for i in splits["train"][48:51]]
    status, out, _ = run(capsys, path, "--json", "--split", "validation")
    assert [json.loads(line) for line in out.splitlines()] == [reference_record(i) for i in splits["validation"][:5]]


def test_text_view_like_the_paper(data, capsys):
    path, splits = data
    status, out, _ = run(capsys, path, "-n", "2", "--offset", "7")
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 5  # a header, then two lines per instance
    for inst, (tokens_line, masked_line) in zip(splits["train"][7:9], [lines[1:3], lines[3:5]]):
        record = reference_record(inst)
        label = "NotNext" if inst.is_random_next else "IsNext"
        assert tokens_line.endswith(" ".join(record["tokens"]) + "  " + label)
        for position, original in zip(record["masked_lm_positions"], record["masked_lm_labels"]):
            assert f"{position}→{original}" in masked_line


def test_stats(data, capsys):
    path, splits = data
    train = splits["train"]
    status, out, _ = run(capsys, path, "--stats", "--json")
    stats = json.loads(out)
    split = stats["splits"]["train"]
    assert split["instances"] == 120 and stats["splits"]["validation"]["instances"] == 9
    assert split["is_next_share"] == pytest.approx(np.mean([not i.is_random_next for i in train]))
    masks = [len(i.masked_positions) for i in train]
    assert split["masks_per_instance"] == {"mean": pytest.approx(np.mean(masks)), "min": min(masks),
                                           "max": max(masks)}
    replacements = [r for i in train for r in i.replacement_ids]
    assert split["replacement_shares"]["mask"] == pytest.approx(np.mean([r == MASK for r in replacements]))
    lengths = [len(i.ids) for i in train]
    assert sum(b["count"] for b in split["length_histogram"]) == 120
    assert split["length"]["max"] == max(lengths) and split["tokens"] == sum(lengths)
    assert stats["corpus"]["unk_rate"] == pytest.approx(0.01) and stats["corpus"]["truncated_instances"] == 33

    status, text, _ = run(capsys, path, "--stats")
    assert status == 0
    for needle in ("IsNext share", "length histogram", "masks per instance", "documents", "unk rate",
                   "truncated instances", f"{split['is_next_share']:.3f}"):
        assert needle in text


@pytest.mark.parametrize("damage", ["missing", "no_manifest", "truncated", "offset"])
def test_bad_data_is_one_line_exit_2(data, tmp_path, capsys, damage):
    path, splits = data
    target, extra = tmp_path / "DATA", []
    if damage == "missing":
        target = tmp_path / "nothing"
    else:
        build_data(target, {"train": splits["train"][:20]}, VOCAB, shard_instances=8)
    if damage == "no_manifest":
        (target / "manifest.json").unlink()
    elif damage == "truncated":
        shard = target / "train" / "shard_00001.tokens.bin"
        shard.write_bytes(shard.read_bytes()[:-1])
    elif damage == "offset":
        extra = ["--offset", "20"]
    status, out, err = run(capsys, target, *extra)
    assert status == 2 and out == ""
    assert err.startswith("bertforge: error: ") and err.count("\n") == 1
    if damage == "truncated":
        assert "shard_00001.tokens.bin" in err



REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference"


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/data/reference")
def test_prepare_exact_then_inspect_equals_the_reference(tmp_path, capsys):
    """End to end: `prepare --exact` on the reference sample, then `inspect --json -n 0` prints, line for line,
    the instances Google's create_pretraining_data.py wrote for the same corpus, vocab and seed."""
    tokenizer = tmp_path / "vocab"
    tokenizer.mkdir()
    shutil.copy(REFERENCE / "en_vocab_8k.txt", tokenizer / "vocab.txt")
    status = main(["prepare", str(REFERENCE / "en_wiki_sample.txt.gz"), "--tokenizer", str(tokenizer),
                   "--out", str(tmp_path / "DATA"), "--exact", "--seed", "12345", "--dupe-factor", "2",
                   "--max-seq-len", "128", "--max-predictions", "20", "--validation-fraction", "0"])
    assert status == 0
    capsys.readouterr()
    status, out, _ = run(capsys, tmp_path / "DATA", "--json", "-n", "0", "--verify")
    assert status == 0
    with gzip.open(REFERENCE / "en_seed12345_dupe2_seq128.jsonl.gz", "rt", encoding="utf-8") as handle:
        expected = [json.loads(line) for line in handle]
    ours = [json.loads(line) for line in out.splitlines()]
    assert len(ours) == len(expected) == 7463
    assert ours == expected
